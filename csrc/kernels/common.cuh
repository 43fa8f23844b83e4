// Building blocks shared by the CUDA kernels of every op (torch-free, header-only).
//
//  * 16-byte vector loads/stores of fp32 / bf16 / fp16 rows with the float conversion,
//    and the split of a row segment into an unaligned head, an aligned body and a tail
//    (rows of an odd V start at any element, so no row can be assumed aligned);
//  * base-2 exponentials relative to a reference logit (Ref, PairExp): the hot loops
//    compute 2^(z·c − m) with c = log2(e)/τ, one FFMA and one MUFU.EX2 per element where
//    the inputs are ordinary, 2^((z − R)·c) where z·c would overflow or lose log p's
//    digits (τ → 0, logits near the float limit);
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
#include <type_traits>

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
constexpr float kLn2f = 0.693147180559945309f;
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
__device__ __forceinline__ bool is_nan(float x) {
  return (__float_as_uint(x) & 0x7fffffffu) > 0x7f800000u;  // bit test: safe under fast math
}

// ---------------------------------------------------------------- references of row sums
//
// Every sum of terms 2^(z·c) (c = log2(e)/τ) is kept relative to a reference logit R, as
// Σ 2^(z·c − E) with the base-2 offset E = R·c − r, and every log-probability is formed
// from differences to R, never from z/τ itself (which loses log p's digits at a tiny τ and
// overflows for |z| > 2.4e38·τ):
//   fast form, where |R·c| < 2^24 (ordinary logits and temperatures): E = m = R·c rounded
//     to float, and a term's exponent z·c − m is ONE FFMA (the product z·c is exact inside
//     it, so neither z/τ nor its rounding enters); r = R·c − m, exact, |r| <= 1/2;
//   slow form, elsewhere (τ → 0, logits near the float limit): E = R·c exactly (r = 0) and
//     the exponent is (z − R)·c — the difference is scaled, never z.
// A sum moves from one reference to another by the factor 2^(E_from − E_to), formed in
// double from the references (ref_shift): exact however large R·c is.
constexpr float kFastRefLimit = 16777216.f;  // 2^24: |r| <= 1/2 below it
constexpr double kLog2eD = 1.4426950408889634074;

struct Ref {
  float R = -kInf;  // the reference logit
  float m = 0.f;    // R·c rounded (fast form)
  float r = 0.f;    // R·c − E: exact; 0 in the slow form
  bool fast = false;

  __device__ __forceinline__ static Ref at(float R, float c) {
    Ref f;
    f.R = R;
    const float m = __fmul_rn(R, c);
    f.fast = fabsf(m) < kFastRefLimit;  // false for ±inf and NaN
    if (f.fast) {
      f.m = m;
      f.r = __fmaf_rn(R, c, -m);  // exact: the product has 48 bits, m its first 24
    }
    return f;
  }
  // The exponent z·c − E of one term. −inf for z = −inf (NaN if R is −inf too).
  __device__ __forceinline__ float exponent(float z, float c) const {
    return fast ? __fmaf_rn(z, c, -m) : __fmul_rn(z - R, c);
  }
  // The exponents of N elements, the form chosen once for all of them.
  template <int N>
  __device__ __forceinline__ void exponents(const float (&z)[N], float c, float (&y)[N]) const {
    if (fast) {
#pragma unroll
      for (int i = 0; i < N; ++i) y[i] = __fmaf_rn(z[i], c, -m);
    } else {
#pragma unroll
      for (int i = 0; i < N; ++i) y[i] = __fmul_rn(z[i] - R, c);
    }
  }
  // z·c − E in double (gathered entries: no overflow, no cancellation).
  __device__ __forceinline__ double exponent_d(float z, float c) const {
    return (double(z) - double(R)) * double(c) + double(r);
  }
};

// E_to − E_from, in double.
__device__ __forceinline__ double ref_shift(const Ref& from, const Ref& to, float c) {
  return (double(to.R) - double(from.R)) * double(c) - double(to.r) + double(from.r);
}
// The factor 2^(E_from − E_to) that moves a sum from reference `from` to `to` (to.R >=
// from.R). Formed in double: the moves are few (the references rise lazily).
__device__ __forceinline__ float ref_factor(const Ref& from, const Ref& to, float c) {
  return float(exp2(-ref_shift(from, to, c)));
}

// The saved pair (M, ℓ) of a row (docs/kernels.md: log p_j = (z_j − M)/τ − ℓ) as base-2
// exponents for a backward pass: p_j = 2^(y_j)·K. Fast form (|M·c + ℓ·log2 e| < 2^24): y_j
// = z_j·c − o, one FFMA, with o = M·c + ℓ·log2 e rounded to float and K = 2^(o − (M·c +
// ℓ·log2 e)) (in [2^-1/2, 2^1/2], exact in float up to its own rounding) taking o's
// rounding out; the kernels fold K into their per-row factors. Slow form: y_j = (z_j − M)·c
// − λ, λ = ℓ·log2 e rounded, K likewise. A NaN pair (an undefined row) gives NaN.
struct PairExp {
  float M = 0.f, o = 0.f, K = 1.f, log2K = 0.f, c = 0.f;
  double l2 = 0.0;  // ℓ·log2 e
  bool fast = false;

