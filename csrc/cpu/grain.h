// Shared by the CPU glue: how rows are handed to at::parallel_for, and the token check
// that is cheap on the CPU (on a GPU it would be a host sync).
#pragma once
#include <ATen/ATen.h>

#include <algorithm>

namespace tike {

// Rows per task: whole rows, at least ~64k elements of work each so that short rows
// (small V) are not scheduled one by one.
inline int64_t cpu_grain_rows(int64_t V) {
  return std::max<int64_t>(1, 65536 / std::max<int64_t>(V, 1));
}

// Token ids of masked rows are never read (padding such as -100 is fine there), so only
// the rows `mask` keeps are checked.
inline void check_token_range(const at::Tensor& tokens, int64_t V, const char* name,
                              const c10::optional<at::Tensor>& mask = c10::nullopt) {
  const at::Tensor live = mask.has_value() ? tokens.masked_select(*mask) : tokens;
  if (live.numel() == 0) return;
  TORCH_CHECK(live.min().item<int64_t>() >= 0 && live.max().item<int64_t>() < V,
              "tike_cuda: ", name, " must be in [0, V=", V, ")",
              mask.has_value() ? " at unmasked rows" : "");
}

}  // namespace tike
