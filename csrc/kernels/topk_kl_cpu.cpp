// CPU kernels of topk_kl (docs/kernels.md). Per row:
//   pass 1 over z : online max / sum-exp and the top-k, together, tile by tile;
//   pass 2 over zr: online log-sum-exp (and, with the tail bucket, the tail sums of q and
//                   of p taken directly, so a tiny tail does not cancel against 1 − head);
//   K1 gathers    : the partial KL, its backward coefficients and the audit stats.
// The backward makes one pass over z writing the dense gradient, S~ entries included.
#include "topk_kl_cpu.h"

#include <algorithm>
#include <utility>
#include <vector>

#include "cpu_simd.h"
#include "topk_select_cpu.h"

namespace tike::cpu {
namespace {

struct Scratch {
  std::vector<float> zbuf, qbuf;
  std::vector<std::pair<int32_t, int32_t>> support;  // (index, slot) of S~, by index
  TopK topk;
  explicit Scratch(int64_t k) : zbuf(kTile + kBlock), qbuf(kTile + kBlock), topk(k) {}
};

// S~ entries of row n sorted by vocabulary index, so tiles can walk them in order.
TIKE_INLINE void sorted_support(const int32_t* idx, int64_t K1, Scratch& sc) {
  sc.support.clear();
  for (int64_t s = 0; s < K1; ++s)
    if (idx[s] >= 0) sc.support.emplace_back(idx[s], int32_t(s));
  std::sort(sc.support.begin(), sc.support.end());
}

// Pass 1: online log-sum-exp of z·s and the top-k of the raw values.
TIKE_INLINE float scan_policy_row(const void* zrow, DType dt, int64_t V, float s,
                                  Scratch& sc) {
  OnlineLse lse;
  TopK& topk = sc.topk;
  topk.clear();
  float* buf = sc.zbuf.data();
  float bmax[kTile / kBlock];
  for (int64_t j0 = 0; j0 < V; j0 += kTile) {
    const int n = int(std::min<int64_t>(kTile, V - j0));
    const int npad = (n + kLanes - 1) / kLanes * kLanes;
    const float* x = tile_src(zrow, dt, j0, n, buf);
    // Block maxima give both the tile max and the blocks the top-k must look at.
    const float tm = block_maxima(x, npad, bmax, lse.nan);
    lse.raise_max(tm, s);
    if (lse.M > -kInf) lse.S += tile_sumexp(x, npad, lse.M, s);
    offer_blocks(topk, x, n, j0, bmax);
  }
  return lse.lse(s);
}

struct RefPass {
  float lse_q = 0.f;
  double tail_p = 0.0, tail_q = 0.0;
};

// Pass 2: log-sum-exp of zr·s; with the tail bucket also Σ_{v∉S~} q_v and Σ_{v∉S~} p_v,
// each a direct sum of tail terms (S~ terms zeroed in the tile), never 1 − head.
TIKE_INLINE RefPass scan_reference_row(const void* zrow, const void* qrow, DType dt,
                                       int64_t V, float s, float lse_p, bool tail,
                                       Scratch& sc) {
  OnlineLse lq;
  double tail_q = 0.0, tail_p = 0.0;  // tail_q relative to lq.M, rescaled with lq.S
  float* qb = sc.qbuf.data();
  float* zb = sc.zbuf.data();
  size_t sup = 0;
  for (int64_t j0 = 0; j0 < V; j0 += kTile) {
    const int n = int(std::min<int64_t>(kTile, V - j0));
    const int npad = (n + kLanes - 1) / kLanes * kLanes;
    const float* q = tile_src(qrow, dt, j0, n, qb);
    if (!tail) {
      lq.add_tile(q, npad, s);
      continue;
    }
    const float tm = tile_max(q, npad, lq.nan);
    tail_q *= lq.raise_max(tm, s);
    if (!(lq.M > -kInf)) continue;
    const float* z = tile_src(zrow, dt, j0, n, zb);
    const vf vM = splat(lq.M), vl = splat(lse_p);
    const float c = s * kLog2e;
    for (int i = 0; i < npad; i += kLanes) {  // q and p terms into the scratch tiles
      store(qb + i, vexp2((load(q + i) - vM) * c));
      store(zb + i, vexp((load(z + i) * s - vl)));
    }
    vf all_q = vf{};
    for (int i = 0; i < npad; i += kLanes) all_q += load(qb + i);
    lq.S += hsum(all_q);
    size_t e = sup;
    for (; e < sc.support.size() && sc.support[e].first < j0 + n; ++e) {
      qb[sc.support[e].first - j0] = 0.f;
      zb[sc.support[e].first - j0] = 0.f;
    }
    sup = e;
    vf tq = vf{}, tp = vf{};
    for (int i = 0; i < npad; i += kLanes) {
      tq += load(qb + i);
      tp += load(zb + i);
    }
    tail_q += hsum(tq);
    tail_p += hsum(tp);
  }
  RefPass out;
  out.lse_q = lq.lse(s);
  out.tail_q = lq.S > 0.0 ? tail_q / lq.S : 0.0;
  out.tail_p = tail_p;
  return out;
}

TIKE_INLINE void forward_row(const TopkKlForwardArgs& a, int64_t r, Scratch& sc) {
  const int64_t K1 = a.K1;
  int32_t* idx = a.idx + r * K1;
  float* coef = a.coef + r * K1;
  float* stats = a.stats + r * 3;
  if (a.mask && !a.mask[r]) {  // masked rows are never read
    a.out[r] = a.lse[r] = a.shift[r] = 0.f;
    std::fill(idx, idx + K1, -1);
    std::fill(coef, coef + K1, 0.f);
    std::fill(stats, stats + 3, 0.f);
    return;
  }
  const float s = 1.f / a.temperature;
  const void* zrow = row_ptr(a.logits, a.dtype, a.logits_layout, r);
  const void* qrow = row_ptr(a.ref_logits, a.dtype, a.ref_layout, r);

  const float lse_p = scan_policy_row(zrow, a.dtype, a.V, s, sc);
  sc.topk.write_sorted(idx);
  const int64_t tok = a.sampled_tokens ? a.sampled_tokens[r] : -1;
  if (K1 > a.k) idx[a.k] = std::find(idx, idx + a.k, int32_t(tok)) == idx + a.k ? tok : -1;
  sorted_support(idx, K1, sc);

  const RefPass ref =
      scan_reference_row(zrow, qrow, a.dtype, a.V, s, lse_p, a.tail_bucket, sc);

  double lp_o = 0.0, ratio = 1.0;
  if (tok >= 0) lp_o = double(load_one(zrow, a.dtype, tok)) * s - lse_p;
  if (a.old_logprobs) ratio = std::exp(lp_o - double(a.old_logprobs[r]));

  double D = 0.0, C = 0.0, m_p = 0.0, m_q = 0.0;
  for (int64_t slot = 0; slot < K1; ++slot) {
    coef[slot] = 0.f;
    if (idx[slot] < 0) continue;
    const double lp = double(load_one(zrow, a.dtype, idx[slot])) * s - lse_p;
    const double lq = double(load_one(qrow, a.dtype, idx[slot])) * s - ref.lse_q;
    const double p = std::exp(lp), q = std::exp(lq);
    m_p += p;
    m_q += q;
    if (p != 0.0) {  // 0 · log 0 counts as 0 (a NaN p stays NaN)
      D += p * (lp - lq);
      C += p * (lp - lq + 1.0);
    }
  }
  double T = 0.0, b = 0.0;
  if (a.tail_bucket && ref.tail_p > 0.0) {
    const double log_ratio = std::log(ref.tail_p) - std::log(ref.tail_q);
    T = ref.tail_p * log_ratio;
    b = log_ratio + 1.0;
  }
  const double scale = ratio * s;
  for (int64_t slot = 0; slot < K1; ++slot) {
    if (idx[slot] < 0) continue;
    const double lp = double(load_one(zrow, a.dtype, idx[slot])) * s - lse_p;
    const double lq = double(load_one(qrow, a.dtype, idx[slot])) * s - ref.lse_q;
    if (std::exp(lp) != 0.0) coef[slot] = float(scale * (lp - lq + 1.0 - b));
  }
  a.out[r] = float(ratio * (D + T));
  a.lse[r] = lse_p;
  a.shift[r] = float(scale * (C - m_p * b));
  stats[0] = float(m_p);
  stats[1] = float(lp_o);
  stats[2] = float(m_q);
}

TIKE_INLINE void backward_row(const TopkKlBackwardArgs& a, int64_t r, Scratch& sc) {
  void* grow = row_ptr(a.grad, a.dtype, a.grad_layout, r);
  float* buf = sc.zbuf.data();
  if (a.mask && !a.mask[r]) {  // masked rows: zero gradient, logits not read
    std::fill(buf, buf + kTile, 0.f);
    for (int64_t j0 = 0; j0 < a.V; j0 += kTile)
      store_tile(grow, a.dtype, j0, int(std::min<int64_t>(kTile, a.V - j0)), buf);
    return;
  }
  const float s = 1.f / a.temperature, lse = a.lse[r];
  const float g = a.grad_out[r], sh = a.shift[r];
  const float* coef = a.coef + r * a.K1;
  sorted_support(a.idx + r * a.K1, a.K1, sc);
  float* patch = sc.qbuf.data();  // S~ values of the current tile (at most K1 <= kTile)
  const void* zrow = row_ptr(a.logits, a.dtype, a.logits_layout, r);
  const vf vl = splat(lse), dense = splat(-g * sh);
  size_t sup = 0;
  // Each tile is read before it is written, so grad may alias logits (in-place backward).
  for (int64_t j0 = 0; j0 < a.V; j0 += kTile) {
    const int n = int(std::min<int64_t>(kTile, a.V - j0));
    const int npad = (n + kLanes - 1) / kLanes * kLanes;
    const float* x = tile_src(zrow, a.dtype, j0, n, buf);
    float* out = tile_dst(grow, a.dtype, j0, n, buf);
    // S~ entries take g · p_j · (coef − shift) from their own logit, read before the
    // dense pass overwrites it; rounding to the output dtype happens once.
    const size_t first = sup;
    for (; sup < sc.support.size() && sc.support[sup].first < j0 + n; ++sup) {
      const float p = sexp(x[sc.support[sup].first - j0] * s - lse);
      patch[sup - first] = p != 0.f ? g * p * (coef[sc.support[sup].second] - sh) : 0.f;
    }
    for (int i = 0; i < npad; i += kLanes) store(out + i, vexp(load(x + i) * s - vl) * dense);
    for (size_t e = first; e < sup; ++e) out[sc.support[e].first - j0] = patch[e - first];
    finish_tile(grow, a.dtype, j0, n, out, buf);
  }
}

}  // namespace

TIKE_CPU_HOT void topk_kl_forward_rows(const TopkKlForwardArgs& a, int64_t row_begin,
                                       int64_t row_end) {
  Scratch sc(std::min(a.k, a.V));
  for (int64_t r = row_begin; r < row_end; ++r) forward_row(a, r, sc);
}

TIKE_CPU_HOT void topk_kl_backward_rows(const TopkKlBackwardArgs& a, int64_t row_begin,
                                        int64_t row_end) {
  Scratch sc(1);
  for (int64_t r = row_begin; r < row_end; ++r) backward_row(a, r, sc);
}

}  // namespace tike::cpu
