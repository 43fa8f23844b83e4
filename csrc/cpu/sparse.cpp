// CPU implementation of tike_cuda::sparse_reference and tike_cuda::topk_kl_sparse (the
// backward is topk_kl_backward): the shared preparation, the value checks that are cheap
// on the CPU (on a GPU they would be a host sync: there a bad row gives NaN instead),
// then the torch-free kernels of csrc/kernels/sparse_cpu.h spread over rows.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../kernels/sparse_cpu.h"
#include "../ops_prepare.h"
#include "grain.h"

namespace tike {
namespace {

// Every unmasked row of `sorted` (ascending S~ rows, from support_rows) holds distinct
// indices in [0, V); with allow_empty, −1 marks an empty slot.
void check_support_rows(const at::Tensor& sorted, const c10::optional<at::Tensor>& mask,
                        int64_t V, bool allow_empty, const char* name) {
  if (sorted.numel() == 0) return;
  const at::Tensor live = mask.has_value() ? mask->unsqueeze(1) : at::ones({1, 1}, sorted.options().dtype(at::kBool));
  const at::Tensor out_of_range = (sorted < (allow_empty ? -1 : 0)) | (sorted >= V);
  TORCH_CHECK(!(out_of_range & live).any().item<bool>(), "tike_cuda: ", name,
              " must hold indices in [0, V=", V, ")", allow_empty ? " (or -1)" : "");
  const at::Tensor lo = sorted.narrow(1, 0, sorted.size(1) - 1);
  const at::Tensor hi = sorted.narrow(1, 1, sorted.size(1) - 1);
  TORCH_CHECK(!((lo == hi) & (hi >= 0) & live).any().item<bool>(), "tike_cuda: ", name,
              " must not repeat an index within a row");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_reference_cpu(
    const at::Tensor& ref_logits, const at::Tensor& support,
    const c10::optional<at::Tensor>& sampled, const c10::optional<at::Tensor>& mask,
    double temperature) {
  const auto c = prepare_sparse_reference(ref_logits, support, sampled, mask, temperature);
  check_support_rows(c.sorted, c.mask, c.args.V, false, "support");
  if (c.tokens.has_value()) check_token_range(*c.tokens, c.args.V, "sampled_tokens", c.mask);
  at::parallel_for(0, c.args.N, cpu_grain_rows(c.args.V),
                   [&](int64_t b, int64_t e) { cpu::sparse_reference_rows(c.args, b, e); });
  return c.outputs();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> topk_kl_sparse_cpu(
    const at::Tensor& logits, const at::Tensor& idx, const at::Tensor& ref_logprobs,
    const at::Tensor& ref_tail_logmass, const c10::optional<at::Tensor>& sampled,
    const c10::optional<at::Tensor>& old_lp, const c10::optional<at::Tensor>& mask,
    double temperature, bool tail_bucket) {
  const auto c = prepare_topk_kl_sparse_forward(logits, idx, ref_logprobs, ref_tail_logmass,
                                                sampled, old_lp, mask, temperature, tail_bucket);
  check_support_rows(c.sorted, c.mask, c.args.V, true, "idx");
  if (c.tokens.has_value()) check_token_range(*c.tokens, c.args.V, "sampled_tokens", c.mask);
  at::parallel_for(0, c.args.N, cpu_grain_rows(c.args.V),
                   [&](int64_t b, int64_t e) { cpu::topk_kl_sparse_rows(c.args, b, e); });
  return c.outputs();
}

}  // namespace

TORCH_LIBRARY_IMPL(tike_cuda, CPU, m) {
  m.impl("sparse_reference", &sparse_reference_cpu);
  m.impl("topk_kl_sparse", &topk_kl_sparse_cpu);
}

}  // namespace tike
