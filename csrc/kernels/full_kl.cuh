// CUDA kernels and launchers of full_kl, the exact full-vocabulary KL(p || q)
// (torch-free, header-only). See docs/kernels.md.
//
// Forward: one pass over z and zr together keeping, per thread, with y_v = z_v·c − E_p and
// u_v = zr_v·c − E_q relative to lazily moved references of each row (common.cuh: Ref),
// Σ 2^y, Σ 2^u and W = Σ 2^y (y − u); then, base 2,
//   KL = ln2·(W / Σ2^y − log2 Σ2^y + log2 Σ2^u).
// Neither z/τ nor z − zr is formed (both overflow near the float limit); a term whose
// float product overflows (zr = −FLT_MAX as a mask value, a finite huge log-ratio) is
// taken in double. A column with zr = −inf where z is not (q_v = 0 < p_v, however small
// p_v is) makes the KL +inf: it is flagged on its own instead of summed. Backward: one pass
// over z and zr writing (g/τ) p_j (L_j − KL) from the saved pairs. Few rows: each row is
// split over several CTAs whose partial sums a tiny kernel combines (in a fixed order).
#pragma once
#include <climits>

#include "common.cuh"
#include "full_kl_args.h"

namespace tike::cuda {

namespace full_kl_detail {

// floats per partial: R_p, s_p, W (hi, lo), R_q, s_q, q-hole, pad
constexpr int kPart = 8;

struct FwdParams {
  FullKlForwardArgs a;
  int splits, seg;
  float c, inv_tau;
  float* ws;
};

// One thread's (or segment's) sums: sp = Σ 2^y, sq = Σ 2^u, W = Σ 2^y (y − u) (float
// w, and wx in double for the terms whose float form overflows).
struct KlAcc {
  Ref rp, rq;
  float sp = 0.f, sq = 0.f, w = 0.f;
  double wx = 0.0;
  bool hole = false;  // some zr = −inf where z > −inf