  __device__ __forceinline__ static PairExp of(const float* pair, float c) {
    PairExp e;
    e.M = pair[0];
    e.c = c;
    e.l2 = double(pair[1]) * kLog2eD;
    const double off = double(e.M) * double(c) + e.l2;
    e.fast = fabs(off) < double(kFastRefLimit);  // false for ±inf and NaN
    const double exact = e.fast ? off : e.l2;
    e.o = float(exact);
    e.log2K = float(double(e.o) - exact);  // NaN for a NaN pair: a NaN gradient
    e.K = exp2f(e.log2K);
    return e;
  }
  __device__ __forceinline__ float y(float z) const {
    return fast ? __fmaf_rn(z, c, -o) : __fmaf_rn(z - M, c, -o);
  }
  template <int N>
  __device__ __forceinline__ void ys(const float (&z)[N], float (&out)[N]) const {
    if (fast) {
#pragma unroll
      for (int i = 0; i < N; ++i) out[i] = __fmaf_rn(z[i], c, -o);
    } else {
#pragma unroll
      for (int i = 0; i < N; ++i) out[i] = __fmaf_rn(z[i] - M, c, -o);
    }
  }
  // log2 p_j in double.
  __device__ __forceinline__ double log2p(float z) const {
    return (double(z) - double(M)) * double(c) - l2;
  }
  // p_j in float.
  __device__ __forceinline__ float p(float z) const { return ex2(y(z)) * K; }
};

// Σ 2^(z_i·c − E) over a thread's elements, on a reference (Ref) moved up only when a
// chunk's sum would pass 2^64 (or is not finite, which also covers the −inf reference at
// the start): the hot loop needs no per-element max. −inf terms count 0; NaN propagates.
struct LazyLse {
  Ref ref;
  float s = 0.f;

  template <int N>
  __device__ __forceinline__ void add(const float (&z)[N], float c) {
    float y[N], t = 0.f;
    ref.exponents(z, c, y);
#pragma unroll
    for (int i = 0; i < N; ++i) t += ex2(y[i]);
    if (t <= kLazyLimit) {
      s += t;
    } else {
      add_slow(z, c);
    }
  }
  template <int N>
  __device__ __forceinline__ void add_slow(const float (&z)[N], float c) {
    float mx = ref.R;
#pragma unroll
    for (int i = 0; i < N; ++i) mx = fmaxf(mx, z[i]);
    move_to(mx, c);
    float t = 0.f;
#pragma unroll
    for (int i = 0; i < N; ++i) t += z[i] == -kInf ? 0.f : ex2(ref.exponent(z[i], c));
    s += t;
  }
  __device__ __forceinline__ void add1(float z, float c) {
    float one[1] = {z};
    add(one, c);
  }
  __device__ __forceinline__ void move_to(float R, float c) {
    if (R > ref.R) {
      const Ref to = Ref::at(R, c);
      if (s != 0.f) s *= ref_factor(ref, to, c);
      ref = to;
    }
  }
  // s re-expressed relative to `to` (to.R >= ref.R; 0 stays 0, NaN stays NaN).
  __device__ __forceinline__ float scaled(const Ref& to, float c) const {
    return s != 0.f ? s * ref_factor(ref, to, c) : 0.f;
  }
};

// The same with w = Σ t_i·y_i beside s = Σ t_i (t_i = 2^y_i, y_i = z_i·c − E: the
// entropy's weighted sum). Keeping the weights relative to the reference avoids
// cancelling a large E[z/τ] against a large lse.
struct LazyLseRel {
  Ref ref;
  float s = 0.f, w = 0.f;

  template <int N>
  __device__ __forceinline__ void add(const float (&z)[N], float c) {
    float y[N], t = 0.f, u = 0.f;
    ref.exponents(z, c, y);
#pragma unroll
    for (int i = 0; i < N; ++i) {
      const float e = ex2(y[i]);
      t += e;
      u += e > 0.f ? e * y[i] : 0.f;
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
    float mx = ref.R;
#pragma unroll
    for (int i = 0; i < N; ++i) mx = fmaxf(mx, z[i]);
    move_to(Ref::at(mx, c), c);
    float t = 0.f, u = 0.f;
#pragma unroll
    for (int i = 0; i < N; ++i) {
      if (z[i] == -kInf) continue;
      const float y = ref.exponent(z[i], c), e = ex2(y);
      t += e;
      u += e > 0.f ? e * y : 0.f;
    }
    s += t;
    w += u;
  }
  // Moving E to E' = E + d: t' = t·2^-d and y' = y − d, so w' = 2^-d (w − d·s).
  __device__ __forceinline__ void move_to(const Ref& to, float c) {
    if (to.R > ref.R) {
      if (s != 0.f) {
        const double d = ref_shift(ref, to, c);
        const float f = float(exp2(-d));
        w = float(double(f) * (double(w) - d * double(s)));
        s *= f;
      }
      ref = to;
    }
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

// f(z, zr), or f(z, zr, j) when f takes the column j of z[0] as well.
template <int N, typename F>
__device__ __forceinline__ void call_visit(F& f, const float (&z)[N], const float (&zr)[N], int j) {
  if constexpr (std::is_invocable_v<F&, const float (&)[N], const float (&)[N], int>) {
    f(z, zr, j);
  } else {
    f(z, zr);
  }
}

// Visits the columns [b, e) of row zrow (and the same columns of qrow when TWO) with all
// kThreads threads: f(z, zr) gets N = Vec<T>::N consecutive columns per call, as 16-byte
// loads where the rows allow (qrow may be aligned differently: then it is read element by
// element). Columns outside the aligned body come one per call, padded with −inf. U
// vectors per thread are loaded before any is used, to keep enough bytes in flight.
// f(z, zr, j) also gets j, the column of z[0]: a thread's body calls come in increasing
// j, its call outside the body (if any) last.
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
      const int ci = c0 + u * kThreads;
      if (ci < span.nvec) call_visit(f, z[u], zr[u], span.body_b + ci * N);
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
    call_visit(f, z, zr, j);
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
