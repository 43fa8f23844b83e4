// Torch-free arguments of the full_kl (exact full-vocabulary KL) kernels, shared by the CPU kernels
// (full_kl_cpu.h) and the CUDA launchers (full_kl.cuh). See docs/kernels.md.
#pragma once
#include <cstdint>

#include "row_layout.h"

namespace tike {


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
  float* lse_p = nullptr;  // [N, 2]: (max z, log Σ exp((z − max)/τ))
  float* lse_q = nullptr;  // [N, 2]: the same for zr
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

}  // namespace tike
