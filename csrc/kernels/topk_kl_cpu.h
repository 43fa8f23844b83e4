// Torch-free CPU kernels for topk_kl (forward and backward). See docs/kernels.md.
//
// Each function processes rows [row_begin, row_end) so that the caller picks the
// threading (at::parallel_for in the torch glue, std::thread in the benchmarks).
#pragma once
#include <cstdint>

#include "topk_kl_args.h"

namespace tike::cpu {

void topk_kl_forward_rows(const TopkKlForwardArgs& a, int64_t row_begin, int64_t row_end);
void topk_kl_backward_rows(const TopkKlBackwardArgs& a, int64_t row_begin, int64_t row_end);

}  // namespace tike::cpu
