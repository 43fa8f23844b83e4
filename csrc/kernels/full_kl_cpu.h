// Torch-free CPU kernels for the exact full-vocabulary KL. See docs/kernels.md.
#pragma once
#include <cstdint>

#include "row_layout.h"

namespace tike::cpu {

struct FullKlForwardArgs {
  const void* logits = nullptr;
  RowLayout logits_layout;
  const void* ref_logits = nullptr;
  RowLayout ref_layout;
  DType dtype = DType::Float32;
  int64_t N = 0, V = 0;
  const bool* mask = nullptr;
  float temperature = 1.f;
  float* out = nullptr;    // [N]
  float* lse_p = nullptr;  // [N]
  float* lse_q = nullptr;  // [N]
};

struct FullKlBackwardArgs {
  const float* grad_out = nullptr;
  const void* logits = nullptr;
  RowLayout logits_layout;
  const void* ref_logits = nullptr;
  RowLayout ref_layout;
  DType dtype = DType::Float32;
  int64_t N = 0, V = 0;
  const float* out = nullptr;
  const float* lse_p = nullptr;
  const float* lse_q = nullptr;
  const bool* mask = nullptr;
  float temperature = 1.f;
  void* grad = nullptr;  // [N, V] contiguous, `dtype`
};

void full_kl_forward_rows(const FullKlForwardArgs& a, int64_t row_begin, int64_t row_end);
void full_kl_backward_rows(const FullKlBackwardArgs& a, int64_t row_begin, int64_t row_end);

}  // namespace tike::cpu
