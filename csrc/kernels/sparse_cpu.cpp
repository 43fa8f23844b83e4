// CPU kernels of the fixed-support ops. Both make ONE pass over a row: the online
// log-sum-exp and, beside it, the tail mass Σ_{v∉S~} as an online log-sum-exp of its own
// over the tile with the S~ columns set to −inf (tail_lse_cpu.h: summed directly, relative
// to the tail's own max, so a tiny tail keeps its digits: never 1 − head). S~ arrives
// sorted, so the tiles walk it in order. Then K1 gathers, with log p = (x − M)/τ − ℓ from
// the row's (M, ℓ) pair.
//   sparse_reference: over the reference row → log q on S~ and log t_q;
//   topk_kl_sparse:   over the policy row → the pair of lse_p (and log t_p for the tail
//                     bucket), then the TIKE terms of tike_terms.h against the stored log q.
// A row whose S~ is out of range or repeats an index (the glue rejects those on the CPU)
// or whose sampled token is out of range gives NaN, never a read out of bounds; so does a
// row whose distribution is undefined (a NaN, a +inf logit, no finite logit).
// Compiled once per instruction-set path (cpu_simd.h, TIKE_CPU_KERNEL).
#include "sparse_cpu.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu_simd.h"
#include "tail_lse_cpu.h"
#include "tike_terms.h"

namespace tike::cpu {
namespace {

struct Scratch {
  std::vector<float> buf = std::vector<float>(kTile);
  std::vector<int32_t> members;  // S~ of the row, ascending
};

// Whether an ascending row of n indices is strictly increasing inside [0, V) (no index
// twice); with allow_empty, leading −1 entries (empty slots) are allowed.
inline bool valid_sorted(const int32_t* s, int64_t n, int64_t V, bool allow_empty) {
  int64_t prev = -1;
  for (int64_t i = 0; i < n; ++i) {
    if (s[i] == -1 && allow_empty && prev == -1) continue;
    if (s[i] <= prev || s[i] >= V) return false;
    prev = s[i];
  }
  return true;
}

struct LseTail {
  LsePair lse;            // (M, ℓ) of the row
  double log_tail = 0.0;  // log Σ_{v∉S~} exp((x_v − M)·s − ℓ)
  // Whether the row's distribution is defined: no NaN, no +inf, some finite logit.
  bool defined() const { return std::isfinite(lse.max) && std::isfinite(lse.log_sum); }
};

// One pass over a row: the online log-sum-exp of x·s and, with `want_tail`, the one of the
// columns not in `members` (ascending, all in [0, V)).
template <class S>
TIKE_INLINE LseTail scan_lse_tail(const void* row, DType dt, int64_t V, float s,
                                  const std::vector<int32_t>& members, bool want_tail,
                                  Scratch& sc) {
  OnlineLse<S> all, tail;
  auto cursor = member_cursor([&](size_t e) { return int64_t(members[e]); }, members.size());
  float* buf = sc.buf.data();
  for (int64_t j0 = 0; j0 < V; j0 += kTile) {
    const int n = int(std::min<int64_t>(kTile, V - j0));
    const int npad = S::padded(n);
    const float* x = tile_src<S>(row, dt, j0, n, buf);
    all.add_tile(x, npad, s, next_tile(row, dt, j0, V));
    if (!want_tail) continue;
    tail.add_tile(cursor.mask(x, npad, j0, cursor.advance(j0, n), buf), npad, s);
  }
  LseTail r;
  r.lse = all.pair();
  if (want_tail) r.log_tail = log_tail(tail, r.lse, s);
  return r;
}

template <class S>
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
  const LseTail q = scan_lse_tail<S>(qrow, a.dtype, a.V, s, sc.members, true, sc);
  if (!q.defined()) {  // a NaN, a +inf or no finite logit: q undefined
    std::fill(lq, lq + K1, kNaN);
    a.tail_logmass[r] = kNaN;
    return;
  }
  for (int64_t slot = 0; slot < K1; ++slot)
    lq[slot] = idx[slot] < 0 ? -kInf : float(q.lse.logp(load_one(qrow, a.dtype, idx[slot]), s));
  a.tail_logmass[r] = float(q.log_tail);
}

inline void write_row(const TopkKlSparseArgs& a, int64_t r, float value) {
  std::fill(a.coef + r * a.K1, a.coef + (r + 1) * a.K1, value);
  std::fill(a.stats + r * 3, a.stats + r * 3 + 3, value);
  a.out[r] = a.lse[2 * r] = a.lse[2 * r + 1] = a.shift[r] = value;
}

template <class S>
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
  const LseTail p = scan_lse_tail<S>(zrow, a.dtype, a.V, s, sc.members, a.tail_bucket, sc);
  if (!p.defined()) {  // a NaN, a +inf or no finite logit: p undefined
    write_row(a, r, kNaN);
    return;
  }

  double lp_o = 0.0, ratio = 1.0;
  if (tok >= 0) lp_o = p.lse.logp(load_one(zrow, a.dtype, tok), s);
  if (a.old_logprobs) ratio = std::exp(lp_o - double(a.old_logprobs[r]));
  auto lp_at = [&](int64_t slot) { return p.lse.logp(load_one(zrow, a.dtype, idx[slot]), s); };
  TikeHead h;
  for (int64_t slot = 0; slot < K1; ++slot)
    if (idx[slot] >= 0) h.add(lp_at(slot), lq[slot]);
  const TikeTail t = a.tail_bucket ? tike_tail(p.log_tail, a.ref_tail_logmass[r]) : TikeTail{};
  const double scale = ratio * s;
  float* coef = a.coef + r * K1;
  for (int64_t slot = 0; slot < K1; ++slot)
    coef[slot] = idx[slot] < 0 ? 0.f : tike_coef(lp_at(slot), lq[slot], scale, t.b);
  a.out[r] = float(ratio * (h.D + t.T));
  a.lse[2 * r] = p.lse.max;
  a.lse[2 * r + 1] = p.lse.log_sum;
  a.shift[r] = float(scale * (h.C - h.m_p * t.b));
  float* stats = a.stats + r * 3;
  stats[0] = float(h.m_p);
  stats[1] = float(lp_o);
  stats[2] = float(h.m_q);
}

template <class S>
TIKE_INLINE void reference_rows(const SparseReferenceArgs& a, int64_t row_begin,
                                int64_t row_end) {
  Scratch sc;
  for (int64_t r = row_begin; r < row_end; ++r) reference_row<S>(a, r, sc);
}

template <class S>
TIKE_INLINE void policy_rows(const TopkKlSparseArgs& a, int64_t row_begin, int64_t row_end) {
  Scratch sc;
  for (int64_t r = row_begin; r < row_end; ++r) policy_row<S>(a, r, sc);
}

}  // namespace

TIKE_CPU_KERNEL(sparse_reference_rows, SparseReferenceArgs, reference_rows)
TIKE_CPU_KERNEL(topk_kl_sparse_rows, TopkKlSparseArgs, policy_rows)

}  // namespace tike::cpu
