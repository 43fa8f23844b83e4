// CUDA kernels and launchers of token_logprobs: log p(token) and the entropy of p
// (torch-free, header-only). See docs/kernels.md.
//
// Forward: one pass over z keeping, per thread, Σ e_v and Σ e_v y_v with y_v = z_v·c − E,
// e_v = 2^y_v, under a lazily moved reference (common.cuh: Ref; weights relative to it,
// as the entropy lse − E_p[z/τ] would otherwise cancel two large numbers). Backward: one
// pass over z writing (1/τ)[g_lp (1[j = o] − p_j) − g_H p_j (log p_j + H)] with p_j from
// the saved (M, ℓ) pair (PairExp: one FFMA and one EX2 per element where ordinary).
#pragma once
#include <climits>

#include "common.cuh"
#include "token_logprobs_args.h"

namespace tike::cuda {

namespace token_logprobs_detail {

constexpr int kPart = 3;  // floats per partial: R, s, w

struct FwdParams {
  TokenLogprobsForwardArgs a;
  int splits, seg;
  float c, inv_tau;
  float* ws;
};

// The row from its sums relative to ref: Σ 2^y = s, Σ 2^y·y = w (y = z·c − E).
template <typename T>
__device__ __forceinline__ void write_row(const FwdParams& P, int64_t n, const Ref& ref, float s,
                                          float w) {
  const TokenLogprobsForwardArgs& a = P.a;
  const double l2s = log2(double(s));
  // The saved pair (M, ℓ) of docs/kernels.md: M = R, ℓ = log Σ exp((z − R)/τ) =
  // ln2·(log2 s − r) (E = R·c − r).
  a.lse[2 * n] = ref.R;
  a.lse[2 * n + 1] = float(kLn2 * (l2s - double(ref.r)));
  const int64_t o = a.tokens[n];
  if (o >= 0 && o < a.V) {
    const T* zrow = row_base<T>(a.logits, a.logits_layout, n);
    // ln2·((z_o·c − E) − log2 s) in double, from z_o − R: log p keeps its digits however
    // large z/τ is; z_o/τ − lse would cancel two huge numbers.
    a.logp[n] = float(kLn2 * (ref.exponent_d(load1(zrow + o), P.c) - l2s));
  } else {
    a.logp[n] = NAN;  // a token out of range poisons its row instead of reading out of bounds
  }
  if (a.entropy) a.entropy[n] = float(kLn2 * (l2s - double(w) / double(s)));
}

template <typename T>
__global__ void __launch_bounds__(kThreads) fwd_kernel(const FwdParams P) {
  __shared__ float fs[kWarps];
  const TokenLogprobsForwardArgs& a = P.a;
  const int64_t n = int64_t(blockIdx.x) / P.splits;
  const int part = int(int64_t(blockIdx.x) % P.splits);
  const T* zrow = row_base<T>(a.logits, a.logits_layout, n);
  const int b = part * P.seg, e = min(int(a.V), b + P.seg);
  const float c = P.c;
  constexpr int N = Vec<T>::N;
  LazyLseRel acc;
  stream_segment<T, false, 4>(zrow, zrow, b, e,
                              [&](const float (&z)[N], const float (&)[N]) { acc.add(z, c); });
  // Move every thread to the block's reference, then sum in a fixed order.
  const Ref ref = Ref::at(block_max(acc.ref.R, fs), c);
  acc.move_to(ref, c);
  const float s = block_sum(acc.s, fs), w = block_sum(acc.s != 0.f ? acc.w : 0.f, fs);
  if (threadIdx.x != 0) return;
  if (P.splits == 1) {
    write_row<T>(P, n, ref, s, w);
  } else {
    float* h = P.ws + (n * P.splits + part) * kPart;
    h[0] = ref.R;
    h[1] = s;
    h[2] = w;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) combine_kernel(const FwdParams P) {
  const int64_t n = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (n >= P.a.N) return;
  const float* h = P.ws + n * P.splits * kPart;
  float R = -kInf;
  for (int s = 0; s < P.splits; ++s) R = fmaxf(R, h[s * kPart]);
  const Ref ref = Ref::at(R, P.c);
  float s_ = 0.f, w = 0.f;
  for (int s = 0; s < P.splits; ++s) {
    LazyLseRel r;
    r.ref = Ref::at(h[s * kPart], P.c);
    r.s = h[s * kPart + 1];
    r.w = h[s * kPart + 2];
    r.move_to(ref, P.c);
    s_ += r.s;
    w += r.s != 0.f ? r.w : 0.f;
  }
  write_row<T>(P, n, ref, s_, w);
}

struct BwdParams {
  TokenLogprobsBackwardArgs a;
  int splits, seg;
  float c, inv_tau;
};

template <typename T>
__global__ void __launch_bounds__(kThreads) bwd_kernel(const BwdParams P) {
  const TokenLogprobsBackwardArgs& a = P.a;
  const int64_t n = int64_t(blockIdx.x) / P.splits;
  const int part = int(int64_t(blockIdx.x) % P.splits);
  const int b = part * P.seg, e = min(int(a.V), b + P.seg);
  T* grow = static_cast<T*>(a.grad) + n * a.V;
  const T* zrow = row_base<T>(a.logits, a.logits_layout, n);
  const float s = P.inv_tau, c = P.c;
  const PairExp pe = PairExp::of(a.lse + 2 * n, c);  // log2 p_j = y_j + log2 K
  const float g_lp = a.grad_logp ? a.grad_logp[n] : 0.f;
  const float g_h = a.grad_entropy ? a.grad_entropy[n] : 0.f;
  const float H = a.grad_entropy ? a.entropy[n] : 0.f;
  const int64_t tok = a.tokens[n];
  const int o = (tok >= 0 && tok < a.V) ? int(tok) : -1;
  const float at_o = g_lp * s;
  // −(1/τ) p_j [g_lp + g_H (log p_j + H)] = 2^y_j·(A·y_j + B), log p_j = ln2·(y_j + log2 K)
  const float A = -s * pe.K * g_h * kLn2f;
  const float B = -s * pe.K * (g_h * (kLn2f * pe.log2K + H) + g_lp);
  constexpr int N = Vec<T>::N;
  map_segment<T, false, 4>(zrow, zrow, grow, b, e,
                           [&](const float (&z)[N], const float (&)[N], int j0, float (&out)[N]) {
                             float y[N];
                             pe.ys(z, y);
#pragma unroll
                             for (int i = 0; i < N; ++i) {
                               const float p = ex2(y[i]);
                               // p != 0, not p > 0: a NaN row's gradient stays NaN (CPU)
                               out[i] = (p != 0.f ? p * __fmaf_rn(A, y[i], B) : 0.f) +
                                        (j0 + i == o ? at_o : 0.f);
                             }
                           });
}

}  // namespace token_logprobs_detail

inline size_t token_logprobs_forward_workspace_bytes(const TokenLogprobsForwardArgs& a) {
  const RowSplit rs = plan_row_split(a.N, a.V, 64);
  return rs.splits > 1 ? size_t(a.N) * rs.splits * token_logprobs_detail::kPart * sizeof(float)
                       : 0;
}

template <typename T>
inline void token_logprobs_launch_fwd(const token_logprobs_detail::FwdParams& P, cudaStream_t st) {
  TIKE_LAUNCH(token_logprobs_detail::fwd_kernel<T>, unsigned(P.a.N * P.splits), kThreads, 0, st, P);
  if (P.splits > 1)
    TIKE_LAUNCH(token_logprobs_detail::combine_kernel<T>,
                unsigned((P.a.N + kThreads - 1) / kThreads), kThreads, 0, st, P);
}

inline cudaError_t token_logprobs_forward(const TokenLogprobsForwardArgs& a, void* workspace,
                                          cudaStream_t stream) {
  if (a.N == 0) return cudaSuccess;
  const RowSplit rs = plan_row_split(a.N, a.V, 64);
  if (!(a.temperature > 0.f) || a.V < 1 || a.V >= (int64_t(1) << 30) ||
      a.N * rs.splits >= int64_t(INT_MAX) || (rs.splits > 1 && workspace == nullptr))
    return cudaErrorInvalidValue;
  token_logprobs_detail::FwdParams P;
  P.a = a;
  P.splits = rs.splits;
  P.seg = rs.seg;
  P.c = kLog2e / a.temperature;
  P.inv_tau = 1.f / a.temperature;
  P.ws = static_cast<float*>(workspace);
  switch (a.dtype) {
    case DType::Float32: token_logprobs_launch_fwd<float>(P, stream); break;
    case DType::BFloat16: token_logprobs_launch_fwd<__nv_bfloat16>(P, stream); break;
    case DType::Float16: token_logprobs_launch_fwd<__half>(P, stream); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

inline cudaError_t token_logprobs_backward(const TokenLogprobsBackwardArgs& a,
                                           cudaStream_t stream) {
  if (a.N == 0) return cudaSuccess;
  const RowSplit rs = plan_row_split(a.N, a.V, 64);
  if (!(a.temperature > 0.f) || a.V < 1 || a.V >= (int64_t(1) << 30) ||
      a.N * rs.splits >= int64_t(INT_MAX))
    return cudaErrorInvalidValue;
  token_logprobs_detail::BwdParams P;
  P.a = a;
  P.splits = rs.splits;
  P.seg = rs.seg;
  P.c = kLog2e / a.temperature;
  P.inv_tau = 1.f / a.temperature;
  const unsigned grid = unsigned(a.N * rs.splits);
  switch (a.dtype) {
    case DType::Float32:
      TIKE_LAUNCH(token_logprobs_detail::bwd_kernel<float>, grid, kThreads, 0, stream, P);
      break;
    case DType::BFloat16:
      TIKE_LAUNCH(token_logprobs_detail::bwd_kernel<__nv_bfloat16>, grid, kThreads, 0, stream, P);
      break;
    case DType::Float16:
      TIKE_LAUNCH(token_logprobs_detail::bwd_kernel<__half>, grid, kThreads, 0, stream, P);
      break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace tike::cuda
