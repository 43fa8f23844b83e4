// CPU implementation of tike_cuda::full_kl and its backward (csrc/kernels/full_kl_cpu.h).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../kernels/full_kl_cpu.h"
#include "../ops_common.h"

namespace tike {
namespace {

int64_t grain_rows(int64_t V) { return std::max<int64_t>(1, 65536 / std::max<int64_t>(V, 1)); }

std::tuple<at::Tensor, at::Tensor, at::Tensor> full_kl_cpu(const at::Tensor& logits_in,
                                                           const at::Tensor& ref_in,
                                                           const c10::optional<at::Tensor>& mask,
                                                           double temperature) {
  check_logits(logits_in, "logits");
  check_same(logits_in, ref_in, "ref_logits");
  TORCH_CHECK(temperature > 0, "tike_cuda: temperature must be > 0");
  const at::Tensor logits = rows_view(logits_in), ref = rows_view(ref_in);
  const int64_t N = num_rows(logits);
  const auto m = per_row(mask, N, logits, at::kBool, "mask");
  const auto f32 = f32_like(logits);
  at::Tensor out = at::empty({N}, f32), lse_p = at::empty({N}, f32), lse_q = at::empty({N}, f32);
  FullKlForwardArgs a;
  a.logits = logits.data_ptr();
  a.logits_layout = row_layout_of(logits);
  a.ref_logits = ref.data_ptr();
  a.ref_layout = row_layout_of(ref);
  a.dtype = dtype_of(logits);
  a.N = N;
  a.V = logits.size(-1);
  a.mask = ptr_or_null<bool>(m);
  a.temperature = float(temperature);
  a.out = out.data_ptr<float>();
  a.lse_p = lse_p.data_ptr<float>();
  a.lse_q = lse_q.data_ptr<float>();
  at::parallel_for(0, N, grain_rows(a.V),
                   [&](int64_t b, int64_t e) { cpu::full_kl_forward_rows(a, b, e); });
  return {out, lse_p, lse_q};
}

at::Tensor full_kl_backward_cpu(const at::Tensor& grad_out, const at::Tensor& logits_in,
                                const at::Tensor& ref_in, const at::Tensor& out,
                                const at::Tensor& lse_p, const at::Tensor& lse_q,
                                const c10::optional<at::Tensor>& mask, double temperature) {
  const at::Tensor logits = rows_view(logits_in), ref = rows_view(ref_in);
  const int64_t N = num_rows(logits);
  const at::Tensor g = grad_out.to(at::kFloat).contiguous();
  const auto m = per_row(mask, N, logits, at::kBool, "mask");
  at::Tensor grad = empty_grad_like(logits_in);
  FullKlBackwardArgs a;
  a.grad_out = g.data_ptr<float>();
  a.logits = logits.data_ptr();
  a.logits_layout = row_layout_of(logits);
  a.ref_logits = ref.data_ptr();
  a.ref_layout = row_layout_of(ref);
  a.dtype = dtype_of(logits);
  a.N = N;
  a.V = logits.size(-1);
  a.out = out.data_ptr<float>();
  a.lse_p = lse_p.data_ptr<float>();
  a.lse_q = lse_q.data_ptr<float>();
  a.mask = ptr_or_null<bool>(m);
  a.temperature = float(temperature);
  a.grad = grad.data_ptr();
  at::parallel_for(0, N, grain_rows(a.V),
                   [&](int64_t b, int64_t e) { cpu::full_kl_backward_rows(a, b, e); });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(tike_cuda, CPU, m) {
  m.impl("full_kl", &full_kl_cpu);
  m.impl("full_kl_backward", &full_kl_backward_cpu);
}

}  // namespace tike
