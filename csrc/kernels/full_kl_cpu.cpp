// CPU kernels of the exact full-vocabulary KL (docs/kernels.md).
// Forward: one pass over z and zr together, both kept relative to their running maxima
// (M_p of z, R_q of zr): with e_v = exp((z_v − M_p)/τ), dz_v = (z_v − M_p)/τ and
// dq_v = (zr_v − R_q)/τ, keep Σ e_v and X = Σ e_v (dz_v − dq_v) (rescaled when a max
// grows) beside the online log-sum-exp of zr; then, with ℓ = log Σ exp((x − max)/τ),
//   KL = X / Σe − ℓ_p + ℓ_q.
// Neither z/τ nor z − zr is ever formed, so logits near the float limit or a tiny τ
// cost no digits, and a q_v that underflows where p_v > 0 gives +inf, never NaN.
// Backward: one pass over z and zr writing (g/τ) p_j (L_j − KL).
// Compiled once per instruction-set path (cpu_simd.h, TIKE_CPU_KERNEL).
#include "full_kl_cpu.h"

#include <algorithm>
#include <vector>

#include "cpu_simd.h"

namespace tike::cpu {
namespace {

template <class S>
TIKE_INLINE void forward_row(const FullKlForwardArgs& a, int64_t r, float* zb, float* qb) {
  using vf = typename S::vf;
  if (a.mask && !a.mask[r]) {
    a.out[r] = a.lse_p[2 * r] = a.lse_p[2 * r + 1] = a.lse_q[2 * r] = a.lse_q[2 * r + 1] = 0.f;
    return;
  }
  const float s = 1.f / a.temperature;
  const void* zrow = row_ptr(a.logits, a.dtype, a.logits_layout, r);
  const void* qrow = row_ptr(a.ref_logits, a.dtype, a.ref_layout, r);
  OnlineLse<S> lp, lq;
  float Rq = 0.f;   // reference point of dq: lq.M once that is finite
  double X = 0.0;   // Σ e_v (dz_v − dq_v), relative to lp.M and Rq
  for (int64_t j0 = 0; j0 < a.V; j0 += kTile) {
    const int n = int(std::min<int64_t>(kTile, a.V - j0));
    const int npad = S::padded(n);
    const float* z = tile_src<S>(zrow, a.dtype, j0, n, zb);
    const float* q = tile_src<S>(qrow, a.dtype, j0, n, qb);
    lq.add_tile(q, npad, s);
    if (lq.M > -kInf && lq.M < kInf && lq.M != Rq) {  // dq_v of earlier terms drop by ΔR/τ
      if (lp.sum > 0.0) X += (double(lq.M) - double(Rq)) * s * lp.sum;
      Rq = lq.M;
    }
    const float M0 = lp.M;
    const double S0 = lp.sum;
    const float tm = tile_max<S>(z, npad, lp.nan);
    const double f = lp.raise_max(tm, s);  // dz_v of earlier terms drop by ΔM/τ
    if (lp.M != M0 && S0 > 0.0) X = f * (X + S0 * (double(M0) - double(lp.M)) * s);
    if (!(lp.M > -kInf && lp.M < kInf)) continue;
    const vf vM = S::splat(lp.M), vR = S::splat(Rq);
    const float c = s * kLog2e;
    vf se = vf{}, sx = vf{};
    // Min of zr over the lanes where z > −inf (0·(z − M) is NaN where z = −inf, and a NaN
    // never wins the min): −inf there means q_v = 0 < p_v. Float ops only: GCC 12 lowers
    // the integer-mask version of this test element by element on AVX-512.
    vf q_min = S::splat(kInf);
    const NextTile next_z = next_tile(zrow, a.dtype, j0, a.V);
    const NextTile next_q = next_tile(qrow, a.dtype, j0, a.V);
    for (int i = 0; i < npad; i += S::kLanes) {
      next_z.at(i);
      next_q.at(i);
      const vf zi = S::load(z + i), qi = S::load(q + i), d = zi - vM, e = S::exp2(d * c);
      se += e;
      // e = 0 terms (z far below its max, or −inf) count 0, even where zr = −inf too.
      // (e/τ)·(zr − R) before a sum: (zr − R)/τ alone overflows for zr = −FLT_MAX (a
      // common mask value) while its product with e may not.
      const vf es = e * s;
      sx += e != 0.f ? es * d - es * (qi - vR) : vf{};
      const vf qz = qi + d * 0.f;
      q_min = qz < q_min ? qz : q_min;
    }
    // q_v = 0 < p_v makes the KL +inf, also where p_v underflows in float (e = 0).
    if (S::hmin(q_min) == -kInf) X = double(kInf);
    lp.sum += S::hsum(se);
    X += S::hsum(sx);
  }
  const LsePair pp = lp.pair(), pq = lq.pair();
  a.lse_p[2 * r] = pp.max;
  a.lse_p[2 * r + 1] = pp.log_sum;
  a.lse_q[2 * r] = pq.max;
  a.lse_q[2 * r + 1] = pq.log_sum;
  a.out[r] = float(X / lp.sum - lp.log_sum() + lq.log_sum());
}

template <class S>
TIKE_INLINE void backward_row(const FullKlBackwardArgs& a, int64_t r, float* zb, float* qb) {
  using vf = typename S::vf;
  void* grow = static_cast<char*>(a.grad) + r * a.V * elem_size(a.dtype);
  if (a.mask && !a.mask[r]) return zero_row(grow, a.dtype, a.V);  // inputs not read
  const float s = 1.f / a.temperature;
  const void* zrow = row_ptr(a.logits, a.dtype, a.logits_layout, r);
  const void* qrow = row_ptr(a.ref_logits, a.dtype, a.ref_layout, r);
  const float gs = a.grad_out[r] * s;
  const float Mp = a.lse_p[2 * r], lp = a.lse_p[2 * r + 1];
  const float Mq = a.lse_q[2 * r], lq = a.lse_q[2 * r + 1];
  // p_j = exp(dz_j − ℓ_p), p_j (L_j − KL) = p_j (dz_j − (ℓ_p − ℓ_q + KL)) − (p_j/τ)(zr_j − M_q)
  const vf vMp = S::splat(Mp), vMq = S::splat(Mq), vlp = S::splat(lp);
  const vf dl = S::splat(lp - lq + a.out[r]);
  auto term = [&](vf z, vf q) TIKE_LAMBDA_INLINE {
    const vf dz = (z - vMp) * s, p = S::exp(dz - vlp);
    const vf g = (p * (dz - dl) - (p * s) * (q - vMq)) * gs;
    return p != 0.f ? g : vf{};
  };
  for (int64_t j0 = 0; j0 < a.V; j0 += kTile) {
    const int n = int(std::min<int64_t>(kTile, a.V - j0));
    map_tile<S>(grow, zrow, qrow, a.dtype, j0, n, a.V, zb, qb, term);
  }
}

template <class S>
TIKE_INLINE void forward_rows(const FullKlForwardArgs& a, int64_t row_begin, int64_t row_end) {
  std::vector<float> zb(kTile), qb(kTile);
  for (int64_t r = row_begin; r < row_end; ++r) forward_row<S>(a, r, zb.data(), qb.data());
}

template <class S>
TIKE_INLINE void backward_rows(const FullKlBackwardArgs& a, int64_t row_begin,
                               int64_t row_end) {
  std::vector<float> zb(kTile), qb(kTile);
  for (int64_t r = row_begin; r < row_end; ++r) backward_row<S>(a, r, zb.data(), qb.data());
}

}  // namespace

TIKE_CPU_KERNEL(full_kl_forward_rows, FullKlForwardArgs, forward_rows)
TIKE_CPU_KERNEL(full_kl_backward_rows, FullKlBackwardArgs, backward_rows)

}  // namespace tike::cpu
