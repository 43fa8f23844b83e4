// Cooperative fibers for the CUDA emulation: every emulated CUDA thread runs on its own
// stack and gives the CPU back only at a barrier, a warp operation or its end.
//
// On x86-64 a switch saves the six callee-saved registers and swaps the stack pointer (a
// few nanoseconds; the floating-point control state is the same in every fiber, nothing
// in a kernel changes it); elsewhere it falls back to ucontext, whose swapcontext also
// saves the signal mask (a system call per switch: correct, slow).
#pragma once
#include <cstddef>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

namespace tike_emu::detail {

struct Context {
#if defined(__x86_64__)
  void* sp = nullptr;
#else
  ucontext_t uc;
#endif
};

// Prepares `ctx` to run entry() on the stack [lo, lo + size) at the first switch to it.
// entry() must never return (a fiber ends by switching away for good).
void context_init(Context& ctx, void* lo, size_t size, void (*entry)());

// Saves the running context into `from` and resumes `to`.
void context_switch(Context& from, Context& to);

// A stack of `size` bytes with a no-access guard page below it, so an overflow faults
// instead of silently writing into the next fiber's stack.
struct Stack {
  void* lo = nullptr;
  size_t size = 0;
};
Stack stack_alloc(size_t size);

}  // namespace tike_emu::detail
