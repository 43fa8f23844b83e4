// Building blocks shared by the CUDA kernels of every op (torch-free, header-only).
//
//  * 16-byte vector loads/stores of fp32 / bf16 / fp16 rows with the float conversion,
//    and the split of a row segment into an unaligned head, an aligned body and a tail
//    (rows of an odd V start at any element, so no row can be assumed aligned);
//  * base-2 exponentials (the hot loops compute 2^(z·c − m) with c = log2(e)/τ, one FFMA
//    and one MUFU.EX2 per element, rounding the exponent once relative to the offset);
//  * online log-sum-exp accumulators whose reference only moves when a term would
//    overflow, so the hot loop needs no per-element max;
//  * warp and block reductions in a fixed order (bitwise reproducible results);
//  * how rows are split over several CTAs when there are too few rows to fill the GPU.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "row_layout.h"

// Every kernel launch goes through TIKE_LAUNCH: nvcc sees the plain <<<>>> launch; the CPU
// emulation of the CUDA execution model (csrc/emu) defines TIKE_EMU_LAUNCH and runs the
// grid on fibers there.
#if defined(TIKE_EMU_LAUNCH)
#define TIKE_LAUNCH(kernel, grid, block, smem, stream, ...) \
  TIKE_EMU_LAUNCH(kernel, grid, block, smem, stream, __VA_ARGS__)
#else
#define TIKE_LAUNCH(kernel, grid, block, smem, stream, ...) \
  kernel<<<grid, block, smem, stream>>>(__VA_ARGS__)
#endif

namespace tike::cuda {

constexpr int kThreads = 256;  // every kernel: 8 warps per CTA
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr float kLog2e = 1.4426950408889634f;
constexpr double kLn2 = 0.69314718055994530942;
constexpr float kInf = __builtin_huge_valf();
constexpr double kInfD = __builtin_huge_val();
// A lazily moved reference lets single terms reach 2^64 before it moves; sums of a few
// thousand such terms stay far below the float range.
constexpr float kLazyLimit = 18446744073709551616.f;  // 2^64

// ---------------------------------------------------------------- element access

template <typename T>
struct Vec {
  static constexpr int N = 16 / int(sizeof(T));  // elements per 16-byte access
};

__device__ __forceinline__ float bf16_bits_to_float(uint32_t b) { return __uint_as_float(b << 16); }

template <typename T>
__device__ __forceinline__ float load1(const T* p);
template <>
__device__ __forceinline__ float load1<float>(const float* p) { return *p; }
template <>
__device__ __forceinline__ float load1<__nv_bfloat16>(const __nv_bfloat16* p) {
  return bf16_bits_to_float(*reinterpret_cast<const uint16_t*>(p));
}
template <>
__device__ __forceinline__ float load1<__half>(const __half* p) { return __half2float(*p); }

__device__ __forceinline__ void unpack(uint4 v, float (&x)[4], const float*) {
  x[0] = __uint_as_float(v.x);
  x[1] = __uint_as_float(v.y);
  x[2] = __uint_as_float(v.z);
  x[3] = __uint_as_float(v.w);
}
__device__ __forceinline__ void unpack(uint4 v, float (&x)[8], const __nv_bfloat16*) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    x[2 * i] = __uint_as_float(w[i] << 16);
    x[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
  }
}
__device__ __forceinline__ void unpack(uint4 v, float (&x)[8], const __half*) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    __half2 h;
    *reinterpret_cast<uint32_t*>(&h) = w[i];
    const float2 f = __half22float2(h);
    x[2 * i] = f.x;
    x[2 * i + 1] = f.y;
  }
}

// N = Vec<T>::N elements from a 16-byte aligned address.
template <typename T>
__device__ __forceinline__ void load_vec(const T* p, float (&x)[Vec<T>::N]) {
  unpack(*reinterpret_cast<const uint4*>(p), x, p);
}
// The same N elements from any element-aligned address (a row whose alignment differs
// from its partner row's).
template <typename T>
__device__ __forceinline__ void load_vec_any(const T* p, bool aligned, float (&x)[Vec<T>::N]) {
  if (aligned) {
    load_vec(p, x);
  } else {
#pragma unroll
    for (int i = 0; i < Vec<T>::N; ++i) x[i] = load1(p + i);
  }
}

