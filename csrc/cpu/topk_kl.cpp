// CPU implementation of tike_cuda::topk_kl, its backward and its shard pass (topk_kl_shard):
// the shared preparation (csrc/ops_prepare.h), then the torch-free kernels of
// csrc/kernels/topk_kl_cpu.h spread over rows with at::parallel_for.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../kernels/topk_kl_cpu.h"
#include "../ops_prepare.h"
#include "grain.h"

namespace tike {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> topk_kl_cpu(
    const at::Tensor& logits, const at::Tensor& ref, int64_t k,
    const c10::optional<at::Tensor>& sampled, const c10::optional<at::Tensor>& old_lp,
    const c10::optional<at::Tensor>& mask, double temperature, bool union_sampled,
    bool tail_bucket) {
  const auto c = prepare_topk_kl_forward(logits, ref, k, sampled, old_lp, mask, temperature,
                                         union_sampled, tail_bucket);
  // On the CPU a range check is cheap (no device sync): an out-of-range token is an error.
  if (c.tokens.has_value()) check_token_range(*c.tokens, c.args.V, "sampled_tokens", c.mask);
  at::parallel_for(0, c.args.N, cpu_grain_rows(c.args.V),
                   [&](int64_t b, int64_t e) { cpu::topk_kl_forward_rows(c.args, b, e); });
  return c.outputs();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> topk_kl_shard_cpu(
    const at::Tensor& logits, const at::Tensor& ref, int64_t k,
    const c10::optional<at::Tensor>& sampled, const c10::optional<at::Tensor>& mask,
    double temperature, bool tail_bucket) {
  const auto c = prepare_topk_kl_shard(logits, ref, k, sampled, mask, temperature, tail_bucket);
  const auto& f = c.fwd;
  if (f.tokens.has_value()) {  // -1: the token is on another shard
    const at::Tensor here = f.tokens->ne(-1);
    check_token_range(*f.tokens, f.args.V, "sampled_tokens other than -1",
                      f.mask.has_value() ? at::Tensor(here.logical_and(*f.mask)) : here);
  }
  at::parallel_for(0, f.args.N, cpu_grain_rows(f.args.V),
                   [&](int64_t b, int64_t e) { cpu::topk_kl_forward_rows(f.args, b, e); });
  return c.outputs();
}

at::Tensor topk_kl_backward_cpu(const at::Tensor& grad_out, const at::Tensor& logits,
                                const at::Tensor& lse, const at::Tensor& idx,
                                const at::Tensor& coef, const at::Tensor& shift,
                                const c10::optional<at::Tensor>& mask, double temperature) {
  const auto c = prepare_topk_kl_backward(grad_out, logits, lse, idx, coef, shift, mask,
                                          temperature, empty_grad_like(logits));
  at::parallel_for(0, c.args.N, cpu_grain_rows(c.args.V),
                   [&](int64_t b, int64_t e) { cpu::topk_kl_backward_rows(c.args, b, e); });
  return c.grad;
}

void topk_kl_backward_inplace_cpu(const at::Tensor& grad_out, const at::Tensor& logits,
                                  const at::Tensor& lse, const at::Tensor& idx,
                                  const at::Tensor& coef, const at::Tensor& shift,
                                  const c10::optional<at::Tensor>& mask, double temperature) {
  check_inplace_target(logits);
  const auto c = prepare_topk_kl_backward(grad_out, logits, lse, idx, coef, shift, mask,
                                          temperature, logits);
  at::parallel_for(0, c.args.N, cpu_grain_rows(c.args.V),
                   [&](int64_t b, int64_t e) { cpu::topk_kl_backward_rows(c.args, b, e); });
}

}  // namespace

TORCH_LIBRARY_IMPL(tike_cuda, CPU, m) {
  m.impl("topk_kl", &topk_kl_cpu);
  m.impl("topk_kl_shard", &topk_kl_shard_cpu);
  m.impl("topk_kl_backward", &topk_kl_backward_cpu);
  m.impl("topk_kl_backward_", &topk_kl_backward_inplace_cpu);
}

}  // namespace tike
