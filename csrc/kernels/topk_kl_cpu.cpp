// CPU kernels of topk_kl (docs/kernels.md). Per row:
//   pass 1 over z : online max / sum-exp and the top-k, together, tile by tile;
//   pass 2 over zr: online log-sum-exp (and, with the tail bucket, the tail sums of q and
//                   of p, each an online log-sum-exp of its own over the entries outside
//                   S~, so a tiny tail neither cancels against 1 − head nor underflows);
//   K1 gathers    : the partial KL, its backward coefficients and the audit stats.
// The backward makes one pass over z writing the dense gradient, S~ entries included.
// Compiled once per instruction-set path (cpu_simd.h, TIKE_CPU_KERNEL).
#include "topk_kl_cpu.h"

#include <algorithm>
#include <functional>
#include <utility>
#include <vector>

#include "cpu_simd.h"

namespace tike::cpu {
namespace {

constexpr int kBlock = 64;  // top-k skips whole blocks whose max cannot enter the queue

struct Cand {
  float v;
  int32_t i;
};
// a ranks below b: lower value, or the same value at a higher index (lower index wins).
inline bool ranks_below(const Cand& a, const Cand& b) {
  return a.v < b.v || (a.v == b.v && a.i > b.i);
}

// The k best values of a row (ties to the lower index, NaN as −inf), scanned in index
// order: every value above the threshold — the k-th best kept after the last prune — is
// appended to a buffer, and when the buffer holds `cap` candidates a
// selection cuts it back to the k best and raises the threshold. So a value costs one
// compare, and the selections cost O(cap) each, ~k·ln(V/k)/(cap − k) times a row: no heap
// update per admitted value. cap = 2k (k + 64 at least) keeps the threshold fresh: with a
// stale one most 64-value blocks of a row pass the block-max test and are scanned. A newcomer equal to the threshold comes at a higher index
// than every kept value and ranks below them: the strict compare rejects it. The first k
// values of a row are taken unconditionally, so a row with fewer than k finite values
// (masked vocabularies, NaN) still fills S in index order.
class TopK {
 public:
  explicit TopK(int64_t k)
      : k_(k), cap_(k + std::max<int64_t>(k, kBlock)), buf_(size_t(cap_ + kBlock)) {}
  void clear() {
    n_ = 0;
    thr_ = -kInf;
  }
  float threshold() const { return thr_; }
  int64_t k() const { return k_; }

  // Offers x[0, n) (indices j0 + i, all >= k): those above the threshold.
  void offer_block(const float* x, int n, int32_t j0) {
    const float t = thr_;
    for (int i = 0; i < n; ++i)
      if (x[i] > t) buf_[size_t(n_++)] = {x[i], j0 + i};
    if (n_ >= cap_) prune(k_);
  }
  // Offers a whole block of kBlock values laid out as kBlock/W vectors of W lanes, with
  // lane_max[l] the max of lane l over those vectors: only the lanes whose max is above the
  // threshold are looked at. Admission order within a block does not matter: the
  // threshold stays the one from before the block (a value equal to it comes after the
  // k-th best kept and ranks below it), and the selection orders by (value, index).
  template <int W>
  void offer_lanes(const float* x, const float* lane_max, int32_t j0) {
    const float t = thr_;
    for (int l = 0; l < W; ++l) {
      if (!(lane_max[l] > t)) continue;
      for (int i = l; i < kBlock; i += W)
        if (x[i] > t) buf_[size_t(n_++)] = {x[i], j0 + i};
    }
    if (n_ >= cap_) prune(k_);
  }
  // Takes x[0, n) (indices j0 + i) unconditionally, NaN as −inf.
  void take_block(const float* x, int n, int32_t j0) {
    for (int i = 0; i < n; ++i) buf_[size_t(n_++)] = {x[i] == x[i] ? x[i] : -kInf, j0 + i};
    if (n_ >= cap_) prune(k_);
  }
  // Writes the k best indices, best first (value desc, index asc).
  void write_sorted(int32_t* out) {
    const int64_t k = std::min(k_, n_);
    select_exact(k);
    std::sort(buf_.begin(), buf_.begin() + k, ranks_above);
    for (int64_t s = 0; s < k; ++s) out[s] = buf_[size_t(s)].i;
  }

