// Torch-free CPU kernels for token log-probabilities (and entropy). See docs/kernels.md.
#pragma once
#include <cstdint>

#include "row_layout.h"

namespace tike::cpu {

struct TokenLogprobsForwardArgs {
  const void* logits = nullptr;
  RowLayout logits_layout;
  DType dtype = DType::Float32;
  int64_t N = 0, V = 0;
  const int64_t* tokens = nullptr;  // [N], in [0, V)
  float temperature = 1.f;
  float* logp = nullptr;     // [N]
  float* entropy = nullptr;  // [N] or null (not requested)
  float* lse = nullptr;      // [N]
};

struct TokenLogprobsBackwardArgs {
  const float* grad_logp = nullptr;     // [N]
  const float* grad_entropy = nullptr;  // [N] or null
  const void* logits = nullptr;
  RowLayout logits_layout;
  DType dtype = DType::Float32;
  int64_t N = 0, V = 0;
  const int64_t* tokens = nullptr;
  const float* lse = nullptr;
  const float* entropy = nullptr;  // needed when grad_entropy is given
  float temperature = 1.f;
  void* grad = nullptr;  // [N, V] contiguous, `dtype`
};

void token_logprobs_forward_rows(const TokenLogprobsForwardArgs& a, int64_t row_begin,
                                 int64_t row_end);
void token_logprobs_backward_rows(const TokenLogprobsBackwardArgs& a, int64_t row_begin,
                                  int64_t row_end);

}  // namespace tike::cpu
