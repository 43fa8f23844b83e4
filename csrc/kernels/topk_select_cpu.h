// The CPU top-k of a streamed row (torch-free), shared by topk_kl's policy pass and
// topk_indices: one selection implementation, fed tile by tile, that skips every block of
// kBlock elements whose max cannot enter it.
//
// Order: larger value first, the lower index on ties; NaN ranks as −inf and −0 as +0 (a
// float compare), the rule of docs/kernels.md and of the CUDA keys in topk_select.cuh.
#pragma once
#include <algorithm>
#include <cstdint>
#include <functional>
#include <vector>

#include "cpu_simd.h"

namespace tike::cpu {

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
// appended to a buffer, and when the buffer holds `cap` candidates a selection cuts it
// back to the k best and raises the threshold. So a value costs one compare, and the
// selections cost O(cap) each, ~k·ln(V/k)/(cap − k) times a row: no heap update per
// admitted value. cap = 2k (k + 64 at least) keeps the threshold fresh: with a stale one
// most 64-value blocks of a row pass the block-max test and are scanned. A newcomer equal
// to the threshold comes at a higher index than every kept value and ranks below them:
// the strict compare rejects it. The first k values of a row are taken unconditionally,
// so a row with fewer than k finite values (masked vocabularies, NaN) still fills S in
// index order. Scalar code: compiled once, outside the per-path kernels.
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

  // Offers x[0, n) (n <= kBlock; indices j0 + i, all >= k): those above the threshold.
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
  // Takes x[0, n) (n <= kBlock; indices j0 + i) unconditionally, NaN as −inf.
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
  // Invariant between calls: n_ < cap_, and one call adds at most kBlock candidates.
  int64_t k_, cap_, n_ = 0;
  float thr_ = -kInf;
  std::vector<Cand> buf_;
  std::vector<float> vals_;
};

// What the selection needs of a padded tile, kept by the caller per tile: the max of
// each kBlock block, and per block the max of each vector lane over its vectors.
struct TileMaxima {
  float bmax[kTile / kBlock];
  alignas(64) float lane_max[kTile];
};

// Block and lane maxima of a padded tile x[0, npad) into tm (NaN skipped: it ranks as
// −inf); sets `nan` when the tile holds a NaN. Returns the tile max over the non-NaN
// values (−inf when there is none).
template <class S>
TIKE_INLINE float tile_maxima(const float* x, int npad, TileMaxima& tm, bool& nan) {
  using vf = typename S::vf;
  using vi = typename S::vi;
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
    S::store(tm.lane_max + b * S::kLanes, m);
    tm.bmax[b] = S::hmax(m);
    tmax = S::max(tmax, m);
  }
  nan |= S::any(bad);
  return S::hmax(tmax);
}

// Offers the n elements of tile x (columns j0 ..) to topk, after tile_maxima: blocks
// whose max cannot enter are skipped, full blocks are looked at lane by lane, and the
// first k columns of the row are taken whatever their value.
template <class S>
TIKE_INLINE void offer_tile(TopK& topk, const float* x, int n, int64_t j0, const TileMaxima& tm) {
  const int nblocks = (n + kBlock - 1) / kBlock;
  for (int b = 0; b < nblocks; ++b) {
    const int64_t jb = j0 + b * kBlock;
    if (jb >= topk.k() && !(tm.bmax[b] > topk.threshold())) continue;
    const int len = std::min(n, (b + 1) * kBlock) - b * kBlock;
    const float* xb = x + b * kBlock;
    const int take = int(std::clamp<int64_t>(topk.k() - jb, 0, len));  // j < k: always in
    if (take == 0 && len == kBlock) {
      topk.template offer_lanes<S::kLanes>(xb, tm.lane_max + b * S::kLanes, int32_t(jb));
      continue;
    }
    if (take > 0) topk.take_block(xb, take, int32_t(jb));
    if (take < len) topk.offer_block(xb + take, len - take, int32_t(jb + take));
  }
}

}  // namespace tike::cpu
