// Torch-free arguments of the topk_kl kernels, shared by the CPU kernels
// (topk_kl_cpu.h) and the CUDA launchers (topk_kl.cuh). See docs/kernels.md.
#pragma once
#include <cstdint>

#include "row_layout.h"

namespace tike {


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
  float* lse = nullptr;     // [N, 2]: (max z, log Σ exp((z − max)/τ)), see LsePair
  int32_t* idx = nullptr;   // [N, K1]
  float* coef = nullptr;    // [N, K1]
  float* shift = nullptr;   // [N]
  float* stats = nullptr;   // [N, 3]
  // topk_kl_shard (the local pass of tike_cuda.distributed) only; null otherwise. When set,
  // the kernels write idx, lse and these instead of the KL (out, coef, shift and stats are
  // not written), and a sampled token of -1 means "not on this shard" (no slot, no error).
  float* shard_values = nullptr;  // [N, K1, 2]: (z, zr) at idx; -inf at -1 slots
  float* shard_lse_q = nullptr;   // [N, 2]: the pair of ref_logits, as lse
  float* shard_tails = nullptr;   // [N, 2]: log Σ_{v∉S~} p_v, q_v on the shard (tail_bucket)
};

struct TopkKlBackwardArgs {
  const float* grad_out = nullptr;  // [N]
  const void* logits = nullptr;     // rows per `logits_layout`
  RowLayout logits_layout;
  DType dtype = DType::Float32;
  int64_t N = 0, V = 0, K1 = 0;
  const float* lse = nullptr;      // [N, 2], as the forward wrote it
  const int32_t* idx = nullptr;
  const float* coef = nullptr;
  const float* shift = nullptr;
  const bool* mask = nullptr;
  float temperature = 1.f;
  void* grad = nullptr;             // [N, V] contiguous, `dtype`; may alias `logits`
  RowLayout grad_layout;            // layout of `grad` (equals logits_layout when in place)
};

}  // namespace tike
