// Torch-free CPU kernel of topk_indices (docs/kernels.md): rows [row_begin, row_end).
#pragma once
#include <cstdint>

#include "sparse_args.h"

namespace tike::cpu {

void topk_indices_rows(const TopkIndicesArgs& a, int64_t row_begin, int64_t row_end);

}  // namespace tike::cpu
