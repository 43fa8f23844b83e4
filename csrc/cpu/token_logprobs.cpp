// CPU implementation of tike_cuda::token_logprobs and its backward
// (csrc/kernels/token_logprobs_cpu.h).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../kernels/token_logprobs_cpu.h"
#include "../ops_prepare.h"
#include "grain.h"

namespace tike {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> token_logprobs_cpu(const at::Tensor& logits,
                                                                  const at::Tensor& tokens,
                                                                  double temperature,
                                                                  bool with_entropy) {
  const auto c = prepare_token_logprobs_forward(logits, tokens, temperature, with_entropy);
  check_token_range(c.tokens, c.args.V, "tokens");
  at::parallel_for(0, c.args.N, cpu_grain_rows(c.args.V), [&](int64_t b, int64_t e) {
    cpu::token_logprobs_forward_rows(c.args, b, e);
  });
  return c.outputs();
}

at::Tensor token_logprobs_backward_cpu(const at::Tensor& grad_logp,
                                       const c10::optional<at::Tensor>& grad_entropy,
                                       const at::Tensor& logits, const at::Tensor& tokens,
                                       const at::Tensor& lse, const at::Tensor& entropy,
                                       double temperature) {
  const auto c = prepare_token_logprobs_backward(grad_logp, grad_entropy, logits, tokens, lse,
                                                 entropy, temperature);
  // A token of −1 adds no one-hot term: a vocabulary shard that does not hold the row's
  // token (tike_cuda.distributed); the CUDA kernel skips such a token the same way.
  check_token_range(c.tokens, c.args.V, "tokens", c.tokens.ne(-1));
  at::parallel_for(0, c.args.N, cpu_grain_rows(c.args.V), [&](int64_t b, int64_t e) {
    cpu::token_logprobs_backward_rows(c.args, b, e);
  });
  return c.grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(tike_cuda, CPU, m) {
  m.impl("token_logprobs", &token_logprobs_cpu);
  m.impl("token_logprobs_backward", &token_logprobs_backward_cpu);
}

}  // namespace tike
