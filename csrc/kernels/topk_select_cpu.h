// The CPU top-k of a row (torch-free), shared by topk_kl's policy pass and topk_indices:
// the pass over the row keeps the max of every block of kBlock elements; after it, only
// the blocks whose max reaches the k-th largest block max are read again (from cache: the
// row was just scanned) and their values offered to one selection.
//
// Order: larger value first, the lower index on ties; NaN ranks as −inf and −0 as +0 (a
// float compare), the rule of docs/kernels.md and of the CUDA keys in topk_select.cuh.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <vector>

#include "cpu_simd.h"

namespace tike::cpu {

constexpr int kBlock = 64;  // elements per block: the unit the selection skips on its max
// A candidate as one integer that orders as the selection does: the value's bits mapped
// to an unsigned order (−0 as +0, NaN as −inf) above the complemented index (the lower
// index ranks higher on a tie). Sorting and selecting plain integers is several times
// cheaper than comparing (value, index) pairs.
inline uint64_t rank_key(float v, int32_t i) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  if (v != v) u = 0xff800000u;  // NaN: −inf
  if (v == 0.f) u = 0u;         // −0: +0
  u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  return (uint64_t(u) << 32) | uint32_t(~uint32_t(i));
}
inline float key_value(uint64_t key) {
  uint32_t u = uint32_t(key >> 32);
  u = (u & 0x80000000u) ? (u & 0x7fffffffu) : ~u;
  float v;
  std::memcpy(&v, &u, 4);
  return v;
}
inline int32_t key_index(uint64_t key) { return int32_t(~uint32_t(key)); }

// The k best values of a row (ties to the lower index, NaN as −inf), offered in index
// order. A value is admitted when it is above the threshold — the k-th best kept after
// the last prune — and at least the floor, a lower bound of the row's k-th best value
// known in advance (select_row: the k-th largest block max). Admitted values go to a
// buffer; when it holds `cap` candidates a selection cuts it back to the k best and raises
// the threshold, so a value costs one compare and there is no heap update per admission.
// A newcomer equal to the threshold comes at a higher index than every kept value and
// ranks below them: the strict compare rejects it; one equal to the floor may be the k-th
// best: it is admitted. The first k values of a row are taken unconditionally, so a row
// with fewer than k finite values (masked vocabularies, NaN) still fills S in index order.
// Scalar code: compiled once, outside the per-path kernels.
class TopK {
 public:
  explicit TopK(int64_t k)
      : k_(k), cap_(k + std::max<int64_t>(k, kBlock)), buf_(size_t(cap_ + kBlock)) {}
  // Starts a row whose k-th best value is known to be >= floor (−inf: nothing known).
  void clear(float floor = -kInf) {
    n_ = 0;
    thr_ = -kInf;
    floor_ = floor;
  }
  // Admitted from now on: values above threshold() and at least floor().
  float threshold() const { return thr_; }
  float floor() const { return floor_; }
  int64_t k() const { return k_; }

  // Offers x[0, n) (n <= kBlock; indices j0 + i, all >= k).
  void offer_block(const float* x, int n, int32_t j0) {
    const float t = thr_, f = floor_;
    if (t >= f) {  // above the threshold implies at least the floor
      for (int i = 0; i < n; ++i)
        if (x[i] > t) buf_[size_t(n_++)] = rank_key(x[i], j0 + i);
    } else {  // at least the floor implies above the threshold
      for (int i = 0; i < n; ++i)
        if (x[i] >= f) buf_[size_t(n_++)] = rank_key(x[i], j0 + i);
    }
    if (n_ >= cap_) prune();
  }
  // Takes x[0, n) (n <= kBlock; indices j0 + i) unconditionally, NaN as −inf.
  void take_block(const float* x, int n, int32_t j0) {
    for (int i = 0; i < n; ++i) buf_[size_t(n_++)] = rank_key(x[i], j0 + i);
    if (n_ >= cap_) prune();
  }
  // Writes the k best indices, best first (value desc, index asc).
  void write_sorted(int32_t* out) {
    if (n_ > k_) prune();
    std::sort(buf_.begin(), buf_.begin() + n_, std::greater<uint64_t>());
    for (int64_t s = 0; s < n_; ++s) out[s] = key_index(buf_[size_t(s)]);
  }

