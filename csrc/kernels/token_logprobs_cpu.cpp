// CPU kernels of token_logprobs (docs/kernels.md). One pass over z keeps, under the
// running max M, Σ e_v and Σ e_v (z_v − M)/τ with e_v = exp((z_v − M)/τ); then
// lse = M/τ + log Σe and H = log Σe − Σ e (z − M)/τ / Σe, with no cancellation against
// a large lse. The backward makes one pass over z.
#include "token_logprobs_cpu.h"

#include <algorithm>
#include <vector>

#include "cpu_simd.h"

namespace tike::cpu {
namespace {

TIKE_INLINE void forward_row(const TokenLogprobsForwardArgs& a, int64_t r, float* zb) {
  const float s = 1.f / a.temperature;
  const void* zrow = row_ptr(a.logits, a.dtype, a.logits_layout, r);
  OnlineLse lp;
  double rel = 0.0;  // Σ e_v (z_v − M)/τ
  for (int64_t j0 = 0; j0 < a.V; j0 += kTile) {
    const int n = int(std::min<int64_t>(kTile, a.V - j0));
    const int npad = (n + kLanes - 1) / kLanes * kLanes;
    const float* z = tile_src(zrow, a.dtype, j0, n, zb);
    if (!a.entropy) {
      lp.add_tile(z, npad, s);
      continue;
    }
    const float tm = tile_max(z, npad, lp.nan);
    // Moving the max from M to M': e' = e·f and (z − M') = (z − M) + (M − M').
    const float M0 = lp.M;
    const double S0 = lp.S, f = lp.raise_max(tm, s);
    if (lp.M != M0 && S0 != 0.0) rel = f * (rel + S0 * double(M0 - tm) * s);
    if (!(lp.M > -kInf)) continue;
    const vf vM = splat(lp.M);
    vf se = vf{}, sr = vf{};
    for (int i = 0; i < npad; i += kLanes) {
      const vf d = (load(z + i) - vM) * s, e = vexp(d);
      se += e;
      sr += e != 0.f ? e * d : vf{};
    }
    lp.S += hsum(se);
    rel += hsum(sr);
  }
  const float lse = lp.lse(s);
  a.lse[r] = lse;
  a.logp[r] = load_one(zrow, a.dtype, a.tokens[r]) * s - lse;
  if (a.entropy) a.entropy[r] = lp.nan ? kNaN : float(std::log(lp.S) - rel / lp.S);
}

TIKE_INLINE void backward_row(const TokenLogprobsBackwardArgs& a, int64_t r, float* zb) {
  void* grow = static_cast<char*>(a.grad) + r * a.V * elem_size(a.dtype);
  const float s = 1.f / a.temperature, lse = a.lse[r];
  const float g_lp = a.grad_logp ? a.grad_logp[r] : 0.f;
  const float g_h = a.grad_entropy ? a.grad_entropy[r] : 0.f;
  const float H = a.grad_entropy ? a.entropy[r] : 0.f;
  const int64_t tok = a.tokens[r];
  const void* zrow = row_ptr(a.logits, a.dtype, a.logits_layout, r);
  const vf vl = splat(lse);
  for (int64_t j0 = 0; j0 < a.V; j0 += kTile) {
    const int n = int(std::min<int64_t>(kTile, a.V - j0));
    const int npad = (n + kLanes - 1) / kLanes * kLanes;
    const float* z = tile_src(zrow, a.dtype, j0, n, zb);
    float* out = tile_dst(grow, a.dtype, j0, n, zb);
    // −(1/τ) p_j [g_lp + g_H (log p_j + H)]; the token's +g_lp/τ is added below
    for (int i = 0; i < npad; i += kLanes) {
      const vf lpj = load(z + i) * s - vl, p = vexp(lpj);
      const vf gj = p * (g_h * (lpj + H) + g_lp) * -s;
      store(out + i, p != 0.f ? gj : vf{});
    }
    if (tok >= j0 && tok < j0 + n) out[tok - j0] += g_lp * s;
    finish_tile(grow, a.dtype, j0, n, out, zb);
  }
}

}  // namespace

TIKE_CPU_HOT void token_logprobs_forward_rows(const TokenLogprobsForwardArgs& a,
                                              int64_t row_begin, int64_t row_end) {
  std::vector<float> zb(kTile);
  for (int64_t r = row_begin; r < row_end; ++r) forward_row(a, r, zb.data());
}

TIKE_CPU_HOT void token_logprobs_backward_rows(const TokenLogprobsBackwardArgs& a,
                                               int64_t row_begin, int64_t row_end) {
  std::vector<float> zb(kTile);
  for (int64_t r = row_begin; r < row_end; ++r) backward_row(a, r, zb.data());
}

}  // namespace tike::cpu
