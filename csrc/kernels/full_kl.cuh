// CUDA kernels and launchers of full_kl, the exact full-vocabulary KL(p || q)
// (torch-free, header-only). See docs/kernels.md.
//
// Forward: one pass over z and zr together keeping, per thread, Σ e_v and Σ e_v (z_v − zr_v)
// with e_v = 2^(z_v·c − m) under a lazily moved reference m, and the log-sum-exp of zr;
// then KL = (Σ e (z − zr)/τ) / Σ e − (lse_p − lse_q). A column with zr = −inf where z is
// not (q_v = 0 < p_v, however small p_v is) makes the KL +inf: it is flagged on its own
// instead of summed (its infinite term would meet a zero rescale factor and give NaN). Backward: one pass over z and zr
// writing (g/τ) p_j (L_j − KL). Few rows: each row is split over several CTAs whose
// partial sums a tiny kernel combines (in a fixed order).
#pragma once
#include <climits>

#include "common.cuh"
#include "full_kl_args.h"

namespace tike::cuda {

namespace full_kl_detail {

constexpr int kPart = 6;  // floats per partial: m, s, w, mq, sq, q-hole

struct FwdParams {
  FullKlForwardArgs a;
  int splits, seg;
  float c, inv_tau;
  float* ws;
};

__device__ __forceinline__ void write_row(const FwdParams& P, int64_t n, float m, float s, float w,
                                          float mq, float sq, bool hole) {
  const double lse_p = kLn2 * (double(m) + log2(double(s)));
  const double lse_q = kLn2 * (double(mq) + log2(double(sq)));
  // The saved pairs (M, ℓ) of docs/kernels.md: M = m/c (the max up to the rounding of
  // z·c), ℓ = log S; lse = M/τ + ℓ.
  P.a.lse_p[2 * n] = float(double(m) / double(P.c));
  P.a.lse_p[2 * n + 1] = float(kLn2 * log2(double(s)));
  P.a.lse_q[2 * n] = float(double(mq) / double(P.c));
  P.a.lse_q[2 * n + 1] = float(kLn2 * log2(double(sq)));
  (void)lse_p;
  (void)lse_q;
  // lse_p − lse_q from the float maxima (exact in double), not from their float roundings.
  const double kl = double(w) * double(P.inv_tau) / double(s) -
                    kLn2 * ((double(m) - double(mq)) + (log2(double(s)) - log2(double(sq))));
  P.a.out[n] = float(hole && kl == kl ? kInfD : kl);  // NaN (an undefined row) stays NaN
}

template <typename T>
__global__ void __launch_bounds__(kThreads) fwd_kernel(const FwdParams P) {
  __shared__ float fs[kWarps];
  const FullKlForwardArgs& a = P.a;
  const int64_t n = int64_t(blockIdx.x) / P.splits;
  const int part = int(int64_t(blockIdx.x) % P.splits);
  if (a.mask && !a.mask[n]) {
    if (P.splits == 1 && threadIdx.x == 0)
      a.out[n] = a.lse_p[2 * n] = a.lse_p[2 * n + 1] = a.lse_q[2 * n] = a.lse_q[2 * n + 1] = 0.f;
    return;
  }
  const T* zrow = row_base<T>(a.logits, a.logits_layout, n);
  const T* qrow = row_base<T>(a.ref_logits, a.ref_layout, n);
  const int b = part * P.seg, e = min(int(a.V), b + P.seg);
  const float c = P.c;
  constexpr int N = Vec<T>::N;
  LazyLseW lp;
  LazyLse lq;
  bool hole = false;  // some zr = −inf where z > −inf
  stream_segment<T, true, 2>(zrow, qrow, b, e, [&](const float (&z)[N], const float (&zr)[N]) {
    float d[N];
#pragma unroll
    for (int i = 0; i < N; ++i) {
      const bool h = zr[i] == -kInf && z[i] > -kInf;
      hole |= h;
      d[i] = h ? 0.f : z[i] - zr[i];
    }
    lp.add(z, d, c);
    lq.add(zr, c);
  });
  const bool any_hole = block_any(hole, fs);
  const float m = block_max(lp.m, fs);
  const float f = lp.s != 0.f ? ex2(lp.m - m) : 0.f;
  const float s = block_sum(lp.s * f, fs), w = block_sum(lp.s != 0.f ? lp.w * f : 0.f, fs);
  const float mq = block_max(lq.m, fs);
  const float sq = block_sum(lq.scaled(mq), fs);
  if (threadIdx.x != 0) return;
  if (P.splits == 1) {
    write_row(P, n, m, s, w, mq, sq, any_hole);
  } else {
    float* h = P.ws + (n * P.splits + part) * kPart;
    h[0] = m;
    h[1] = s;
    h[2] = w;
    h[3] = mq;
    h[4] = sq;
    h[5] = any_hole ? 1.f : 0.f;
  }
}

// One thread per row: the splits' partials in order. (A template, as every kernel in a
// header: a plain __global__ function here would be defined by every .cu including it.)
template <typename T>
__global__ void __launch_bounds__(kThreads) combine_kernel(const FwdParams P) {
  const int64_t n = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (n >= P.a.N) return;
  if (P.a.mask && !P.a.mask[n]) {
    P.a.out[n] = P.a.lse_p[2 * n] = P.a.lse_p[2 * n + 1] = P.a.lse_q[2 * n] =
        P.a.lse_q[2 * n + 1] = 0.f;
    return;
  }
  const float* h = P.ws + n * P.splits * kPart;
  float m = -kInf, mq = -kInf;
  for (int s = 0; s < P.splits; ++s) {
    m = fmaxf(m, h[s * kPart]);
    mq = fmaxf(mq, h[s * kPart + 3]);
  }
  float s_ = 0.f, w = 0.f, sq = 0.f;
  bool hole = false;
  for (int s = 0; s < P.splits; ++s) {
    const float* p = h + s * kPart;
    if (p[1] != 0.f) {
      const float f = ex2(p[0] - m);
      s_ += p[1] * f;
      w += p[2] * f;
    }
    sq += p[4] != 0.f ? p[4] * ex2(p[3] - mq) : 0.f;
    hole |= p[5] != 0.f;
  }
  write_row(P, n, m, s_, w, mq, sq, hole);
}

struct BwdParams {
  FullKlBackwardArgs a;
  int splits, seg;
  float c, inv_tau;
};

template <typename T>
__global__ void __launch_bounds__(kThreads) bwd_kernel(const BwdParams P) {
  const FullKlBackwardArgs& a = P.a;
  const int64_t n = int64_t(blockIdx.x) / P.splits;
  const int part = int(int64_t(blockIdx.x) % P.splits);
  const int b = part * P.seg, e = min(int(a.V), b + P.seg);
  T* grow = static_cast<T*>(a.grad) + n * a.V;
  if (a.mask && !a.mask[n]) {
    zero_segment(grow, b, e);
    return;
  }
  const T* zrow = row_base<T>(a.logits, a.logits_layout, n);
  const T* qrow = row_base<T>(a.ref_logits, a.ref_layout, n);
  const float c = P.c, s = P.inv_tau, gs = a.grad_out[n] * s;
  // From the saved pairs (M, ℓ): lse_p·log2 e = M_p·c + ℓ_p·log2 e, and
  // lse_p − lse_q + KL = (M_p − M_q)/τ + (ℓ_p − ℓ_q) + KL.
  const float lp2 = __fmaf_rn(a.lse_p[2 * n], c, a.lse_p[2 * n + 1] * kLog2e);
  const float dl = (a.lse_p[2 * n] - a.lse_q[2 * n]) * s + (a.lse_p[2 * n + 1] - a.lse_q[2 * n + 1]) +
                   a.out[n];
  constexpr int N = Vec<T>::N;
  map_segment<T, true, 2>(zrow, qrow, grow, b, e,
                          [&](const float (&z)[N], const float (&zr)[N], int, float (&o)[N]) {
#pragma unroll
                            for (int i = 0; i < N; ++i) {
                              const float p = ex2(__fmaf_rn(z[i], c, -lp2));
                              const float v = p * ((z[i] - zr[i]) * s - dl) * gs;
                              // p_j (L_j − KL) g/τ; 0 where p = 0, but a NaN p (NaN row)
                              // stays NaN as on the CPU (p > 0 would zero it)
                              o[i] = p != 0.f ? v : 0.f;
                            }
                          });
}

template <typename T>
inline cudaError_t launch_forward(const FwdParams& P, cudaStream_t stream) {
  TIKE_LAUNCH(fwd_kernel<T>, unsigned(P.a.N * P.splits), kThreads, 0, stream, P);
  if (P.splits > 1)
    TIKE_LAUNCH(combine_kernel<T>, unsigned((P.a.N + kThreads - 1) / kThreads), kThreads, 0,
                stream, P);
  return cudaGetLastError();
}

}  // namespace full_kl_detail

// Bytes of scratch full_kl_forward needs (the split partials; 0 with one CTA per row).
inline size_t full_kl_forward_workspace_bytes(const FullKlForwardArgs& a) {
  const RowSplit rs = plan_row_split(a.N, a.V, 64);
  return rs.splits > 1 ? size_t(a.N) * rs.splits * full_kl_detail::kPart * sizeof(float) : 0;
}

inline cudaError_t full_kl_forward(const FullKlForwardArgs& a, void* workspace,
                                   cudaStream_t stream) {
  if (a.N == 0) return cudaSuccess;
  const RowSplit rs = plan_row_split(a.N, a.V, 64);
  if (!(a.temperature > 0.f) || a.V < 1 || a.V >= (int64_t(1) << 30) ||
      a.N * rs.splits >= int64_t(INT_MAX) || (rs.splits > 1 && workspace == nullptr))
    return cudaErrorInvalidValue;
  full_kl_detail::FwdParams P;
  P.a = a;
  P.splits = rs.splits;
  P.seg = rs.seg;
  P.c = kLog2e / a.temperature;
  P.inv_tau = 1.f / a.temperature;
  P.ws = static_cast<float*>(workspace);
  switch (a.dtype) {
    case DType::Float32: return full_kl_detail::launch_forward<float>(P, stream);
    case DType::BFloat16: return full_kl_detail::launch_forward<__nv_bfloat16>(P, stream);
    case DType::Float16: return full_kl_detail::launch_forward<__half>(P, stream);
  }
  return cudaErrorInvalidValue;
}

inline cudaError_t full_kl_backward(const FullKlBackwardArgs& a, cudaStream_t stream) {
  if (a.N == 0) return cudaSuccess;
  const RowSplit rs = plan_row_split(a.N, a.V, 64);
  if (!(a.temperature > 0.f) || a.V < 1 || a.V >= (int64_t(1) << 30) ||
      a.N * rs.splits >= int64_t(INT_MAX))
    return cudaErrorInvalidValue;
  full_kl_detail::BwdParams P;
  P.a = a;
  P.splits = rs.splits;
  P.seg = rs.seg;
  P.c = kLog2e / a.temperature;
  P.inv_tau = 1.f / a.temperature;
  const unsigned grid = unsigned(a.N * rs.splits);
  switch (a.dtype) {
    case DType::Float32: TIKE_LAUNCH(full_kl_detail::bwd_kernel<float>, grid, kThreads, 0, stream, P); break;
    case DType::BFloat16:
      TIKE_LAUNCH(full_kl_detail::bwd_kernel<__nv_bfloat16>, grid, kThreads, 0, stream, P);
      break;
    case DType::Float16: TIKE_LAUNCH(full_kl_detail::bwd_kernel<__half>, grid, kThreads, 0, stream, P); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace tike::cuda