template <typename T>
__device__ __forceinline__ void store1(T* p, float x);
template <>
__device__ __forceinline__ void store1<float>(float* p, float x) { *p = x; }
template <>
__device__ __forceinline__ void store1<__nv_bfloat16>(__nv_bfloat16* p, float x) {
  *p = __float2bfloat16_rn(x);
}
template <>
__device__ __forceinline__ void store1<__half>(__half* p, float x) { *p = __float2half_rn(x); }

__device__ __forceinline__ uint32_t pack2(float a, float b, const __nv_bfloat16*) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
  return *reinterpret_cast<const uint32_t*>(&h);
}
__device__ __forceinline__ uint32_t pack2(float a, float b, const __half*) {
  const __half2 h = __floats2half2_rn(a, b);
  return *reinterpret_cast<const uint32_t*>(&h);
}

template <typename T>
__device__ __forceinline__ void store_vec(T* p, const float (&x)[Vec<T>::N]) {
  uint4 v;
  if constexpr (sizeof(T) == 4) {
    v = make_uint4(__float_as_uint(x[0]), __float_as_uint(x[1]), __float_as_uint(x[2]),
                   __float_as_uint(x[3]));
  } else {
    v = make_uint4(pack2(x[0], x[1], p), pack2(x[2], x[3], p), pack2(x[4], x[5], p),
                   pack2(x[6], x[7], p));
  }
  *reinterpret_cast<uint4*>(p) = v;
}
template <typename T>
__device__ __forceinline__ void store_vec_any(T* p, bool aligned, const float (&x)[Vec<T>::N]) {
  if (aligned) {
    store_vec(p, x);
  } else {
#pragma unroll
    for (int i = 0; i < Vec<T>::N; ++i) store1(p + i, x[i]);
  }
}

template <typename T>
__device__ __forceinline__ bool is_aligned16(const T* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

// A segment [b, e) of one row as head [b, body_b), body [body_b, body_b + nvec·N) of
// 16-byte aligned vectors, tail [body_b + nvec·N, e). In-row indices are int: V < 2^31.
struct Span {
  int b, body_b, nvec, e;
  __device__ __forceinline__ int body_e(int n) const { return body_b + nvec * n; }
  // Elements outside the body (fewer than 2·N): the i-th of them, or -1.
  __device__ __forceinline__ int extra(int i, int n) const {
    const int head = body_b - b;
    if (i < head) return b + i;
    const int j = body_e(n) + (i - head);
    return j < e ? j : -1;
  }
  __device__ __forceinline__ int num_extra(int n) const { return (body_b - b) + (e - body_e(n)); }
};

template <typename T>
__device__ __forceinline__ Span make_span(const T* row, int b, int e) {
  constexpr int N = Vec<T>::N;
  const uintptr_t a = reinterpret_cast<uintptr_t>(row + b);
  int head = int(((16u - (a & 15u)) & 15u) / sizeof(T));
  if (head > e - b) head = e - b;
  Span s;
  s.b = b;
  s.body_b = b + head;
  s.nvec = (e - b - head) / N;
  s.e = e;
  return s;
}

// ---------------------------------------------------------------- math

// 2^x through MUFU.EX2 (ftz): 2^-inf = 0, 2^NaN = NaN. Relative error about 2 ulp.
// Without a device compiler (the CPU emulation) the same meaning in plain C++: subnormal
// inputs and results flushed to zero.
__device__ __forceinline__ float ex2(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  constexpr float kMinNormal = 1.17549435e-38f;
  const float y = exp2f(fabsf(x) < kMinNormal ? 0.f : x);
  return y < kMinNormal ? 0.f : y;  // NaN compares false and stays NaN
#endif
}
// Max that propagates NaN (max.NaN.f32, sm_80+): a NaN anywhere must reach the tests.
__device__ __forceinline__ float fmax_nan(float a, float b) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(y) : "f"(a), "f"(b));
  return y;
#else
  return (a != a || b != b) ? __uint_as_float(0x7fffffffu) : fmaxf(a, b);
#endif
}
// x·c − m with the product rounded to float first. Every reference m is such a rounded
// product (a running max of z·c), so the largest term is exactly 2^0. A fused z·c − m
// keeps the product's rounding error, which for |z·c| ≳ 2^24 (τ = 1e-30, logits near the
// float limit) is itself a huge exponent (2^(±1e21) = inf or 0). __fmul_rn is never
// contracted into an FMA, even under --use_fast_math.
__device__ __forceinline__ float scaled_minus(float x, float c, float m) { return __fmul_rn(x, c) - m; }