  template <int N>
  __device__ __forceinline__ void add(const float (&z)[N], const float (&zr)[N], float c) {
    float y[N], u[N], tp = 0.f, tq = 0.f, tw = 0.f;
    rp.exponents(z, c, y);
    rq.exponents(zr, c, u);
    bool h = false;
#pragma unroll
    for (int i = 0; i < N; ++i) {
      const float e = ex2(y[i]);
      tp += e;
      tq += ex2(u[i]);
      const bool hi = zr[i] == -kInf && z[i] > -kInf;
      h |= hi;
      // e = 0 terms (z far below its reference, or −inf) count 0, even where zr = −inf too
      tw += (e != 0.f && !hi) ? e * (y[i] - u[i]) : 0.f;
    }
    hole |= h;
    if (tp <= kLazyLimit && tq <= kLazyLimit && fabsf(tw) <= 3.0e38f) {
      sp += tp;
      sq += tq;
      w += tw;
    } else {
      add_slow(z, zr, c);
    }
  }
  // Both references raised to the chunk's maxima (where higher), then term by term.
  template <int N>
  __device__ __forceinline__ void add_slow(const float (&z)[N], const float (&zr)[N], float c) {
    float mp = rp.R, mq = rq.R;
#pragma unroll
    for (int i = 0; i < N; ++i) {
      mp = fmaxf(mp, z[i]);
      mq = fmaxf(mq, zr[i]);
    }
    move_q(Ref::at(mq, c), c);
    move_p(Ref::at(mp, c), c);
#pragma unroll
    for (int i = 0; i < N; ++i) {
      const float y = rp.exponent(z[i], c);
      const float e = z[i] == -kInf ? 0.f : ex2(y);
      sp += e;
      sq += zr[i] == -kInf ? 0.f : ex2(rq.exponent(zr[i], c));
      if (e == 0.f || (zr[i] == -kInf && z[i] > -kInf)) continue;
      const float t = e * (y - rq.exponent(zr[i], c));
      if (fabsf(t) <= 3.0e38f || t != t) {
        w += t;
      } else {  // the float product overflowed: the exact exponents in double
        wx += double(e) * (rp.exponent_d(z[i], c) - rq.exponent_d(zr[i], c));
      }
    }
  }
  // E_q rises by d: every u drops by d, W = Σ 2^y (y − u) rises by d·sp. (While R_q is
  // −inf every p term so far met zr = −inf and counted 0.)
  __device__ __forceinline__ void move_q(const Ref& to, float c) {
    if (to.R > rq.R) {
      if (sq != 0.f || rq.R > -kInf) {
        const double d = ref_shift(rq, to, c);
        if (sq != 0.f) sq *= float(exp2(-d));
        if (sp != 0.f) wx += d * double(sp);
      }
      rq = to;
    }
  }
  // E_p rises by d: every 2^y is multiplied by f = 2^-d and y drops by d.
  __device__ __forceinline__ void move_p(const Ref& to, float c) {
    if (to.R > rp.R) {
      if (sp != 0.f) {
        const double d = ref_shift(rp, to, c), f = exp2(-d);
        wx = f * (wx + double(w) - d * double(sp));
        w = 0.f;
        sp = float(double(sp) * f);
      }
      rp = to;
    }
  }
  __device__ __forceinline__ double W() const { return double(w) + wx; }
};

// The row from its sums relative to (rp, rq).
__device__ __forceinline__ void write_row(const FwdParams& P, int64_t n, const Ref& rp, float s,
                                          double w, const Ref& rq, float sq, bool hole) {
  const double l2s = log2(double(s)), l2sq = log2(double(sq));
  // The saved pairs (M, ℓ) of docs/kernels.md: M = R, ℓ = ln2·(log2 s − r).
  P.a.lse_p[2 * n] = rp.R;
  P.a.lse_p[2 * n + 1] = float(kLn2 * (l2s - double(rp.r)));
  P.a.lse_q[2 * n] = rq.R;
  P.a.lse_q[2 * n + 1] = float(kLn2 * (l2sq - double(rq.r)));
  const double kl = kLn2 * (w / double(s) - l2s + l2sq);
  P.a.out[n] = float(hole && kl == kl ? kInfD : kl);  // NaN (an undefined row) stays NaN
}

template <typename T>
__global__ void __launch_bounds__(kThreads) fwd_kernel(const FwdParams P) {
  __shared__ float fs[kWarps];
  __shared__ double ds[kWarps];
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
  KlAcc acc;
  stream_segment<T, true, 2>(zrow, qrow, b, e, [&](const float (&z)[N], const float (&zr)[N]) {
    acc.add(z, zr, c);
  });
  // Every thread's sums moved to the block's references, then summed in a fixed order.
  const bool any_hole = block_any(acc.hole, fs);
  acc.move_q(Ref::at(block_max(acc.rq.R, fs), c), c);
  acc.move_p(Ref::at(block_max(acc.rp.R, fs), c), c);
  const float s = block_sum(acc.sp, fs), sq = block_sum(acc.sq, fs);
  const double w = block_sum(acc.sp != 0.f ? acc.W() : 0.0, ds);
  if (threadIdx.x != 0) return;
  if (P.splits == 1) {
    write_row(P, n, acc.rp, s, w, acc.rq, sq, any_hole);
  } else {
    float* h = P.ws + (n * P.splits + part) * kPart;
    h[0] = acc.rp.R;
    h[1] = s;
    h[2] = float(w);
    h[3] = float(w - double(h[2]));
    h[4] = acc.rq.R;
    h[5] = sq;
    h[6] = any_hole ? 1.f : 0.f;
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
  const float c = P.c;
  float mp = -kInf, mq = -kInf;
  for (int s = 0; s < P.splits; ++s) {
    mp = fmaxf(mp, h[s * kPart]);
    mq = fmaxf(mq, h[s * kPart + 4]);
  }
  const Ref rp = Ref::at(mp, c), rq = Ref::at(mq, c);
  float sp = 0.f, sq = 0.f;
  double w = 0.0;
  bool hole = false;
  for (int s = 0; s < P.splits; ++s) {  // each split as a KlAcc moved to (rp, rq)
    const float* p = h + s * kPart;
    KlAcc part;
    part.rp = Ref::at(p[0], c);
    part.rq = Ref::at(p[4], c);
    part.sp = p[1];
    part.sq = p[5];
    part.wx = double(p[2]) + double(p[3]);
    part.move_q(rq, c);
    part.move_p(rp, c);
    sp += part.sp;
    sq += part.sq;
    w += part.sp != 0.f ? part.W() : 0.0;
    hole |= p[6] != 0.f;
  }
  write_row(P, n, rp, sp, w, rq, sq, hole);
}

// One gradient entry in double, where the float form overflows (a finite zr whose
// exponent passes the float range: −FLT_MAX as a mask value).
__device__ inline float careful(const PairExp& pp, const PairExp& pq, float z, float zr,
                                      float g_tau, float kl) {
  const double lp = pp.log2p(z), lq = pq.log2p(zr);
  return float(double(g_tau) * exp2(lp) * (kLn2 * (lp - lq) - double(kl)));
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
  const float c = P.c;
  // p_j (L_j − KL) g/τ with log2 p_j = y_j + log2 K_p, log2 q_j = u_j + log2 K_q (PairExp):
  // = 2^y_j · A · ((y_j − u_j) − D),  A = K_p·ln2·g/τ,  D = KL·log2 e − log2 K_p + log2 K_q.
  const PairExp pp = PairExp::of(a.lse_p + 2 * n, c), pq = PairExp::of(a.lse_q + 2 * n, c);
  const float g_tau = a.grad_out[n] * P.inv_tau;
  const float A = pp.K * kLn2f * g_tau;
  const float D = a.out[n] * kLog2e - pp.log2K + pq.log2K;
  constexpr int N = Vec<T>::N;
  map_segment<T, true, 2>(zrow, qrow, grow, b, e,
                          [&](const float (&z)[N], const float (&zr)[N], int, float (&o)[N]) {
                            float y[N], u[N];
                            pp.ys(z, y);
                            pq.ys(zr, u);
#pragma unroll
                            for (int i = 0; i < N; ++i) {
                              const float p = ex2(y[i]);
                              float v = p * A * ((y[i] - u[i]) - D);
                              if (!(fabsf(v) <= 3.0e38f) && p != 0.f && zr[i] > -kInf && v == v)
                                v = careful(pp, pq, z[i], zr[i], g_tau, a.out[n]);
                              // 0 where p = 0, but a NaN p (NaN row) stays NaN as on the
                              // CPU (p > 0 would zero it)
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
