// Torch-free arguments of the fixed-support ops (docs/kernels.md, "Fixed support"),
// shared by the CPU kernels (topk_indices_cpu.h, sparse_cpu.h) and the CUDA launchers
// (topk_indices.cuh, sparse.cuh):
//   topk_indices     the k largest logits of each row, best first (what S is made of);
//   sparse_reference the reference's log-probs on S~ = support ∪ {o} and its tail mass;
//   topk_kl_sparse   TIKE on that fixed S~ with the policy's p (one pass over the row);
//                    its backward is topk_kl's (TopkKlBackwardArgs).
#pragma once
#include <cstdint>

#include "row_layout.h"

namespace tike {

struct TopkIndicesArgs {
  const void* logits = nullptr;  // [N, V] of `dtype`, rows per `logits_layout`
  RowLayout logits_layout;
  DType dtype = DType::Float32;
  int64_t N = 0, V = 0, k = 16;
  const bool* mask = nullptr;  // [N] or null
  int32_t* idx = nullptr;      // out [N, k]: value desc, index asc; −1 on masked rows
};

struct SparseReferenceArgs {
  const void* ref_logits = nullptr;  // [N, V] of `dtype`, rows per `ref_layout`
  RowLayout ref_layout;
  DType dtype = DType::Float32;
  int64_t N = 0, V = 0;
  int64_t k = 16;   // support entries per row
  int64_t K1 = 16;  // k, or k + 1 with sampled tokens
  const int32_t* support = nullptr;         // [N, k] in the caller's order
  const int32_t* sorted = nullptr;          // [N, k] the same rows, ascending
  const int64_t* sampled_tokens = nullptr;  // [N] or null
  const bool* mask = nullptr;               // [N] or null
  float temperature = 1.f;
  // outputs
  int32_t* idx = nullptr;         // [N, K1]: support, then o (−1 when o is in the support)
  float* logprobs = nullptr;      // [N, K1]: log q at idx (−inf where idx is −1)
  float* tail_logmass = nullptr;  // [N]: log Σ_{v∉S~} q_v, summed directly
};

struct TopkKlSparseArgs {
  const void* logits = nullptr;  // [N, V] of `dtype`, rows per `logits_layout`
  RowLayout logits_layout;
  DType dtype = DType::Float32;
  int64_t N = 0, V = 0, K1 = 16;
  const int32_t* idx = nullptr;               // [N, K1] S~ (−1: empty slot)
  const int32_t* sorted = nullptr;            // [N, K1] the same rows, ascending
  const float* ref_logprobs = nullptr;        // [N, K1] log q at idx
  const float* ref_tail_logmass = nullptr;    // [N] log Σ_{v∉S~} q_v
  const int64_t* sampled_tokens = nullptr;    // [N] or null (log p_o, the IS weight)
  const float* old_logprobs = nullptr;        // [N] or null (needs sampled_tokens)
  const bool* mask = nullptr;                 // [N] or null
  float temperature = 1.f;
  bool tail_bucket = false;
  // outputs (as topk_kl's, without idx: S~ is an input)
  float* out = nullptr;    // [N]
  float* lse = nullptr;    // [N, 2]: (M, ℓ) of lse_p, as topk_kl's
  float* coef = nullptr;   // [N, K1]
  float* shift = nullptr;  // [N]
  float* stats = nullptr;  // [N, 3]
};

}  // namespace tike
