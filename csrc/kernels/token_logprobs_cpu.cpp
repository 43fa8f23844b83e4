// CPU kernels of token_logprobs (docs/kernels.md). One pass over z keeps, under the
// running max M, Σ e_v and Σ e_v (z_v − M)/τ with e_v = exp((z_v − M)/τ); then, with
// ℓ = log Σe, log p_o = (z_o − M)/τ − ℓ and H = ℓ − Σ e (z − M)/τ / Σe: no cancellation
// against a large lse, and z/τ is never formed. The backward makes one pass over z.
// Compiled once per instruction-set path (cpu_simd.h, TIKE_CPU_KERNEL).
#include "token_logprobs_cpu.h"

#include <algorithm>
#include <vector>

#include "cpu_simd.h"

namespace tike::cpu {
namespace {

template <class S>
TIKE_INLINE void forward_row(const TokenLogprobsForwardArgs& a, int64_t r, float* zb) {
  using vf = typename S::vf;
  const float s = 1.f / a.temperature;
  const void* zrow = row_ptr(a.logits, a.dtype, a.logits_layout, r);
  OnlineLse<S> lp;
  double rel = 0.0;  // Σ e_v (z_v − M)/τ
  for (int64_t j0 = 0; j0 < a.V; j0 += kTile) {
    const int n = int(std::min<int64_t>(kTile, a.V - j0));
    const int npad = S::padded(n);
    const float* z = tile_src<S>(zrow, a.dtype, j0, n, zb);
    if (!a.entropy) {
      lp.add_tile(z, npad, s, next_tile(zrow, a.dtype, j0, a.V));
      continue;
    }
    const float tm = tile_max<S>(z, npad, lp.nan);
    // Moving the max from M to M': e' = e·f and (z − M') = (z − M) + (M − M').
    const float M0 = lp.M;
    const double S0 = lp.sum, f = lp.raise_max(tm, s);
    if (lp.M != M0 && S0 != 0.0) rel = f * (rel + S0 * (double(M0) - double(tm)) * s);
    if (!(lp.M > -kInf && lp.M < kInf)) continue;
    const vf vM = S::splat(lp.M);
    vf se = vf{}, sr = vf{};
    const NextTile next = next_tile(zrow, a.dtype, j0, a.V);
    for (int i = 0; i < npad; i += S::kLanes) {
      next.at(i);
      const vf d = (S::load(z + i) - vM) * s, e = S::exp(d);
      se += e;
      sr += e != 0.f ? e * d : vf{};
    }
    lp.sum += S::hsum(se);
    rel += S::hsum(sr);
  }
  const LsePair pair = lp.pair();
  a.lse[2 * r] = pair.max;
  a.lse[2 * r + 1] = pair.log_sum;
  a.logp[r] = float(pair.logp(load_one(zrow, a.dtype, a.tokens[r]), s));
  if (a.entropy) a.entropy[r] = float(lp.log_sum() - rel / lp.sum);
}

template <class S>
TIKE_INLINE void backward_row(const TokenLogprobsBackwardArgs& a, int64_t r, float* zb) {
  using vf = typename S::vf;
  void* grow = static_cast<char*>(a.grad) + r * a.V * elem_size(a.dtype);
  const float s = 1.f / a.temperature, M = a.lse[2 * r], l = a.lse[2 * r + 1];
  const float g_lp = a.grad_logp ? a.grad_logp[r] : 0.f;
  const float g_h = a.grad_entropy ? a.grad_entropy[r] : 0.f;
  const float H = a.grad_entropy ? a.entropy[r] : 0.f;
  const int64_t tok = a.tokens[r];
  const void* zrow = row_ptr(a.logits, a.dtype, a.logits_layout, r);
  const vf vM = S::splat(M), vl = S::splat(l);
  // p_j = 2^((z_j − M)·c − ℓ·log2 e), c = log2(e)/τ (the exp's own scale folded in)
  const float c = s * kLog2e;
  const vf vl2 = S::splat(l * kLog2e), dense = S::splat(-g_lp * s);
  // −(1/τ) p_j [g_lp + g_H (log p_j + H)]; the token's +g_lp/τ is added after.
  // No entropy gradient (the common case): one exp2.
  auto lp_only = [&](vf z, vf) TIKE_LAMBDA_INLINE {
    const vf p = S::exp2((z - vM) * c - vl2);
    return p != 0.f ? p * dense : vf{};
  };
  auto with_entropy = [&](vf z, vf) TIKE_LAMBDA_INLINE {
    const vf lpj = (z - vM) * s - vl, p = S::exp(lpj);
    const vf gj = p * (g_h * (lpj + H) + g_lp) * -s;
    return p != 0.f ? gj : vf{};
  };
  auto row = [&](auto f) TIKE_LAMBDA_INLINE {
    for (int64_t j0 = 0; j0 < a.V; j0 += kTile) {
      const int n = int(std::min<int64_t>(kTile, a.V - j0));
      const bool here = tok >= j0 && tok < j0 + n;
      const float zt = here ? load_one(zrow, a.dtype, tok) : 0.f;  // before grad overwrites it
      map_tile<S>(grow, zrow, nullptr, a.dtype, j0, n, a.V, zb, nullptr, f);
      if (here) store_one(grow, a.dtype, tok, f(S::splat(zt), vf{})[0] + g_lp * s);
    }
  };
  if (g_h == 0.f) row(lp_only);
  else row(with_entropy);
}

template <class S>
TIKE_INLINE void forward_rows(const TokenLogprobsForwardArgs& a, int64_t row_begin,
                              int64_t row_end) {
  std::vector<float> zb(kTile);
  for (int64_t r = row_begin; r < row_end; ++r) forward_row<S>(a, r, zb.data());
}

template <class S>
TIKE_INLINE void backward_rows(const TokenLogprobsBackwardArgs& a, int64_t row_begin,
                               int64_t row_end) {
  std::vector<float> zb(kTile);
  for (int64_t r = row_begin; r < row_end; ++r) backward_row<S>(a, r, zb.data());
}

}  // namespace

TIKE_CPU_KERNEL(token_logprobs_forward_rows, TokenLogprobsForwardArgs, forward_rows)
TIKE_CPU_KERNEL(token_logprobs_backward_rows, TokenLogprobsBackwardArgs, backward_rows)

}  // namespace tike::cpu
