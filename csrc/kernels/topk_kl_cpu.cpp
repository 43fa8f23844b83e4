// CPU kernels of topk_kl (docs/kernels.md). Per row:
//   pass 1 over z : online max / sum-exp and the top-k, together, tile by tile;
//   pass 2 over zr: online log-sum-exp (and, with the tail bucket, the tail sums of q and
//                   of p, each an online log-sum-exp of its own over the entries outside
//                   S~, so a tiny tail neither cancels against 1 − head nor underflows);
//   K1 gathers    : the partial KL, its backward coefficients and the audit stats.
// topk_kl_shard (tike_cuda.distributed's local pass) runs both passes and then writes S~
// with its logits, the pairs and the tails instead of the K1 terms.
// The backward makes one pass over z writing the dense gradient, S~ entries included.
// Compiled once per instruction-set path (cpu_simd.h, TIKE_CPU_KERNEL).
#include "topk_kl_cpu.h"

#include <algorithm>
#include <utility>
#include <vector>

#include "cpu_simd.h"
#include "tail_lse_cpu.h"
#include "tike_terms.h"
#include "topk_select_cpu.h"

namespace tike::cpu {
namespace {

struct Scratch {
  std::vector<float> zbuf, qbuf;
  std::vector<std::pair<int32_t, int32_t>> support;  // (index, slot) of S~, by index
  TopK topk;
  RowBlocks blocks;
  Scratch(int64_t k, int64_t V) : zbuf(kTile), qbuf(kTile), topk(k), blocks(V) {}
};

// S~ entries of row n sorted by vocabulary index, so tiles can walk them in order.
inline void sorted_support(const int32_t* idx, int64_t K1, Scratch& sc) {
  sc.support.clear();
  for (int64_t s = 0; s < K1; ++s)
    if (idx[s] >= 0) sc.support.emplace_back(idx[s], int32_t(s));
  std::sort(sc.support.begin(), sc.support.end());
}

// Pass 1: online log-sum-exp of z·s and the block maxima; then the top-k of the raw values.
template <class S>
TIKE_INLINE LsePair scan_policy_row(const void* zrow, DType dt, int64_t V, float s,
                                    Scratch& sc) {
  OnlineLse<S> lse;
  float* buf = sc.zbuf.data();
  for (int64_t j0 = 0; j0 < V; j0 += kTile) {
    const int n = int(std::min<int64_t>(kTile, V - j0));
    const int npad = S::padded(n);
    const float* x = tile_src<S>(zrow, dt, j0, n, buf);
    // Block maxima give both the tile max and the blocks the top-k must look at.
    lse.raise_max(block_maxima<S>(x, npad, j0, sc.blocks, lse.nan), s);
    if (lse.M > -kInf && lse.M < kInf)
      lse.sum += tile_sumexp<S>(x, npad, lse.M, s, next_tile(zrow, dt, j0, V));
  }
  select_row<S>(sc.topk, zrow, dt, V, sc.blocks);
  return lse.pair();
}

struct RefPass {
  LsePair lse_q;
  double log_tail_p = 0.0, log_tail_q = 0.0;  // log Σ_{v∉S~} p_v, log Σ_{v∉S~} q_v
};

// Pass 2: log-sum-exp of zr·s; with the tail bucket also log Σ_{v∉S~} q_v and
// log Σ_{v∉S~} p_v, each an online log-sum-exp over the tile with S~ set to −inf.
template <class S>
TIKE_INLINE RefPass scan_reference_row(const void* zrow, const void* qrow, DType dt,
                                       int64_t V, float s, const LsePair& lse_p, bool tail,
                                       Scratch& sc) {
  OnlineLse<S> lq, tp, tq;
  float* qb = sc.qbuf.data();
  float* zb = sc.zbuf.data();
  const auto& sup = sc.support;
  auto members = member_cursor([&](size_t e) { return int64_t(sup[e].first); }, sup.size());
  for (int64_t j0 = 0; j0 < V; j0 += kTile) {
    const int n = int(std::min<int64_t>(kTile, V - j0));
    const int npad = S::padded(n);
    const float* q = tile_src<S>(qrow, dt, j0, n, qb);
    lq.add_tile(q, npad, s, next_tile(qrow, dt, j0, V));
    if (!tail) continue;
    const float* z = tile_src<S>(zrow, dt, j0, n, zb);
    // S~ entries here: masked in copies of the tiles (the same columns in both)
    const size_t first = members.advance(j0, n);
    q = members.mask(q, npad, j0, first, qb);
    z = members.mask(z, npad, j0, first, zb);
    tq.add_tile(q, npad, s);
    tp.add_tile(z, npad, s, next_tile(zrow, dt, j0, V));
  }
  RefPass out;
  out.lse_q = lq.pair();
  if (tail) {
    out.log_tail_p = log_tail(tp, lse_p, s);
    out.log_tail_q = log_tail(tq, out.lse_q, s);
  }
  return out;
}

// topk_kl_shard's outputs of row r (docs/kernels.md), idx already written: the logits at
// S~, both pairs and the logs of the shard's tail masses. A NaN (or +inf) in either row
// makes both pairs and the tails NaN, as the CUDA kernel's single NaN flag does.
TIKE_INLINE void write_shard_row(const TopkKlForwardArgs& a, int64_t r, const void* zrow,
                                 const void* qrow, LsePair lse_p, RefPass ref) {
  const int32_t* idx = a.idx + r * a.K1;
  float* v = a.shard_values + r * a.K1 * 2;
  for (int64_t slot = 0; slot < a.K1; ++slot) {
    const bool here = idx[slot] >= 0;
    v[2 * slot] = here ? load_one(zrow, a.dtype, idx[slot]) : -kInf;
    v[2 * slot + 1] = here ? load_one(qrow, a.dtype, idx[slot]) : -kInf;
  }
  if (std::isnan(lse_p.max) || std::isnan(ref.lse_q.max)) {
    lse_p = ref.lse_q = LsePair{kNaN, kNaN};
    ref.log_tail_p = ref.log_tail_q = double(kNaN);
  }
  a.lse[2 * r] = lse_p.max;
  a.lse[2 * r + 1] = lse_p.log_sum;
  a.shard_lse_q[2 * r] = ref.lse_q.max;
  a.shard_lse_q[2 * r + 1] = ref.lse_q.log_sum;
  a.shard_tails[2 * r] = a.tail_bucket ? float(ref.log_tail_p) : 0.f;
  a.shard_tails[2 * r + 1] = a.tail_bucket ? float(ref.log_tail_q) : 0.f;
}

// A masked row of topk_kl_shard: S~ empty, pairs and tails 0 (its rows are never read).
TIKE_INLINE void write_masked_shard_row(const TopkKlForwardArgs& a, int64_t r) {
  std::fill(a.shard_values + r * a.K1 * 2, a.shard_values + (r + 1) * a.K1 * 2, -kInf);
  std::fill(a.shard_lse_q + 2 * r, a.shard_lse_q + 2 * r + 2, 0.f);
  std::fill(a.shard_tails + 2 * r, a.shard_tails + 2 * r + 2, 0.f);
}

template <class S>
TIKE_INLINE void forward_row(const TopkKlForwardArgs& a, int64_t r, Scratch& sc) {
  const int64_t K1 = a.K1;
  int32_t* idx = a.idx + r * K1;
  float* coef = a.coef + r * K1;
  float* stats = a.stats + r * 3;
  if (a.mask && !a.mask[r]) {  // masked rows are never read
    a.out[r] = a.shift[r] = a.lse[2 * r] = a.lse[2 * r + 1] = 0.f;
    std::fill(idx, idx + K1, -1);
    if (a.shard_values) write_masked_shard_row(a, r);
    std::fill(coef, coef + K1, 0.f);
    std::fill(stats, stats + 3, 0.f);
    return;
  }
  const float s = 1.f / a.temperature;
  const void* zrow = row_ptr(a.logits, a.dtype, a.logits_layout, r);
  const void* qrow = row_ptr(a.ref_logits, a.dtype, a.ref_layout, r);

  const LsePair lse_p = scan_policy_row<S>(zrow, a.dtype, a.V, s, sc);
  sc.topk.write_sorted(idx);
  const int64_t tok = a.sampled_tokens ? a.sampled_tokens[r] : -1;
  if (K1 > a.k) idx[a.k] = std::find(idx, idx + a.k, int32_t(tok)) == idx + a.k ? tok : -1;
  if (a.tail_bucket) sorted_support(idx, K1, sc);

  const RefPass ref =
      scan_reference_row<S>(zrow, qrow, a.dtype, a.V, s, lse_p, a.tail_bucket, sc);
  if (a.shard_values) {  // topk_kl_shard: the local pass only, without the KL
    write_shard_row(a, r, zrow, qrow, lse_p, ref);
    return;
  }

  double lp_o = 0.0, ratio = 1.0;
  if (tok >= 0) lp_o = lse_p.logp(load_one(zrow, a.dtype, tok), s);
  if (a.old_logprobs) ratio = std::exp(lp_o - double(a.old_logprobs[r]));

  auto lp_at = [&](int64_t slot) { return lse_p.logp(load_one(zrow, a.dtype, idx[slot]), s); };
  auto lq_at = [&](int64_t slot) { return ref.lse_q.logp(load_one(qrow, a.dtype, idx[slot]), s); };
  TikeHead h;
  for (int64_t slot = 0; slot < K1; ++slot)
    if (idx[slot] >= 0) h.add(lp_at(slot), lq_at(slot));
  const TikeTail t = a.tail_bucket ? tike_tail(ref.log_tail_p, ref.log_tail_q) : TikeTail{};
  const double scale = ratio * s;
  for (int64_t slot = 0; slot < K1; ++slot)
    coef[slot] = idx[slot] < 0 ? 0.f : tike_coef(lp_at(slot), lq_at(slot), scale, t.b);
  a.out[r] = float(ratio * (h.D + t.T));
  a.lse[2 * r] = lse_p.max;
  a.lse[2 * r + 1] = lse_p.log_sum;
  a.shift[r] = float(scale * (h.C - h.m_p * t.b));
  stats[0] = float(h.m_p);
  stats[1] = float(lp_o);
  stats[2] = float(h.m_q);
}

template <class S>
TIKE_INLINE void backward_row(const TopkKlBackwardArgs& a, int64_t r, Scratch& sc) {
  using vf = typename S::vf;
  void* grow = row_ptr(a.grad, a.dtype, a.grad_layout, r);
  float* buf = sc.zbuf.data();
  if (a.mask && !a.mask[r]) return zero_row(grow, a.dtype, a.V);  // logits not read
  // p_j = 2^((z_j − M)·c − ℓ·log2 e), c = log2(e)/τ
  const float c = kLog2e / a.temperature, M = a.lse[2 * r], l2 = a.lse[2 * r + 1] * kLog2e;
  const float g = a.grad_out[r], sh = a.shift[r];
  const float* coef = a.coef + r * a.K1;
  sorted_support(a.idx + r * a.K1, a.K1, sc);
  float* patch = sc.qbuf.data();  // S~ values of the current tile (at most K1 <= kTile)
  const void* zrow = row_ptr(a.logits, a.dtype, a.logits_layout, r);
  const vf vM = S::splat(M), vl = S::splat(l2), dense = S::splat(-g * sh);
  size_t sup = 0;
  auto dense_term = [&](vf z, vf) TIKE_LAMBDA_INLINE {
    return S::exp2((z - vM) * c - vl) * dense;
  };
  // Each element is read before it is written, so grad may alias logits (in-place backward).
  for (int64_t j0 = 0; j0 < a.V; j0 += kTile) {
    const int n = int(std::min<int64_t>(kTile, a.V - j0));
    // S~ entries take g · p_j · (coef − shift) from their own logit, read before the
    // dense pass overwrites it; rounding to the output dtype happens once.
    const size_t first = sup;
    for (; sup < sc.support.size() && sc.support[sup].first < j0 + n; ++sup) {
      const float xj = load_one(zrow, a.dtype, sc.support[sup].first);
      const float p = S::exp2(S::splat((xj - M) * c) - vl)[0];
      patch[sup - first] = p != 0.f ? g * p * (coef[sc.support[sup].second] - sh) : 0.f;
    }
    map_tile<S>(grow, zrow, nullptr, a.dtype, j0, n, a.V, buf, nullptr, dense_term);
    for (size_t e = first; e < sup; ++e)
      store_one(grow, a.dtype, sc.support[e].first, patch[e - first]);
  }
}

template <class S>
TIKE_INLINE void forward_rows(const TopkKlForwardArgs& a, int64_t row_begin, int64_t row_end) {
  Scratch sc(std::min(a.k, a.V), a.V);
  for (int64_t r = row_begin; r < row_end; ++r) forward_row<S>(a, r, sc);
}

template <class S>
TIKE_INLINE void backward_rows(const TopkKlBackwardArgs& a, int64_t row_begin,
                               int64_t row_end) {
  Scratch sc(1, 0);
  for (int64_t r = row_begin; r < row_end; ++r) backward_row<S>(a, r, sc);
}

}  // namespace

TIKE_CPU_KERNEL(topk_kl_forward_rows, TopkKlForwardArgs, forward_rows)
TIKE_CPU_KERNEL(topk_kl_backward_rows, TopkKlBackwardArgs, backward_rows)

}  // namespace tike::cpu