__device__ __forceinline__ bool is_nan(float x) {
  return (__float_as_uint(x) & 0x7fffffffu) > 0x7f800000u;  // bit test: safe under fast math
}

// Σ 2^(z_i·c − m), with m moved up only when a chunk's sum would pass 2^64 (or is not
// finite, which also covers m = −inf at the start). −inf terms count 0; NaN propagates.
struct LazyLse {
  float m = -kInf, s = 0.f;

  template <int N>
  __device__ __forceinline__ void add(const float (&z)[N], float c) {
    float t = 0.f;
#pragma unroll
    for (int i = 0; i < N; ++i) t += ex2(scaled_minus(z[i], c, m));
    if (t <= kLazyLimit) {
      s += t;
    } else {
      add_slow(z, c);
    }
  }
  template <int N>
  __device__ __forceinline__ void add_slow(const float (&z)[N], float c) {
    float mx = m;
#pragma unroll
    for (int i = 0; i < N; ++i) mx = fmaxf(mx, __fmul_rn(z[i], c));
    move_to(mx);
    float t = 0.f;
#pragma unroll
    for (int i = 0; i < N; ++i) t += z[i] == -kInf ? 0.f : ex2(scaled_minus(z[i], c, m));
    s += t;
  }
  __device__ __forceinline__ void add1(float z, float c) {
    float one[1] = {z};
    add(one, c);
  }
  __device__ __forceinline__ void move_to(float mx) {
    if (mx > m) {
      if (s != 0.f) s *= ex2(m - mx);
      m = mx;
    }
  }
  // s re-expressed relative to ref >= m (0 stays 0, NaN stays NaN).
  __device__ __forceinline__ float scaled(float ref) const { return s != 0.f ? s * ex2(m - ref) : 0.f; }
};

// The same with Σ t_i·(z_i·c − m) beside Σ t_i (the entropy's weighted sum). Keeping the
// weights relative to m avoids cancelling a large E[z/τ] against a large lse.
struct LazyLseRel {
  float m = -kInf, s = 0.f, w = 0.f;

  template <int N>
  __device__ __forceinline__ void add(const float (&z)[N], float c) {
    float t = 0.f, u = 0.f;
#pragma unroll
    for (int i = 0; i < N; ++i) {
      const float y = scaled_minus(z[i], c, m), e = ex2(y);
      t += e;
      u += e > 0.f ? e * y : 0.f;
    }
    if (t <= kLazyLimit) {
      s += t;
      w += u;
    } else {
      add_slow(z, c);
    }
  }
  template <int N>
  __device__ __forceinline__ void add_slow(const float (&z)[N], float c) {
    float mx = m;
#pragma unroll
    for (int i = 0; i < N; ++i) mx = fmaxf(mx, __fmul_rn(z[i], c));
    move_to(mx);
    float t = 0.f, u = 0.f;
#pragma unroll
    for (int i = 0; i < N; ++i) {
      if (z[i] == -kInf) continue;
      const float y = scaled_minus(z[i], c, m), e = ex2(y);
      t += e;
      u += e > 0.f ? e * y : 0.f;
    }
    s += t;
    w += u;
  }
  // Moving m to m': t' = t·f and (x − m') = (x − m) + (m − m').
  __device__ __forceinline__ void move_to(float mx) {
    if (mx > m) {
      if (s != 0.f) {
        const float f = ex2(m - mx);
        w = f * (w + s * (m - mx));
        s *= f;
      }
      m = mx;
    }
  }
};

// Σ t_i and Σ t_i·d_i with t_i = 2^(z_i·c − m) and a per-element weight d_i (full KL:
// d = z − zr). t = 0 terms count 0 whatever d is (0·inf would be NaN).
struct LazyLseW {
  float m = -kInf, s = 0.f, w = 0.f;

