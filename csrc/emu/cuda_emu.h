// The CUDA execution model on the CPU: what the kernel headers (csrc/kernels/*.cuh) need
// from nvcc, provided for the host C++ compiler, so that the very sources nvcc compiles run
// on the CPU (see docs/emulation.md). Include it before anything that includes a CUDA header.
//
//  * every CUDA thread of a block is a fiber (fiber.h); a block's fibers run until each
//    waits at a barrier or a warp operation, then the rendezvous completes; blocks run one
//    after another, on the launching OS thread;
//  * __syncthreads waits for the block, __syncwarp / __shfl*_sync / __ballot_sync /
//    __any_sync / __all_sync for the lanes of their mask, and exchange values there;
//  * __shared__ variables are thread_local (all fibers of a launch share one OS thread, so
//    one copy per block); `extern __shared__` arrays are buffers defined with
//    TIKE_EMU_DYNAMIC_SMEM, poisoned (0xff) before each block and checked for writes past
//    the launch's size after it;
//  * launches go through TIKE_LAUNCH (common.cuh), which here runs the grid synchronously
//    and reports errors through cudaGetLastError like a GPU would;
//  * device queries answer as an H200 (132 SMs, 227 KB of opt-in shared memory per block).
//
// A deadlock, a warp operation that part of its mask never reaches or reaches with another
// mask or at another call, threads waiting at different barriers, a barrier some threads
// exited before: the launch fails (cudaErrorLaunchFailure) with a message naming the
// kernel, the block, the threads and the source lines. It never hangs.
#pragma once
#if defined(__CUDACC__)
#error "cuda_emu.h is for the host C++ compiler; nvcc compiles the kernels for the GPU"
#endif

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

#define TIKE_EMU_API __attribute__((visibility("hidden")))

namespace tike_emu {

// The H200 the emulation reports.
constexpr int kSmCount = 132;
constexpr int kSmemDefault = 48 * 1024;   // per block without opting in
constexpr int kSmemOptin = 227 * 1024;    // cudaDevAttrMaxSharedMemoryPerBlockOptin
constexpr int kSmemRedzone = 4096;        // checked past the launch's dynamic size
constexpr size_t kDynSmemCapacity = size_t(kSmemOptin) + kSmemRedzone;

enum class WarpKind : int { Sync, ShflIdx, ShflUp, ShflDown, ShflXor, Ballot, Any, All };

namespace detail {

struct Now {
  uint3 thread, block;
  dim3 block_dim, grid_dim;
};
// The running CUDA thread: set by the scheduler before every switch to a fiber.
TIKE_EMU_API extern Now g_now;

TIKE_EMU_API void syncthreads(const char* file, int line);
TIKE_EMU_API uint64_t warp_op(WarpKind kind, unsigned mask, uint64_t payload, int arg,
                              const char* file, int line);
TIKE_EMU_API void run_grid(const void* kernel, const char* name, dim3 grid, dim3 block,
                           size_t smem, void (*body)(void*), void* ctx);
TIKE_EMU_API cudaError_t set_max_dynamic_smem(const void* kernel, int bytes);
TIKE_EMU_API int register_dynamic_smem(void* (*address)());

template <class To, class From>
To bit_as(From v) {
  static_assert(sizeof(To) == sizeof(From));
  To r;
  std::memcpy(&r, &v, sizeof(To));
  return r;
}

template <class T>
uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "warp exchange of <= 8 bytes");
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}
template <class T>
T from_bits(uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}

}  // namespace detail

// The CUDA runtime calls the kernels' launch code makes (the macros below point there).
TIKE_EMU_API cudaError_t get_last_error();
TIKE_EMU_API cudaError_t peek_last_error();
TIKE_EMU_API const char* last_error_message();  // what the last failed launch said
TIKE_EMU_API cudaError_t get_device(int* device);
TIKE_EMU_API cudaError_t device_get_attribute(int* value, cudaDeviceAttr attr, int device);
TIKE_EMU_API const char* error_name(cudaError_t err);

template <class F>
cudaError_t func_set_attribute(F* kernel, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaSuccess;
  return detail::set_max_dynamic_smem(reinterpret_cast<const void*>(kernel), value);
}

// kernel<<<grid, block, smem, stream>>>(args...): the arguments are converted to the
// kernel's parameter types once, as a launch does, and every thread gets its own copy.
template <class... P, class... A>
void launch(void (*kernel)(P...), const char* name, dim3 grid, dim3 block, size_t smem,
            cudaStream_t, A&&... args) {
  static_assert(sizeof...(P) == sizeof...(A), "kernel launched with the wrong argument count");
  using Params = std::tuple<std::decay_t<P>...>;
  Params params{std::decay_t<P>(std::forward<A>(args))...};
  struct Ctx {
    void (*kernel)(P...);
    Params* params;
  } ctx{kernel, &params};
  detail::run_grid(
      reinterpret_cast<const void*>(kernel), name, grid, block, smem,
      [](void* c) {
        auto* x = static_cast<Ctx*>(c);
        std::apply(x->kernel, *x->params);
      },
      &ctx);
}

}  // namespace tike_emu

