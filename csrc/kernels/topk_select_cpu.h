// The CPU top-k of a streamed row (torch-free), shared by topk_kl's policy pass and
// topk_indices: a min-heap of the k best (value, index) pairs seen so far, fed tile by
// tile, that skips every block of kBlock elements whose max cannot enter it.
//
// Order: larger value first, the lower index on ties; NaN ranks as −inf and −0 as +0 (a
// float compare), the rule of docs/kernels.md and of the CUDA keys in topk_select.cuh.
#pragma once
#include <algorithm>
#include <cstdint>
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

// The k best candidates seen so far, as a min-heap whose root is the worst one kept.
// Rows are scanned in increasing index order, so a newcomer equal to the root ranks
// below it and is rejected by the strict compare: ties go to the lower index.
class TopK {
 public:
  explicit TopK(int64_t k) : k_(size_t(k)) { heap_.reserve(k_); }
  void clear() { heap_.clear(); }
  bool full() const { return heap_.size() == k_; }
  float threshold() const { return heap_[0].v; }

  void offer(float v, int32_t i) {
    if (!full()) {
      heap_.push_back({v, i});
      std::push_heap(heap_.begin(), heap_.end(), cmp);
    } else if (v > heap_[0].v) {
      std::pop_heap(heap_.begin(), heap_.end(), cmp);
      heap_.back() = {v, i};
      std::push_heap(heap_.begin(), heap_.end(), cmp);
    }
  }
  // Writes the indices best first (value desc, index asc).
  void write_sorted(int32_t* out) {
    std::sort(heap_.begin(), heap_.end(), [](const Cand& a, const Cand& b) {
      return ranks_below(b, a);
    });
    for (size_t s = 0; s < heap_.size(); ++s) out[s] = heap_[s].i;
  }

 private:
  // std heap functions keep the "largest" at the root; make it the worst-ranked.
  static bool cmp(const Cand& a, const Cand& b) { return ranks_below(b, a); }
  size_t k_;
  std::vector<Cand> heap_;
};

// The max of each kBlock-element block of a padded tile (NaN counted as −inf, as the
// top-k ranks it) into bmax[]; sets `nan` when the tile holds a NaN. Returns the tile max.
TIKE_INLINE float block_maxima(const float* x, int npad, float* bmax, bool& nan) {
  vf tmax = splat(-kInf);
  vi bad = vi{};
  const vf ninf = splat(-kInf);
  const int nblocks = (npad + kBlock - 1) / kBlock;
  for (int b = 0; b < nblocks; ++b) {
    vf m = ninf;
    for (int i = b * kBlock; i < std::min(npad, (b + 1) * kBlock); i += kLanes) {
      const vf v = load(x + i);
      const vi isnan = v != v;
      m = vmax(m, isnan ? ninf : v);
      bad |= isnan;
    }
    bmax[b] = hmax(m);
    tmax = vmax(tmax, m);
  }
  for (int i = 0; i < kLanes; ++i) nan |= bad[i] != 0;
  return hmax(tmax);
}

// Offers the n elements of tile x (columns j0 ..) to topk, skipping the blocks whose max
// (from block_maxima) cannot enter it.
TIKE_INLINE void offer_blocks(TopK& topk, const float* x, int n, int64_t j0, const float* bmax) {
  const int nblocks = (n + kBlock - 1) / kBlock;
  for (int b = 0; b < nblocks; ++b) {
    if (topk.full() && !(bmax[b] > topk.threshold())) continue;
    const int end = std::min(n, (b + 1) * kBlock);
    for (int i = b * kBlock; i < end; ++i) {
      const float v = x[i];
      topk.offer(v == v ? v : -kInf, int32_t(j0 + i));  // NaN ranks as −inf
    }
  }
}

}  // namespace tike::cpu
