// CPU implementation of tike_cuda::full_kl and its backward (csrc/kernels/full_kl_cpu.h).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../kernels/full_kl_cpu.h"
#include "../ops_prepare.h"
#include "grain.h"

namespace tike {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> full_kl_cpu(const at::Tensor& logits,
                                                           const at::Tensor& ref,
                                                           const c10::optional<at::Tensor>& mask,
                                                           double temperature) {
  const auto c = prepare_full_kl_forward(logits, ref, mask, temperature);
  at::parallel_for(0, c.args.N, cpu_grain_rows(c.args.V),
                   [&](int64_t b, int64_t e) { cpu::full_kl_forward_rows(c.args, b, e); });
  return c.outputs();
}

at::Tensor full_kl_backward_cpu(const at::Tensor& grad_out, const at::Tensor& logits,
                                const at::Tensor& ref, const at::Tensor& out,
                                const at::Tensor& lse_p, const at::Tensor& lse_q,
                                const c10::optional<at::Tensor>& mask, double temperature) {
  const auto c =
      prepare_full_kl_backward(grad_out, logits, ref, out, lse_p, lse_q, mask, temperature);
  at::parallel_for(0, c.args.N, cpu_grain_rows(c.args.V),
                   [&](int64_t b, int64_t e) { cpu::full_kl_backward_rows(c.args, b, e); });
  return c.grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(tike_cuda, CPU, m) {
  m.impl("full_kl", &full_kl_cpu);
  m.impl("full_kl_backward", &full_kl_backward_cpu);
}

}  // namespace tike