  template <int N>
  __device__ __forceinline__ void add(const float (&z)[N], const float (&d)[N], float c) {
    float t = 0.f, u = 0.f;
#pragma unroll
    for (int i = 0; i < N; ++i) {
      const float e = ex2(scaled_minus(z[i], c, m));
      t += e;
      u += e > 0.f ? e * d[i] : 0.f;
    }
    if (t <= kLazyLimit) {
      s += t;
      w += u;
    } else {
      add_slow(z, d, c);
    }
  }
  template <int N>
  __device__ __forceinline__ void add_slow(const float (&z)[N], const float (&d)[N], float c) {
    float mx = m;
#pragma unroll
    for (int i = 0; i < N; ++i) mx = fmaxf(mx, __fmul_rn(z[i], c));
    if (mx > m) {
      if (s != 0.f) {
        const float f = ex2(m - mx);
        s *= f;
        w *= f;
      }
      m = mx;
    }
    float t = 0.f, u = 0.f;
#pragma unroll
    for (int i = 0; i < N; ++i) {
      if (z[i] == -kInf) continue;
      const float e = ex2(scaled_minus(z[i], c, m));
      t += e;
      u += e > 0.f ? e * d[i] : 0.f;
    }
    s += t;
    w += u;
  }
};

// ---------------------------------------------------------------- reductions
// Butterfly (xor) reductions: lane l adds v_l + v_{l^o}, its partner v_{l^o} + v_l, which
// is the same float, so every lane ends with the same bits, run after run.

template <typename F>
__device__ __forceinline__ F warp_sum(F v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}

// Block reductions over kThreads threads; every thread gets the result. `scratch` holds
// kWarps values of F; the final sum runs over the warps in order, so it is reproducible.
template <typename F>
__device__ __forceinline__ F block_sum(F v, F* scratch) {
  v = warp_sum(v);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  F r = scratch[0];
#pragma unroll
  for (int i = 1; i < kWarps; ++i) r += scratch[i];
  __syncthreads();
  return r;
}
__device__ __forceinline__ float block_max(float v, float* scratch) {
  v = warp_max(v);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float r = scratch[0];
#pragma unroll
  for (int i = 1; i < kWarps; ++i) r = fmaxf(r, scratch[i]);
  __syncthreads();
  return r;
}
__device__ __forceinline__ bool block_any(bool v, float* scratch) {
  return block_max(v ? 1.f : 0.f, scratch) > 0.f;
}

// ---------------------------------------------------------------- streaming a segment

// Visits the columns [b, e) of row zrow (and the same columns of qrow when TWO) with all
// kThreads threads: f(z, zr) gets N = Vec<T>::N consecutive columns per call, as 16-byte
// loads where the rows allow (qrow may be aligned differently: then it is read element by
// element). Columns outside the aligned body come one per call, padded with −inf. U
// vectors per thread are loaded before any is used, to keep enough bytes in flight.
template <typename T, bool TWO, int U, typename F>
__device__ __forceinline__ void stream_segment(const T* zrow, const T* qrow, int b, int e,
                                               F&& f) {
  constexpr int N = Vec<T>::N;
  const Span span = make_span(zrow, b, e);
  const bool qal = TWO ? is_aligned16(qrow + span.body_b) : true;
  const int tid = threadIdx.x;
  for (int c0 = tid; c0 < span.nvec; c0 += kThreads * U) {
    float z[U][N], zr[U][N];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int ci = c0 + u * kThreads;
      if (ci < span.nvec) {
        const int j = span.body_b + ci * N;
        load_vec(zrow + j, z[u]);
        if (TWO) load_vec_any(qrow + j, qal, zr[u]);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (c0 + u * kThreads < span.nvec) f(z[u], zr[u]);
    }
  }
  const int nx = span.num_extra(N);
  if (tid < nx) {
    const int j = span.extra(tid, N);
    float z[N], zr[N];
#pragma unroll
    for (int i = 0; i < N; ++i) z[i] = zr[i] = -kInf;
    z[0] = load1(zrow + j);
    if (TWO) zr[0] = load1(qrow + j);
    f(z, zr);
  }
}

