// Torch-free CPU kernels for token log-probabilities (and entropy). See docs/kernels.md.
//
// Each function processes rows [row_begin, row_end) so that the caller picks the
// threading (at::parallel_for in the torch glue, std::thread in the benchmarks).
#pragma once
#include <cstdint>

#include "token_logprobs_args.h"

namespace tike::cpu {

void token_logprobs_forward_rows(const TokenLogprobsForwardArgs& a, int64_t row_begin,
                                 int64_t row_end);
void token_logprobs_backward_rows(const TokenLogprobsBackwardArgs& a, int64_t row_begin,
                                  int64_t row_end);

}  // namespace tike::cpu