 private:
  static bool ranks_above(const Cand& a, const Cand& b) { return ranks_below(b, a); }
  // Keeps the k best by (value, index).
  void select_exact(int64_t k) {
    if (n_ <= k) return;
    std::nth_element(buf_.begin(), buf_.begin() + (k - 1), buf_.begin() + n_, ranks_above);
    n_ = k;
  }
  // Raises the threshold to the k-th largest value t and keeps every candidate >= t (k or
  // a few more on ties): a selection over plain floats, several times cheaper than one
  // over (value, index) pairs. Many ties (bf16 rows) fall back to the exact selection.
  void prune(int64_t k) {
    vals_.resize(size_t(n_));
    for (int64_t i = 0; i < n_; ++i) vals_[size_t(i)] = buf_[size_t(i)].v;
    std::nth_element(vals_.begin(), vals_.begin() + (k - 1), vals_.end(), std::greater<float>());
    const float t = vals_[size_t(k - 1)];
    int64_t m = 0;
    for (int64_t i = 0; i < n_; ++i)
      if (buf_[size_t(i)].v >= t) buf_[size_t(m++)] = buf_[size_t(i)];
    n_ = m;
    if (n_ >= cap_) select_exact(k);
    thr_ = std::max(thr_, t);
  }
  int64_t k_, cap_, n_ = 0;
  float thr_ = -kInf;
  std::vector<Cand> buf_;
  std::vector<float> vals_;
};

struct Scratch {
  std::vector<float> zbuf, qbuf;
  std::vector<std::pair<int32_t, int32_t>> support;  // (index, slot) of S~, by index
  std::vector<double> log_ratio;  // per slot of S~: L_v where p_v != 0, else NaN ...
  std::vector<uint8_t> has_coef;  // ... and whether it has a coefficient (p_v != 0)
  TopK topk;
  explicit Scratch(int64_t k) : zbuf(kTile), qbuf(kTile), topk(k) {}
};

// S~ entries of row n sorted by vocabulary index, so tiles can walk them in order.
inline void sorted_support(const int32_t* idx, int64_t K1, Scratch& sc) {
  sc.support.clear();
  for (int64_t s = 0; s < K1; ++s)
    if (idx[s] >= 0) sc.support.emplace_back(idx[s], int32_t(s));
  std::sort(sc.support.begin(), sc.support.end());
}

// Pass 1: online log-sum-exp of z·s and the top-k of the raw values.
template <class S>
TIKE_INLINE LsePair scan_policy_row(const void* zrow, DType dt, int64_t V, float s,
                                    Scratch& sc) {
  using vf = typename S::vf;
  using vi = typename S::vi;
  OnlineLse<S> lse;
  TopK& topk = sc.topk;
  topk.clear();
  float* buf = sc.zbuf.data();
  float bmax[kTile / kBlock];
  alignas(64) float lane_max[kTile];  // per block, the max of each lane over its vectors
  for (int64_t j0 = 0; j0 < V; j0 += kTile) {
    const int n = int(std::min<int64_t>(kTile, V - j0));
    const int npad = S::padded(n);
    const float* x = tile_src<S>(zrow, dt, j0, n, buf);
    // Block maxima give both the tile max and the blocks the top-k must look at.
    vf tmax = S::splat(-kInf);
    vi bad = vi{};
    const int nblocks = (npad + kBlock - 1) / kBlock;
    for (int b = 0; b < nblocks; ++b) {
      vf m = S::splat(-kInf);
      for (int i = b * kBlock; i < std::min(npad, (b + 1) * kBlock); i += S::kLanes) {
        const vf v = S::load(x + i);
        m = S::max(v, m);  // a NaN v keeps m: NaN ranks as −inf
        bad |= (v != v);
      }
      S::store(lane_max + b * S::kLanes, m);
      bmax[b] = S::hmax(m);
      tmax = S::max(tmax, m);
    }
    lse.nan |= S::any(bad);
    lse.raise_max(S::hmax(tmax), s);
    if (lse.M > -kInf && lse.M < kInf)
      lse.sum += tile_sumexp<S>(x, npad, lse.M, s, next_tile(zrow, dt, j0, V));

    for (int b = 0; b < nblocks; ++b) {
      const int64_t jb = j0 + b * kBlock;
      if (jb >= topk.k() && !(bmax[b] > topk.threshold())) continue;
      const int len = std::min(n, (b + 1) * kBlock) - b * kBlock;
      const float* xb = x + b * kBlock;
      const int take = int(std::clamp<int64_t>(topk.k() - jb, 0, len));  // j < k: always in
      if (take == 0 && len == kBlock) {
        topk.template offer_lanes<S::kLanes>(xb, lane_max + b * S::kLanes, int32_t(jb));
        continue;
      }
      if (take > 0) topk.take_block(xb, take, int32_t(jb));
      if (take < len) topk.offer_block(xb + take, len - take, int32_t(jb + take));
    }
  }
  return lse.pair();
}

// log of a tail mass Σ_{v∉S~} p_v from its own online log-sum-exp (relative to the
// tail's max) and the row's pair: never formed as a float sum of tiny terms.
template <class S>
TIKE_INLINE double log_tail(const OnlineLse<S>& tail, const LsePair& row, float s) {
  if (tail.bad() || std::isnan(row.max)) return double(kNaN);
  if (!(tail.sum > 0.0)) return -double(kInf);
  return (double(tail.M) - double(row.max)) * s + std::log(tail.sum) - double(row.log_sum);
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
  size_t sup = 0;
  for (int64_t j0 = 0; j0 < V; j0 += kTile) {
    const int n = int(std::min<int64_t>(kTile, V - j0));
    const int npad = S::padded(n);
    const float* q = tile_src<S>(qrow, dt, j0, n, qb);
    lq.add_tile(q, npad, s, next_tile(qrow, dt, j0, V));
    if (!tail) continue;
    const float* z = tile_src<S>(zrow, dt, j0, n, zb);
    const size_t first = sup;
    while (sup < sc.support.size() && sc.support[sup].first < j0 + n) ++sup;
    if (sup > first) {  // S~ entries here: mask them in copies of the tiles
      if (q != qb) std::memcpy(qb, q, sizeof(float) * npad);
      if (z != zb) std::memcpy(zb, z, sizeof(float) * npad);
      for (size_t e = first; e < sup; ++e) qb[sc.support[e].first - j0] = zb[sc.support[e].first - j0] = -kInf;
      q = qb;
      z = zb;
    }
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

template <class S>
TIKE_INLINE void forward_row(const TopkKlForwardArgs& a, int64_t r, Scratch& sc) {
  const int64_t K1 = a.K1;
  int32_t* idx = a.idx + r * K1;
  float* coef = a.coef + r * K1;
  float* stats = a.stats + r * 3;
  if (a.mask && !a.mask[r]) {  // masked rows are never read
    a.out[r] = a.shift[r] = a.lse[2 * r] = a.lse[2 * r + 1] = 0.f;
    std::fill(idx, idx + K1, -1);
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

  double lp_o = 0.0, ratio = 1.0;
  if (tok >= 0) lp_o = lse_p.logp(load_one(zrow, a.dtype, tok), s);
  if (a.old_logprobs) ratio = std::exp(lp_o - double(a.old_logprobs[r]));

  double D = 0.0, C = 0.0, m_p = 0.0, m_q = 0.0;
  std::vector<double>& L = sc.log_ratio;  // kept for the coefficients below
  std::vector<uint8_t>& has = sc.has_coef;
  L.assign(size_t(K1), 0.0);
  has.assign(size_t(K1), 0);
  for (int64_t slot = 0; slot < K1; ++slot) {
    if (idx[slot] < 0) continue;
    const double lp = lse_p.logp(load_one(zrow, a.dtype, idx[slot]), s);
    const double lq = ref.lse_q.logp(load_one(qrow, a.dtype, idx[slot]), s);
    const double p = std::exp(lp), q = std::exp(lq);
    m_p += p;
    m_q += q;
    if (p != 0.0) {  // 0 · log 0 counts as 0 (a NaN p stays NaN)
      D += p * (lp - lq);
      C += p * (lp - lq + 1.0);
      L[size_t(slot)] = lp - lq;
      has[size_t(slot)] = 1;
    }
  }
  double T = 0.0, b = 0.0;
  const double t_p = std::exp(ref.log_tail_p);
  if (a.tail_bucket && (t_p > 0.0 || std::isnan(t_p))) {
    const double log_ratio = ref.log_tail_p - ref.log_tail_q;
    T = t_p * log_ratio;
    b = log_ratio + 1.0;
  }
  const double scale = ratio * s;
  for (int64_t slot = 0; slot < K1; ++slot)
    coef[slot] = has[size_t(slot)] ? float(scale * (L[size_t(slot)] + 1.0 - b)) : 0.f;
  a.out[r] = float(ratio * (D + T));
  a.lse[2 * r] = lse_p.max;
  a.lse[2 * r + 1] = lse_p.log_sum;
  a.shift[r] = float(scale * (C - m_p * b));
  stats[0] = float(m_p);
  stats[1] = float(lp_o);
  stats[2] = float(m_q);
}

template <class S>
TIKE_INLINE void backward_row(const TopkKlBackwardArgs& a, int64_t r, Scratch& sc) {
  using vf = typename S::vf;
  void* grow = row_ptr(a.grad, a.dtype, a.grad_layout, r);
  float* buf = sc.zbuf.data();
  if (a.mask && !a.mask[r]) {  // masked rows: zero gradient, logits not read
    std::fill(buf, buf + kTile, 0.f);
    for (int64_t j0 = 0; j0 < a.V; j0 += kTile)
      store_tile(grow, a.dtype, j0, int(std::min<int64_t>(kTile, a.V - j0)), buf);
    return;
  }
  // p_j = 2^((z_j − M)·c − ℓ·log2 e), c = log2(e)/τ
  const float c = kLog2e / a.temperature, M = a.lse[2 * r], l2 = a.lse[2 * r + 1] * kLog2e;
  const float g = a.grad_out[r], sh = a.shift[r];
  const float* coef = a.coef + r * a.K1;
  sorted_support(a.idx + r * a.K1, a.K1, sc);
  float* patch = sc.qbuf.data();  // S~ values of the current tile (at most K1 <= kTile)
  const void* zrow = row_ptr(a.logits, a.dtype, a.logits_layout, r);
  const vf vM = S::splat(M), vl = S::splat(l2), dense = S::splat(-g * sh);
  size_t sup = 0;
  // Each tile is read before it is written, so grad may alias logits (in-place backward).
  for (int64_t j0 = 0; j0 < a.V; j0 += kTile) {
    const int n = int(std::min<int64_t>(kTile, a.V - j0));
    const int npad = S::padded(n);
    const float* x = tile_src<S>(zrow, a.dtype, j0, n, buf);
    float* out = tile_dst<S>(grow, a.dtype, j0, n, buf);
    // S~ entries take g · p_j · (coef − shift) from their own logit, read before the
    // dense pass overwrites it; rounding to the output dtype happens once.
    const size_t first = sup;
    for (; sup < sc.support.size() && sc.support[sup].first < j0 + n; ++sup) {
      const float xj = x[sc.support[sup].first - j0];
      const float p = S::exp2(S::splat((xj - M) * c) - vl)[0];
      patch[sup - first] = p != 0.f ? g * p * (coef[sc.support[sup].second] - sh) : 0.f;
    }
    const NextTile next_z = next_tile(zrow, a.dtype, j0, a.V);
    const GradTile<S> dst = grad_tile<S>(out, buf);
    for (int i = 0; i < npad; i += S::kLanes) {
      next_z.at(i);
      dst.put(i, S::exp2((S::load(x + i) - vM) * c - vl) * dense);
    }
    for (size_t e = first; e < sup; ++e) out[sc.support[e].first - j0] = patch[e - first];
    finish_tile(grow, a.dtype, j0, n, out, buf);
  }
}

template <class S>
TIKE_INLINE void forward_rows(const TopkKlForwardArgs& a, int64_t row_begin, int64_t row_end) {
  Scratch sc(std::min(a.k, a.V));
  for (int64_t r = row_begin; r < row_end; ++r) forward_row<S>(a, r, sc);
}

template <class S>
TIKE_INLINE void backward_rows(const TopkKlBackwardArgs& a, int64_t row_begin,
                               int64_t row_end) {
  Scratch sc(1);
  for (int64_t r = row_begin; r < row_end; ++r) backward_row<S>(a, r, sc);
  S::stream_fence();
}

}  // namespace

TIKE_CPU_KERNEL(topk_kl_forward_rows, TopkKlForwardArgs, forward_rows)
TIKE_CPU_KERNEL(topk_kl_backward_rows, TopkKlBackwardArgs, backward_rows)

}  // namespace tike::cpu
