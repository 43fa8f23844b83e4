// CPU kernel of topk_indices: topk_kl's selection (topk_select_cpu.h) without the KL —
// one pass over each row for its block maxima, then the few blocks that can hold a
// member read again.
// Compiled once per instruction-set path (cpu_simd.h, TIKE_CPU_KERNEL).
#include "topk_indices_cpu.h"

#include <algorithm>
#include <vector>

#include "cpu_simd.h"
#include "topk_select_cpu.h"

namespace tike::cpu {
namespace {

template <class S>
TIKE_INLINE void rows(const TopkIndicesArgs& a, int64_t row_begin, int64_t row_end) {
  TopK topk(a.k);
  std::vector<float> buf(kTile);
  RowBlocks blocks(a.V);
  for (int64_t r = row_begin; r < row_end; ++r) {
    int32_t* out = a.idx + r * a.k;
    if (a.mask && !a.mask[r]) {  // masked rows are never read
      std::fill(out, out + a.k, -1);
      continue;
    }
    const void* row = row_ptr(a.logits, a.dtype, a.logits_layout, r);
    bool nan = false;  // NaN ranks as −inf: nothing else to do with it here
    for (int64_t j0 = 0; j0 < a.V; j0 += kTile) {
      const int n = int(std::min<int64_t>(kTile, a.V - j0));
      const float* x = tile_src<S>(row, a.dtype, j0, n, buf.data());
      block_maxima<S>(x, S::padded(n), j0, blocks, nan);
    }
    select_row<S>(topk, row, a.dtype, a.V, blocks);
    topk.write_sorted(out);
  }
}

}  // namespace

TIKE_CPU_KERNEL(topk_indices_rows, TopkIndicesArgs, rows)

}  // namespace tike::cpu
