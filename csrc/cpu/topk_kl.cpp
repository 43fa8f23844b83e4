// CPU implementation of tike_cuda::topk_kl and its backward: checks, allocation, and the
// torch-free kernels of csrc/kernels/topk_kl_cpu.h spread over rows with at::parallel_for.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../kernels/topk_kl_cpu.h"
#include "../ops_common.h"

namespace tike {
namespace {

int64_t grain_rows(int64_t V) { return std::max<int64_t>(1, 65536 / std::max<int64_t>(V, 1)); }

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> topk_kl_cpu(
    const at::Tensor& logits_in, const at::Tensor& ref_in, int64_t k,
    const c10::optional<at::Tensor>& sampled, const c10::optional<at::Tensor>& old_lp,
    const c10::optional<at::Tensor>& mask, double temperature, bool union_sampled,
    bool tail_bucket) {
  check_logits(logits_in, "logits");
  check_same(logits_in, ref_in, "ref_logits");
  const int64_t V = logits_in.size(-1);
  TORCH_CHECK(k >= 1 && k <= V, "tike_cuda: k must be in [1, V=", V, "], got ", k);
  TORCH_CHECK(temperature > 0, "tike_cuda: temperature must be > 0");
  TORCH_CHECK(!old_lp.has_value() || sampled.has_value(),
              "tike_cuda: old_logprobs needs sampled_tokens");
  const at::Tensor logits = rows_view(logits_in), ref = rows_view(ref_in);
  const int64_t N = num_rows(logits);
  const auto tokens = per_row(sampled, N, logits, at::kLong, "sampled_tokens");
  const auto old = per_row(old_lp, N, logits, at::kFloat, "old_logprobs");
  const auto m = per_row(mask, N, logits, at::kBool, "mask");
  if (tokens.has_value() && N > 0) {
    TORCH_CHECK(tokens->min().item<int64_t>() >= 0 && tokens->max().item<int64_t>() < V,
                "tike_cuda: sampled_tokens must be in [0, V)");
  }
  const int64_t K1 = k + ((tokens.has_value() && union_sampled) ? 1 : 0);
  const auto f32 = f32_like(logits);
  at::Tensor out = at::empty({N}, f32), lse = at::empty({N}, f32), shift = at::empty({N}, f32);
  at::Tensor idx = at::empty({N, K1}, logits.options().dtype(at::kInt));
  at::Tensor coef = at::empty({N, K1}, f32), stats = at::empty({N, 3}, f32);

  TopkKlForwardArgs a;
  a.logits = logits.data_ptr();
  a.logits_layout = row_layout_of(logits);
  a.ref_logits = ref.data_ptr();
  a.ref_layout = row_layout_of(ref);
  a.dtype = dtype_of(logits);
  a.N = N;
  a.V = V;
  a.k = k;
  a.K1 = K1;
  a.sampled_tokens = ptr_or_null<int64_t>(tokens);
  a.old_logprobs = ptr_or_null<float>(old);
  a.mask = ptr_or_null<bool>(m);
  a.temperature = float(temperature);
  a.tail_bucket = tail_bucket;
  a.out = out.data_ptr<float>();
  a.lse = lse.data_ptr<float>();
  a.idx = idx.data_ptr<int32_t>();
  a.coef = coef.data_ptr<float>();
  a.shift = shift.data_ptr<float>();
  a.stats = stats.data_ptr<float>();
  at::parallel_for(0, N, grain_rows(V),
                   [&](int64_t b, int64_t e) { cpu::topk_kl_forward_rows(a, b, e); });
  return {out, lse, idx, coef, shift, stats};
}

// Shared by the out-of-place and in-place backward: `grad` receives the gradient.
void topk_kl_backward_into(const at::Tensor& grad_out, const at::Tensor& logits,
                           const at::Tensor& lse, const at::Tensor& idx, const at::Tensor& coef,
                           const at::Tensor& shift, const c10::optional<at::Tensor>& mask,
                           double temperature, const at::Tensor& grad) {
  const int64_t N = num_rows(logits), V = logits.size(-1);
  TORCH_CHECK(idx.dim() == 2 && idx.size(0) == N && coef.sizes() == idx.sizes(),
              "tike_cuda: topk_kl_backward: saved tensors do not match the logits");
  const at::Tensor g = grad_out.to(at::kFloat).contiguous();
  const auto m = per_row(mask, N, logits, at::kBool, "mask");
  TopkKlBackwardArgs a;
  a.grad_out = g.data_ptr<float>();
  a.logits = logits.data_ptr();
  a.logits_layout = row_layout_of(logits);
  a.dtype = dtype_of(logits);
  a.N = N;
  a.V = V;
  a.K1 = idx.size(1);
  a.lse = lse.data_ptr<float>();
  a.idx = idx.data_ptr<int32_t>();
  a.coef = coef.data_ptr<float>();
  a.shift = shift.data_ptr<float>();
  a.mask = ptr_or_null<bool>(m);
  a.temperature = float(temperature);
  a.grad = grad.data_ptr();
  a.grad_layout = row_layout_of(grad);
  at::parallel_for(0, N, grain_rows(V),
                   [&](int64_t b, int64_t e) { cpu::topk_kl_backward_rows(a, b, e); });
}

at::Tensor topk_kl_backward_cpu(const at::Tensor& grad_out, const at::Tensor& logits_in,
                                const at::Tensor& lse, const at::Tensor& idx,
                                const at::Tensor& coef, const at::Tensor& shift,
                                const c10::optional<at::Tensor>& mask, double temperature) {
  const at::Tensor logits = rows_view(logits_in);
  at::Tensor grad = empty_grad_like(logits_in);
  topk_kl_backward_into(grad_out, logits, lse, idx, coef, shift, mask, temperature, grad);
  return grad;
}

void topk_kl_backward_inplace_cpu(const at::Tensor& grad_out, const at::Tensor& logits,
                                  const at::Tensor& lse, const at::Tensor& idx,
                                  const at::Tensor& coef, const at::Tensor& shift,
                                  const c10::optional<at::Tensor>& mask, double temperature) {
  TORCH_CHECK(rows_view(logits).is_same(logits),
              "tike_cuda: in-place backward needs logits with a unit last stride and at most "
              "two non-mergeable leading dims");
  topk_kl_backward_into(grad_out, logits, lse, idx, coef, shift, mask, temperature, logits);
}

}  // namespace

TORCH_LIBRARY_IMPL(tike_cuda, CPU, m) {
  m.impl("topk_kl", &topk_kl_cpu);
  m.impl("topk_kl_backward", &topk_kl_backward_cpu);
  m.impl("topk_kl_backward_", &topk_kl_backward_inplace_cpu);
}

}  // namespace tike
