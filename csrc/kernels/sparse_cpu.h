// Torch-free CPU kernels of the fixed-support ops (docs/kernels.md): sparse_reference
// and the forward of topk_kl_sparse (its backward is topk_kl_backward_rows). Each
// processes rows [row_begin, row_end); the caller picks the threading.
#pragma once
#include <cstdint>

#include "sparse_args.h"

namespace tike::cpu {

void sparse_reference_rows(const SparseReferenceArgs& a, int64_t row_begin, int64_t row_end);
void topk_kl_sparse_rows(const TopkKlSparseArgs& a, int64_t row_begin, int64_t row_end);

}  // namespace tike::cpu
