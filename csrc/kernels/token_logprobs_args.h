// Torch-free arguments of the token_logprobs kernels, shared by the CPU kernels
// (token_logprobs_cpu.h) and the CUDA launchers (token_logprobs.cuh). See docs/kernels.md.
#pragma once
#include <cstdint>

#include "row_layout.h"

namespace tike {


struct TokenLogprobsForwardArgs {
  const void* logits = nullptr;
  RowLayout logits_layout;
  DType dtype = DType::Float32;
  int64_t N = 0, V = 0;
  const int64_t* tokens = nullptr;  // [N], in [0, V)
  float temperature = 1.f;
  float* logp = nullptr;     // [N]
  float* entropy = nullptr;  // [N] or null (not requested)
  float* lse = nullptr;      // [N, 2]: (max z, log Σ exp((z − max)/τ))
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

}  // namespace tike
