// CPU implementation of tike_cuda::token_logprobs and its backward
// (csrc/kernels/token_logprobs_cpu.h).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../kernels/token_logprobs_cpu.h"
#include "../ops_common.h"

namespace tike {
namespace {

int64_t grain_rows(int64_t V) { return std::max<int64_t>(1, 65536 / std::max<int64_t>(V, 1)); }

std::tuple<at::Tensor, at::Tensor, at::Tensor> token_logprobs_cpu(const at::Tensor& logits_in,
                                                                  const at::Tensor& tokens_in,
                                                                  double temperature,
                                                                  bool with_entropy) {
  check_logits(logits_in, "logits");
  TORCH_CHECK(temperature > 0, "tike_cuda: temperature must be > 0");
  const at::Tensor logits = rows_view(logits_in);
  const int64_t N = num_rows(logits), V = logits.size(-1);
  const at::Tensor tokens = *per_row(tokens_in, N, logits, at::kLong, "tokens");
  if (N > 0) {
    TORCH_CHECK(tokens.min().item<int64_t>() >= 0 && tokens.max().item<int64_t>() < V,
                "tike_cuda: tokens must be in [0, V)");
  }
  const auto f32 = f32_like(logits);
  at::Tensor logp = at::empty({N}, f32), lse = at::empty({N}, f32);
  at::Tensor entropy = at::empty({with_entropy ? N : 0}, f32);
  TokenLogprobsForwardArgs a;
  a.logits = logits.data_ptr();
  a.logits_layout = row_layout_of(logits);
  a.dtype = dtype_of(logits);
  a.N = N;
  a.V = V;
  a.tokens = tokens.data_ptr<int64_t>();
  a.temperature = float(temperature);
  a.logp = logp.data_ptr<float>();
  a.entropy = with_entropy ? entropy.data_ptr<float>() : nullptr;
  a.lse = lse.data_ptr<float>();
  at::parallel_for(0, N, grain_rows(V),
                   [&](int64_t b, int64_t e) { cpu::token_logprobs_forward_rows(a, b, e); });
  return {logp, entropy, lse};
}

at::Tensor token_logprobs_backward_cpu(const at::Tensor& grad_logp,
                                       const c10::optional<at::Tensor>& grad_entropy,
                                       const at::Tensor& logits_in, const at::Tensor& tokens_in,
                                       const at::Tensor& lse, const at::Tensor& entropy,
                                       double temperature) {
  const at::Tensor logits = rows_view(logits_in);
  const int64_t N = num_rows(logits);
  const at::Tensor tokens = tokens_in.contiguous();
  const at::Tensor g = grad_logp.to(at::kFloat).contiguous();
  c10::optional<at::Tensor> gh;
  if (grad_entropy.has_value()) {
    TORCH_CHECK(entropy.numel() == N, "tike_cuda: grad_entropy given but no entropy saved");
    gh = grad_entropy->to(at::kFloat).contiguous();
  }
  at::Tensor grad = empty_grad_like(logits_in);
  TokenLogprobsBackwardArgs a;
  a.grad_logp = g.data_ptr<float>();
  a.grad_entropy = ptr_or_null<float>(gh);
  a.logits = logits.data_ptr();
  a.logits_layout = row_layout_of(logits);
  a.dtype = dtype_of(logits);
  a.N = N;
  a.V = logits.size(-1);
  a.tokens = tokens.data_ptr<int64_t>();
  a.lse = lse.data_ptr<float>();
  a.entropy = gh.has_value() ? entropy.data_ptr<float>() : nullptr;
  a.temperature = float(temperature);
  a.grad = grad.data_ptr();
  at::parallel_for(0, N, grain_rows(a.V),
                   [&](int64_t b, int64_t e) { cpu::token_logprobs_backward_rows(a, b, e); });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(tike_cuda, CPU, m) {
  m.impl("token_logprobs", &token_logprobs_cpu);
  m.impl("token_logprobs_backward", &token_logprobs_backward_cpu);
}

}  // namespace tike