// ------------------------------------------------------------------ language

#undef __shared__
#define __shared__ thread_local
#define __launch_bounds__(...)
#define threadIdx (::tike_emu::detail::g_now.thread)
#define blockIdx (::tike_emu::detail::g_now.block)
#define blockDim (::tike_emu::detail::g_now.block_dim)
#define gridDim (::tike_emu::detail::g_now.grid_dim)

#define TIKE_EMU_LAUNCH(kernel, grid, block, smem, stream, ...) \
  ::tike_emu::launch(kernel, #kernel, dim3(grid), dim3(block), size_t(smem), stream, __VA_ARGS__)

// Storage of an `extern __shared__ T name[]` array, at namespace scope in the namespace
// that encloses the kernel declaring it (where the extern declaration resolves).
#define TIKE_EMU_DYNAMIC_SMEM(T, name)                                                \
  alignas(256) thread_local T name[::tike_emu::kDynSmemCapacity / sizeof(T)];          \
  [[maybe_unused]] static const int tike_emu_smem_##name =                              \
      ::tike_emu::detail::register_dynamic_smem([]() -> void* { return &name[0]; });

// ------------------------------------------------------------------ runtime API

#define cudaGetLastError ::tike_emu::get_last_error
#define cudaPeekAtLastError ::tike_emu::peek_last_error
#define cudaGetDevice ::tike_emu::get_device
#define cudaDeviceGetAttribute ::tike_emu::device_get_attribute
#define cudaFuncSetAttribute ::tike_emu::func_set_attribute

// ------------------------------------------------------------------ intrinsics

inline unsigned __float_as_uint(float x) { return ::tike_emu::detail::bit_as<unsigned>(x); }
inline float __uint_as_float(unsigned x) { return ::tike_emu::detail::bit_as<float>(x); }
inline int __float_as_int(float x) { return ::tike_emu::detail::bit_as<int>(x); }
inline float __int_as_float(int x) { return ::tike_emu::detail::bit_as<float>(x); }
inline double __longlong_as_double(long long x) { return ::tike_emu::detail::bit_as<double>(x); }
inline long long __double_as_longlong(double x) { return ::tike_emu::detail::bit_as<long long>(x); }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline double __fma_rn(double a, double b, double c) { return std::fma(a, b, c); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(unsigned(x)); }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }

inline void __syncthreads(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  ::tike_emu::detail::syncthreads(file, line);
}
inline void __syncwarp(unsigned mask = 0xffffffffu, const char* file = __builtin_FILE(),
                       int line = __builtin_LINE()) {
  ::tike_emu::detail::warp_op(::tike_emu::WarpKind::Sync, mask, 0, 0, file, line);
}

#define TIKE_EMU_SHFL(fn, kind)                                                          \
  template <class T>                                                                     \
  inline T fn(unsigned mask, T var, int arg, int width = 32,                              \
              const char* file = __builtin_FILE(), int line = __builtin_LINE()) {         \
    if (width != 32) arg |= int(0x80000000u);                 /* reported as unsupported */ \
    return ::tike_emu::detail::from_bits<T>(::tike_emu::detail::warp_op(                  \
        ::tike_emu::WarpKind::kind, mask, ::tike_emu::detail::to_bits(var), arg, file, line)); \
  }
TIKE_EMU_SHFL(__shfl_sync, ShflIdx)
TIKE_EMU_SHFL(__shfl_up_sync, ShflUp)
TIKE_EMU_SHFL(__shfl_down_sync, ShflDown)
TIKE_EMU_SHFL(__shfl_xor_sync, ShflXor)
#undef TIKE_EMU_SHFL

inline unsigned __ballot_sync(unsigned mask, int pred, const char* file = __builtin_FILE(),
                              int line = __builtin_LINE()) {
  return unsigned(::tike_emu::detail::warp_op(::tike_emu::WarpKind::Ballot, mask, pred != 0, 0,
                                              file, line));
}
inline int __any_sync(unsigned mask, int pred, const char* file = __builtin_FILE(),
                      int line = __builtin_LINE()) {
  return int(::tike_emu::detail::warp_op(::tike_emu::WarpKind::Any, mask, pred != 0, 0, file, line));
}
inline int __all_sync(unsigned mask, int pred, const char* file = __builtin_FILE(),
                      int line = __builtin_LINE()) {
  return int(::tike_emu::detail::warp_op(::tike_emu::WarpKind::All, mask, pred != 0, 0, file, line));
}
