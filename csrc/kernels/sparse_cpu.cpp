// CPU kernels of the fixed-support ops. Both make ONE pass over a row: the online
// log-sum-exp and, beside it, the sum of the terms of the columns outside S~ (the tail
// mass, summed directly so a tiny tail keeps its digits: never 1 − head). S~ arrives
// sorted, so each tile zeroes its members' terms in order. Then K1 gathers.
//   sparse_reference: over the reference row → log q on S~ and log t_q;
//   topk_kl_sparse:   over the policy row → lse_p (and t_p for the tail bucket), then
//                     the TIKE terms of tike_terms.h against the stored log q.
// A row whose S~ is out of range or repeats an index (the glue rejects those on the CPU)
// or whose sampled token is out of range gives NaN, never a read out of bounds; so does a
// row whose distribution is undefined (a NaN, a +inf logit, no finite logit).
#include "sparse_cpu.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu_simd.h"
#include "tike_terms.h"

namespace tike::cpu {
namespace {

struct Scratch {
  std::vector<float> buf = std::vector<float>(kTile + kLanes);
  std::vector<float> terms = std::vector<float>(kTile + kLanes);
  std::vector<int32_t> members;  // S~ of the row, ascending
};

// Whether an ascending row of n indices is strictly increasing inside [0, V) (no index
// twice); with allow_empty, leading −1 entries (empty slots) are allowed.
TIKE_INLINE bool valid_sorted(const int32_t* s, int64_t n, int64_t V, bool allow_empty) {
  int64_t prev = -1;
  for (int64_t i = 0; i < n; ++i) {
    if (s[i] == -1 && allow_empty && prev == -1) continue;
    if (s[i] <= prev || s[i] >= V) return false;
    prev = s[i];
  }
  return true;
}

struct LseTail {
  float lse;    // log Σ_v exp(x_v·s)
  double tail;  // Σ_{v∉S~} exp(x_v·s − lse), summed over the tail terms
};

// One pass over a row: the online log-sum-exp of x·s and, with `want_tail`, the direct
// sum of the terms of the columns not in `members` (ascending, all in [0, V)).
TIKE_INLINE LseTail scan_lse_tail(const void* row, DType dt, int64_t V, float s,
                                  const std::vector<int32_t>& members, bool want_tail,
                                  Scratch& sc) {
  OnlineLse acc;
  double tail = 0.0;  // relative to acc.M, rescaled with acc.S
  float* terms = sc.terms.data();
  size_t m = 0;
  const float c = s * kLog2e;
  for (int64_t j0 = 0; j0 < V; j0 += kTile) {
    const int n = int(std::min<int64_t>(kTile, V - j0));
    const int npad = (n + kLanes - 1) / kLanes * kLanes;
    const float* x = tile_src(row, dt, j0, n, sc.buf.data());
    if (!want_tail) {
      acc.add_tile(x, npad, s);
      continue;
    }
    const float tm = tile_max(x, npad, acc.nan);
    tail *= acc.raise_max(tm, s);
    if (!(acc.M > -kInf)) continue;
    const vf vM = splat(acc.M);
    vf all = vf{};
    for (int i = 0; i < npad; i += kLanes) {
      const vf t = vexp2((load(x + i) - vM) * c);
      store(terms + i, t);
      all += t;
    }
    acc.S += hsum(all);
    for (; m < members.size() && members[m] < j0 + n; ++m) terms[members[m] - j0] = 0.f;
    vf t = vf{};
    for (int i = 0; i < npad; i += kLanes) t += load(terms + i);
    tail += hsum(t);
  }
  return {acc.lse(s), acc.nan ? double(kNaN) : acc.S > 0.0 ? tail / acc.S : 0.0};
}

TIKE_INLINE void reference_row(const SparseReferenceArgs& a, int64_t r, Scratch& sc) {
  const int64_t k = a.k, K1 = a.K1;
  int32_t* idx = a.idx + r * K1;
  float* lq = a.logprobs + r * K1;
  if (a.mask && !a.mask[r]) {  // masked rows are never read: an empty S~, all mass in the tail
    std::fill(idx, idx + K1, -1);
    std::fill(lq, lq + K1, -kInf);
    a.tail_logmass[r] = 0.f;
    return;
  }
  const int32_t* sorted = a.sorted + r * k;
  std::copy(a.support + r * k, a.support + (r + 1) * k, idx);
  const int64_t tok = a.sampled_tokens ? a.sampled_tokens[r] : -1;
  bool bad = !valid_sorted(sorted, k, a.V, false) || (a.sampled_tokens && (tok < 0 || tok >= a.V));
  bool o_extra = false;
  if (K1 > k) {
    o_extra = !bad && !std::binary_search(sorted, sorted + k, int32_t(tok));
    idx[k] = o_extra ? int32_t(tok) : -1;
  }
  if (bad) {
    std::fill(lq, lq + K1, kNaN);
    a.tail_logmass[r] = kNaN;
    return;
  }
  sc.members.assign(sorted, sorted + k);
  if (o_extra)
    sc.members.insert(std::upper_bound(sc.members.begin(), sc.members.end(), int32_t(tok)),
                      int32_t(tok));
  const float s = 1.f / a.temperature;
  const void* qrow = row_ptr(a.ref_logits, a.dtype, a.ref_layout, r);
  const LseTail q = scan_lse_tail(qrow, a.dtype, a.V, s, sc.members, true, sc);
  if (!std::isfinite(q.lse)) {  // a NaN, a +inf or no finite logit: q undefined
    std::fill(lq, lq + K1, kNaN);
    a.tail_logmass[r] = kNaN;
    return;
  }
  for (int64_t slot = 0; slot < K1; ++slot)
    lq[slot] = idx[slot] < 0 ? -kInf : float(double(load_one(qrow, a.dtype, idx[slot])) * s - q.lse);
  a.tail_logmass[r] = float(std::log(q.tail));
}

TIKE_INLINE void write_row(const TopkKlSparseArgs& a, int64_t r, float value) {
  std::fill(a.coef + r * a.K1, a.coef + (r + 1) * a.K1, value);
  std::fill(a.stats + r * 3, a.stats + r * 3 + 3, value);
  a.out[r] = a.lse[r] = a.shift[r] = value;
}

TIKE_INLINE void policy_row(const TopkKlSparseArgs& a, int64_t r, Scratch& sc) {
  if (a.mask && !a.mask[r]) {  // masked rows are never read
    write_row(a, r, 0.f);
    return;
  }
  const int64_t K1 = a.K1;
  const int32_t* idx = a.idx + r * K1;
  const int32_t* sorted = a.sorted + r * K1;
  const float* lq = a.ref_logprobs + r * K1;
  const int64_t tok = a.sampled_tokens ? a.sampled_tokens[r] : -1;
  if (!valid_sorted(sorted, K1, a.V, true) || (a.sampled_tokens && (tok < 0 || tok >= a.V))) {
    write_row(a, r, kNaN);
    return;
  }
  const int32_t* first = std::lower_bound(sorted, sorted + K1, 0);  // skip the empty slots
  sc.members.assign(first, sorted + K1);
  const float s = 1.f / a.temperature;
  const void* zrow = row_ptr(a.logits, a.dtype, a.logits_layout, r);
  const LseTail p = scan_lse_tail(zrow, a.dtype, a.V, s, sc.members, a.tail_bucket, sc);
  if (!std::isfinite(p.lse)) {  // a NaN, a +inf or no finite logit: p undefined
    write_row(a, r, kNaN);
    return;
  }

  double lp_o = 0.0, ratio = 1.0;
  if (tok >= 0) lp_o = double(load_one(zrow, a.dtype, tok)) * s - p.lse;
  if (a.old_logprobs) ratio = std::exp(lp_o - double(a.old_logprobs[r]));
  auto lp_at = [&](int64_t slot) {
    return double(load_one(zrow, a.dtype, idx[slot])) * s - p.lse;
  };
  TikeHead h;
  for (int64_t slot = 0; slot < K1; ++slot)
    if (idx[slot] >= 0) h.add(lp_at(slot), lq[slot]);
  const TikeTail t = a.tail_bucket ? tike_tail(p.tail, a.ref_tail_logmass[r]) : TikeTail{};
  const double scale = ratio * s;
  float* coef = a.coef + r * K1;
  for (int64_t slot = 0; slot < K1; ++slot)
    coef[slot] = idx[slot] < 0 ? 0.f : tike_coef(lp_at(slot), lq[slot], scale, t.b);
  a.out[r] = float(ratio * (h.D + t.T));
  a.lse[r] = p.lse;
  a.shift[r] = float(scale * (h.C - h.m_p * t.b));
  float* stats = a.stats + r * 3;
  stats[0] = float(h.m_p);
  stats[1] = float(lp_o);
  stats[2] = float(h.m_q);
}

}  // namespace

TIKE_CPU_HOT void sparse_reference_rows(const SparseReferenceArgs& a, int64_t row_begin,
                                        int64_t row_end) {
  Scratch sc;
  for (int64_t r = row_begin; r < row_end; ++r) reference_row(a, r, sc);
}

TIKE_CPU_HOT void topk_kl_sparse_rows(const TopkKlSparseArgs& a, int64_t row_begin,
                                      int64_t row_end) {
  Scratch sc;
  for (int64_t r = row_begin; r < row_end; ++r) policy_row(a, r, sc);
}

}  // namespace tike::cpu
