// Torch-free CPU kernels for the exact full-vocabulary KL. See docs/kernels.md.
//
// Each function processes rows [row_begin, row_end) so that the caller picks the
// threading (at::parallel_for in the torch glue, std::thread in the benchmarks).
#pragma once
#include <cstdint>

#include "full_kl_args.h"

namespace tike::cpu {

void full_kl_forward_rows(const FullKlForwardArgs& a, int64_t row_begin, int64_t row_end);
void full_kl_backward_rows(const FullKlBackwardArgs& a, int64_t row_begin, int64_t row_end);

}  // namespace tike::cpu
