// Torch-free CPU kernels for topk_kl (forward and backward). See docs/kernels.md.
//
// The functions process a range of rows [row_begin, row_end) so that the caller picks
// the threading (at::parallel_for in the torch glue, std::thread in the benchmarks).
#pragma once
#include <cstdint>

#include "row_layout.h"

namespace tike::cpu {

struct TopkKlForwardArgs {
  const void* logits = nullptr;       // [N, V] of `dtype`, rows per `logits_layout`
  RowLayout logits_layout;
  const void* ref_logits = nullptr;   // [N, V] of `dtype`, rows per `ref_layout`
  RowLayout ref_layout;
  DType dtype = DType::Float32;
  int64_t N = 0, V = 0;
  int64_t k = 16;
  int64_t K1 = 16;                    // k, or k + 1 when the sampled token is united
  const int64_t* sampled_tokens = nullptr;  // [N] or null
  const float* old_logprobs = nullptr;      // [N] or null (needs sampled_tokens)
  const bool* mask = nullptr;               // [N] or null
  float temperature = 1.f;
  bool tail_bucket = false;
  // outputs
  float* out = nullptr;     // [N]
  float* lse = nullptr;     // [N]
  int32_t* idx = nullptr;   // [N, K1]
  float* coef = nullptr;    // [N, K1]
  float* shift = nullptr;   // [N]
  float* stats = nullptr;   // [N, 3]
};

struct TopkKlBackwardArgs {
  const float* grad_out = nullptr;  // [N]
  const void* logits = nullptr;     // rows per `logits_layout`
  RowLayout logits_layout;
  DType dtype = DType::Float32;
  int64_t N = 0, V = 0, K1 = 0;
  const float* lse = nullptr;
  const int32_t* idx = nullptr;
  const float* coef = nullptr;
  const float* shift = nullptr;
  const bool* mask = nullptr;
  float temperature = 1.f;
  void* grad = nullptr;             // [N, V] contiguous, `dtype`; may alias `logits`
  RowLayout grad_layout;            // layout of `grad` (equals logits_layout when in place)
};

void topk_kl_forward_rows(const TopkKlForwardArgs& a, int64_t row_begin, int64_t row_end);
void topk_kl_backward_rows(const TopkKlBackwardArgs& a, int64_t row_begin, int64_t row_end);

}  // namespace tike::cpu