// Writes grow[j] = f(...) for the columns [b, e): f(z, zr, j0, out) fills out[i] for the
// N columns j0 .. j0+N-1 (beyond the body one column per call: only out[0] is stored).
// Each element is read before the same thread writes it, so grow may alias zrow.
template <typename T, bool TWO, int U, typename F>
__device__ __forceinline__ void map_segment(const T* zrow, const T* qrow, T* grow, int b, int e,
                                            F&& f) {
  constexpr int N = Vec<T>::N;
  const Span span = make_span(zrow, b, e);
  const bool qal = TWO ? is_aligned16(qrow + span.body_b) : true;
  const bool gal = is_aligned16(grow + span.body_b);
  const int tid = threadIdx.x;
  for (int c0 = tid; c0 < span.nvec; c0 += kThreads * U) {
    float z[U][N], zr[U][N];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int ci = c0 + u * kThreads;
      if (ci < span.nvec) {
        const int j = span.body_b + ci * N;
        load_vec(zrow + j, z[u]);
        if (TWO) load_vec_any(qrow + j, qal, zr[u]);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int ci = c0 + u * kThreads;
      if (ci < span.nvec) {
        const int j = span.body_b + ci * N;
        float out[N];
        f(z[u], zr[u], j, out);
        store_vec_any(grow + j, gal, out);
      }
    }
  }
  const int nx = span.num_extra(N);
  if (tid < nx) {
    const int j = span.extra(tid, N);
    float z[N], zr[N], out[N];
#pragma unroll
    for (int i = 0; i < N; ++i) z[i] = zr[i] = -kInf;
    z[0] = load1(zrow + j);
    if (TWO) zr[0] = load1(qrow + j);
    f(z, zr, j, out);
    store1(grow + j, out[0]);
  }
}

// Zeros over the columns [b, e) of a row (masked rows).
template <typename T>
__device__ __forceinline__ void zero_segment(T* grow, int b, int e) {
  constexpr int N = Vec<T>::N;
  const Span span = make_span(grow, b, e);
  float zero[N];
#pragma unroll
  for (int i = 0; i < N; ++i) zero[i] = 0.f;
  for (int ci = threadIdx.x; ci < span.nvec; ci += kThreads) store_vec(grow + span.body_b + ci * N, zero);
  if (int(threadIdx.x) < span.num_extra(N)) store1(grow + span.extra(threadIdx.x, N), 0.f);
}

// ---------------------------------------------------------------- row splitting

// How the columns of each row are spread over CTAs. With few rows (a small batch, or a
// benchmark of one sequence) one CTA per row would leave most of the 132 SMs idle, so
// each row is cut into `splits` segments of `seg` columns (a multiple of 256, keeping
// 16-byte vectors whole) and the per-segment partial results are combined after.
struct RowSplit {
  int splits = 1;
  int seg = 0;
};

inline int device_sm_count() {
  static int cached[64] = {0};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return 132;
  if (cached[dev] == 0) {
    int n = 0;
    if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || n <= 0)
      n = 132;
    cached[dev] = n;
  }
  return cached[dev];
}

// Enough CTAs for about 4 per SM; segments of at least kMinSeg columns.
inline RowSplit plan_row_split(int64_t N, int64_t V, int max_splits) {
  constexpr int64_t kMinSeg = 4096;
  RowSplit p;
  p.seg = int(V);
  const int64_t want = 4 * int64_t(device_sm_count());
  if (N <= 0 || N >= want || V < 2 * kMinSeg || max_splits < 2) return p;
  int64_t s = (want + N - 1) / N;
  if (s > V / kMinSeg) s = V / kMinSeg;
  if (s > max_splits) s = max_splits;
  if (s < 2) return p;
  int64_t seg = (V + s - 1) / s;
  seg = (seg + 255) / 256 * 256;
  p.splits = int((V + seg - 1) / seg);
  p.seg = int(seg);
  if (p.splits < 2) {
    p.splits = 1;
    p.seg = int(V);
  }
  return p;
}

template <typename T>
__device__ __forceinline__ const T* row_base(const void* p, const RowLayout& l, int64_t n) {
  return static_cast<const T*>(p) + l.offset(n);
}

inline int next_pow2(int64_t x) {
  int p = 1;
  while (p < x) p <<= 1;
  return p;
}

// Dynamic shared memory a kernel may take without opting in: 48 KB minus room for the
// kernels' own static scratch (the 48 KB default covers static + dynamic together).
constexpr size_t kDefaultSmem = 40 * 1024;

template <typename K>
inline cudaError_t allow_smem(K kernel, size_t bytes) {
  if (bytes <= kDefaultSmem) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes));
}

}  // namespace tike::cuda