 private:
  // Keeps the k best and raises the threshold to the k-th best value (keys are distinct:
  // exactly k are kept, ties included).
  void prune() {
    std::nth_element(buf_.begin(), buf_.begin() + (k_ - 1), buf_.begin() + n_,
                     std::greater<uint64_t>());
    n_ = k_;
    thr_ = std::max(thr_, key_value(buf_[size_t(k_ - 1)]));
  }
  // Invariant between calls: n_ < cap_, and one call adds at most kBlock candidates.
  int64_t k_, cap_, n_ = 0;
  float thr_ = -kInf, floor_ = -kInf;
  std::vector<uint64_t> buf_;
};

// Block maxima of a row, filled tile by tile during the pass over it (block_maxima) and
// used once the pass is done (select_row).
struct RowBlocks {
  std::vector<float> bmax;  // max of each block of kBlock columns (NaN skipped)
  std::vector<float> work;  // a copy for the selection of the floor
  alignas(64) float block[kBlock];  // one block converted to float (16-bit rows)
  explicit RowBlocks(int64_t V = 0) { resize(V); }
  void resize(int64_t V) { bmax.resize(size_t((V + kBlock - 1) / kBlock)); }
};

// Block maxima of a padded tile x[0, npad) of columns j0 .. (j0 a multiple of kBlock) into
// rb.bmax (NaN skipped: it ranks as −inf); sets `nan` when the tile holds a NaN. Returns
// the tile max over the non-NaN values (−inf when there is none).
template <class S>
TIKE_INLINE float block_maxima(const float* x, int npad, int64_t j0, RowBlocks& rb,
                               bool& nan) {
  using vf = typename S::vf;
  using vi = typename S::vi;
  vf tmax = S::splat(-kInf);
  vi bad = vi{};
  float* bmax = rb.bmax.data() + j0 / kBlock;
  const int nblocks = (npad + kBlock - 1) / kBlock;
  for (int b = 0; b < nblocks; ++b) {
    vf m = S::splat(-kInf);
    for (int i = b * kBlock; i < std::min(npad, (b + 1) * kBlock); i += S::kLanes) {
      const vf v = S::load(x + i);
      m = S::max(v, m);  // a NaN v keeps m: NaN ranks as −inf
      bad |= (v != v);
    }
    bmax[b] = S::hmax(m);
    tmax = S::max(tmax, m);
  }
  nan |= S::any(bad);
  return S::hmax(tmax);
}

// The top-k of a row after block_maxima has seen all of it. The floor is the k-th largest
// block max: k blocks hold a value that large, so the k-th best value of the row is at
// least it, and only blocks whose max reaches it (and the threshold) can hold a member —
// about k of them on a row of distinct values, whatever V is. Those blocks, and the ones
// holding the first k columns (taken unconditionally), are read again, a vector at a
// time: only vectors with a value to admit go to the scalar selection. Fewer blocks than
// k: no floor, every block is read.
template <class S>
TIKE_INLINE void select_row(TopK& topk, const void* row, DType dt, int64_t V, RowBlocks& rb) {
  using vf = typename S::vf;
  constexpr int W = S::kLanes;
  const int64_t nb = int64_t(rb.bmax.size()), k = topk.k();
  float floor = -kInf;
  if (k > 0 && nb >= k) {
    rb.work.assign(rb.bmax.begin(), rb.bmax.end());
    std::nth_element(rb.work.begin(), rb.work.begin() + (k - 1), rb.work.end(),
                     std::greater<float>());
    floor = rb.work[size_t(k - 1)];
  }
  topk.clear(floor);
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t jb = b * kBlock;
    const float m = rb.bmax[size_t(b)];
    if (jb >= k && !(m > topk.threshold() && m >= floor)) continue;
    const int len = int(std::min<int64_t>(kBlock, V - jb));
    const float* xb = rb.block;
    if (dt == DType::Float32 && len == kBlock)
      xb = static_cast<const float*>(row) + jb;
    else
      load_tile<S>(row, dt, jb, len, rb.block);  // padded with −inf: never admitted
    int i = int(std::clamp<int64_t>(k - jb, 0, len));  // j < k: always in
    if (i > 0) topk.take_block(xb, i, int32_t(jb));
    for (; i < len && i % W != 0; ++i) topk.offer_block(xb + i, 1, int32_t(jb + i));
    for (; i < len; i += W) {
      const vf v = S::load(xb + i);
      if (S::any((v > topk.threshold()) & (v >= floor)))
        topk.offer_block(xb + i, std::min(W, len - i), int32_t(jb + i));
    }
  }
}

}  // namespace tike::cpu
