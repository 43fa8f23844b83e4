// Fiber context switch and stacks (see fiber.h).
#include "fiber.h"

#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>

namespace tike_emu::detail {

#if defined(__x86_64__)

// tike_emu_switch(void** save_sp, void* load_sp): pushes the callee-saved registers on the
// current stack, stores the stack pointer in *save_sp, loads load_sp and pops the state
// saved there. A fresh fiber's stack is laid out by context_init so that the final `ret`
// enters tike_emu_trampoline with r13 = entry.
extern "C" void tike_emu_switch(void** save_sp, void* load_sp);
asm(R"(
  .text
  .p2align 4
  .globl tike_emu_switch
  .hidden tike_emu_switch
  .type tike_emu_switch, @function
tike_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size tike_emu_switch, .-tike_emu_switch

  .p2align 4
  .globl tike_emu_trampoline
  .hidden tike_emu_trampoline
  .type tike_emu_trampoline, @function
tike_emu_trampoline:
  andq $-16, %rsp
  callq *%r13
  ud2
  .size tike_emu_trampoline, .-tike_emu_trampoline
)");
extern "C" void tike_emu_trampoline();

void context_init(Context& ctx, void* lo, size_t size, void (*entry)()) {
  auto top = (reinterpret_cast<uintptr_t>(lo) + size) & ~uintptr_t(15);
  auto* sp = reinterpret_cast<uint64_t*>(top - 64);  // the trampoline realigns
  sp[0] = 0;                                        // r15
  sp[1] = 0;                                        // r14
  sp[2] = reinterpret_cast<uint64_t>(entry);        // r13
  sp[3] = 0;                                        // r12
  sp[4] = 0;                                        // rbx
  sp[5] = 0;                                        // rbp
  sp[6] = reinterpret_cast<uint64_t>(&tike_emu_trampoline);  // return address
  ctx.sp = sp;
}

void context_switch(Context& from, Context& to) { tike_emu_switch(&from.sp, to.sp); }

#else

void context_init(Context& ctx, void* lo, size_t size, void (*entry)()) {
  getcontext(&ctx.uc);
  ctx.uc.uc_stack.ss_sp = lo;
  ctx.uc.uc_stack.ss_size = size;
  ctx.uc.uc_link = nullptr;
  makecontext(&ctx.uc, entry, 0);
}

void context_switch(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }

#endif

Stack stack_alloc(size_t size) {
  const size_t page = size_t(sysconf(_SC_PAGESIZE));
  size = (size + page - 1) / page * page;
  void* p = mmap(nullptr, size + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) {
    std::fprintf(stderr, "tike_cuda emulation: cannot map a fiber stack of %zu bytes\n", size);
    std::abort();
  }
  mprotect(p, page, PROT_NONE);  // guard page below the stack (stacks grow down)
  return Stack{static_cast<char*>(p) + page, size};
}

}  // namespace tike_emu::detail
