// CPU kernels of the exact full-vocabulary KL (docs/kernels.md).
// Forward: one pass over z and zr together. With e_v = exp((z_v − M)/τ) under the running
// max M of z, keep Σ e_v and Σ e_v (z_v − zr_v)/τ (rescaled when M grows) beside the
// online log-sum-exp of zr; then KL = Σ e_v (z_v − zr_v)/τ / Σ e_v − (lse_p − lse_q).
// Backward: one pass over z and zr writing (g/τ) p_j (L_j − KL).
#include "full_kl_cpu.h"

#include <algorithm>
#include <vector>

#include "cpu_simd.h"

namespace tike::cpu {
namespace {

TIKE_INLINE void forward_row(const FullKlForwardArgs& a, int64_t r, float* zb, float* qb) {
  if (a.mask && !a.mask[r]) {
    a.out[r] = a.lse_p[r] = a.lse_q[r] = 0.f;
    return;
  }
  const float s = 1.f / a.temperature;
  const void* zrow = row_ptr(a.logits, a.dtype, a.logits_layout, r);
  const void* qrow = row_ptr(a.ref_logits, a.dtype, a.ref_layout, r);
  OnlineLse lp, lq;
  double cross = 0.0;  // Σ e_v (z_v − zr_v)/τ, relative to lp.M like lp.S
  for (int64_t j0 = 0; j0 < a.V; j0 += kTile) {
    const int n = int(std::min<int64_t>(kTile, a.V - j0));
    const int npad = (n + kLanes - 1) / kLanes * kLanes;
    const float* z = tile_src(zrow, a.dtype, j0, n, zb);
    const float* q = tile_src(qrow, a.dtype, j0, n, qb);
    lq.add_tile(q, npad, s);
    const float tm = tile_max(z, npad, lp.nan);
    cross *= lp.raise_max(tm, s);
    if (!(lp.M > -kInf)) continue;
    const vf vM = splat(lp.M);
    const float c = s * kLog2e;
    vf se = vf{}, sc = vf{};
    for (int i = 0; i < npad; i += kLanes) {
      const vf zi = load(z + i), e = vexp2((zi - vM) * c);
      se += e;
      // e = 0 terms (z = −inf) count 0 even where zr = −inf too
      sc += e != 0.f ? e * ((zi - load(q + i)) * s) : vf{};
    }
    lp.S += hsum(se);
    cross += hsum(sc);
  }
  const float lse_p = lp.lse(s), lse_q = lq.lse(s);
  a.lse_p[r] = lse_p;
  a.lse_q[r] = lse_q;
  a.out[r] = float(cross / lp.S - (double(lse_p) - double(lse_q)));
}

TIKE_INLINE void backward_row(const FullKlBackwardArgs& a, int64_t r, float* zb, float* qb) {
  void* grow = static_cast<char*>(a.grad) + r * a.V * elem_size(a.dtype);
  const bool skip = a.mask && !a.mask[r];
  const float s = 1.f / a.temperature;
  const void* zrow = row_ptr(a.logits, a.dtype, a.logits_layout, r);
  const void* qrow = row_ptr(a.ref_logits, a.dtype, a.ref_layout, r);
  const float gs = skip ? 0.f : a.grad_out[r] * s;
  const vf vlp = splat(a.lse_p[r]), dl = splat(a.lse_p[r] - a.lse_q[r] + a.out[r]);
  for (int64_t j0 = 0; j0 < a.V; j0 += kTile) {
    const int n = int(std::min<int64_t>(kTile, a.V - j0));
    const int npad = (n + kLanes - 1) / kLanes * kLanes;
    float* out = tile_dst(grow, a.dtype, j0, n, zb);
    if (skip) {  // masked rows: zero gradient, inputs not read
      std::fill(out, out + n, 0.f);
    } else {
      const float* z = tile_src(zrow, a.dtype, j0, n, zb);
      const float* q = tile_src(qrow, a.dtype, j0, n, qb, 0.f);
      for (int i = 0; i < npad; i += kLanes) {
        const vf zi = load(z + i), p = vexp(zi * s - vlp);
        const vf g = p * ((zi - load(q + i)) * s - dl) * gs;  // p_j (L_j − KL) g/τ
        store(out + i, p != 0.f ? g : vf{});
      }
    }
    finish_tile(grow, a.dtype, j0, n, out, zb);
  }
}

}  // namespace

TIKE_CPU_HOT void full_kl_forward_rows(const FullKlForwardArgs& a, int64_t row_begin,
                                       int64_t row_end) {
  std::vector<float> zb(kTile), qb(kTile);
  for (int64_t r = row_begin; r < row_end; ++r) forward_row(a, r, zb.data(), qb.data());
}

TIKE_CPU_HOT void full_kl_backward_rows(const FullKlBackwardArgs& a, int64_t row_begin,
                                        int64_t row_end) {
  std::vector<float> zb(kTile), qb(kTile);
  for (int64_t r = row_begin; r < row_end; ++r) backward_row(a, r, zb.data(), qb.data());
}

}  // namespace tike::cpu
