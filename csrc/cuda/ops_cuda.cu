// CUDA implementation of every tike_cuda operator (schemas in csrc/ops.cpp): checks,
// output allocation (the same shapes as the CPU glue in csrc/cpu/), the current stream,
// and the torch-free launchers of csrc/kernels/*.cuh. No host synchronisation: values
// that would need one (a token out of [0, V)) are caught on the device and give NaN rows.
//
// One translation unit on purpose: each .cu that includes torch headers costs about a
// minute of compile time.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>

#include "../kernels/full_kl.cuh"
#include "../kernels/token_logprobs.cuh"
#include "../kernels/topk_kl.cuh"
#include "../ops_common.h"

namespace tike {
namespace {

constexpr int64_t kMaxV = int64_t(1) << 30;  // in-row indices are 32-bit on the device

void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "tike_cuda: ", name, " must be a CUDA tensor");
}

void check_vocab(int64_t V) {
  TORCH_CHECK(V < kMaxV, "tike_cuda: the CUDA kernels support V < 2^30, got ", V);
}

at::Tensor workspace(size_t bytes, const at::Tensor& like) {
  return at::empty({int64_t(bytes)}, like.options().dtype(at::kByte));
}

void* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

// Per-row float32 saved tensors of the backward ops (produced by the forward).
at::Tensor saved_f32(const at::Tensor& t, int64_t numel, const at::Tensor& logits,
                     const char* name) {
  TORCH_CHECK(t.numel() == numel, "tike_cuda: ", name, " must have ", numel, " elements, got ",
              t.numel());
  TORCH_CHECK(t.device() == logits.device(), "tike_cuda: ", name,
              " must be on the logits' device");
  return t.to(at::kFloat).contiguous();
}

// S of every row for k above the register selection: a stable descending sort of the row
// (NaN as −inf, −0 as +0) keeps ties in index order, i.e. the lower index first. Rows are
// sorted in chunks to bound the scratch memory (masked rows too: their idx is rewritten).
void preselect_topk(const at::Tensor& logits, int64_t N, int64_t V, int64_t k,
                    const at::Tensor& idx) {
  const at::Tensor flat = logits.reshape({N, V});
  const int64_t chunk = std::max<int64_t>(1, (int64_t(1) << 26) / V);
  for (int64_t r0 = 0; r0 < N; r0 += chunk) {
    const int64_t rc = std::min(chunk, N - r0);
    at::Tensor v = flat.narrow(0, r0, rc).to(at::kFloat, /*non_blocking=*/false, /*copy=*/true);
    v.masked_fill_(v.isnan(), -std::numeric_limits<float>::infinity());
    v.add_(0.0);
    const auto sorted = at::sort(v, /*stable=*/true, /*dim=*/1, /*descending=*/true);
    idx.narrow(0, r0, rc).narrow(1, 0, k).copy_(std::get<1>(sorted).narrow(1, 0, k));
  }
}

// ------------------------------------------------------------------ topk_kl

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> topk_kl_cuda(
    const at::Tensor& logits_in, const at::Tensor& ref_in, int64_t k,
    const c10::optional<at::Tensor>& sampled, const c10::optional<at::Tensor>& old_lp,
    const c10::optional<at::Tensor>& mask, double temperature, bool union_sampled,
    bool tail_bucket) {
  check_logits(logits_in, "logits");
  check_same(logits_in, ref_in, "ref_logits");
  check_cuda(logits_in, "logits");
  const int64_t V = logits_in.size(-1);
  check_vocab(V);
  TORCH_CHECK(k >= 1 && k <= V, "tike_cuda: k must be in [1, V=", V, "], got ", k);
  TORCH_CHECK(temperature > 0, "tike_cuda: temperature must be > 0");
  TORCH_CHECK(!old_lp.has_value() || sampled.has_value(),
              "tike_cuda: old_logprobs needs sampled_tokens");
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const at::Tensor logits = rows_view(logits_in), ref = rows_view(ref_in);
  const int64_t N = num_rows(logits);
  const auto tokens = per_row(sampled, N, logits, at::kLong, "sampled_tokens");
  const auto old = per_row(old_lp, N, logits, at::kFloat, "old_logprobs");
  const auto m = per_row(mask, N, logits, at::kBool, "mask");
  const int64_t K1 = k + ((tokens.has_value() && union_sampled) ? 1 : 0);
  const auto f32 = f32_like(logits);
  at::Tensor out = at::empty({N}, f32), lse = at::empty({N}, f32), shift = at::empty({N}, f32);
  at::Tensor idx = at::empty({N, K1}, logits.options().dtype(at::kInt));
  at::Tensor coef = at::empty({N, K1}, f32), stats = at::empty({N, 3}, f32);
  if (N == 0) return {out, lse, idx, coef, shift, stats};

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
  a.sampled_tokens = tike::ptr_or_null<int64_t>(tokens);
  a.old_logprobs = tike::ptr_or_null<float>(old);
  a.mask = tike::ptr_or_null<bool>(m);
  a.temperature = float(temperature);
  a.tail_bucket = tail_bucket;
  a.out = out.data_ptr<float>();
  a.lse = lse.data_ptr<float>();
  a.idx = idx.data_ptr<int32_t>();
  a.coef = coef.data_ptr<float>();
  a.shift = shift.data_ptr<float>();
  a.stats = stats.data_ptr<float>();
  const auto plan = cuda::topk_kl_forward_plan(a);
  if (plan.preselected) preselect_topk(logits, N, V, k, idx);
  const at::Tensor ws = plan.workspace_bytes ? workspace(plan.workspace_bytes, logits) : at::Tensor();
  C10_CUDA_CHECK(cuda::topk_kl_forward(a, plan, ptr_or_null(ws),
                                       at::cuda::getCurrentCUDAStream().stream()));
  return {out, lse, idx, coef, shift, stats};
}

// Shared by the out-of-place and in-place backward: `grad` receives the gradient.
void topk_kl_backward_into(const at::Tensor& grad_out, const at::Tensor& logits,
                           const at::Tensor& lse, const at::Tensor& idx, const at::Tensor& coef,
                           const at::Tensor& shift, const c10::optional<at::Tensor>& mask,
                           double temperature, const at::Tensor& grad) {
  check_logits(logits, "logits");
  check_cuda(logits, "logits");
  TORCH_CHECK(temperature > 0, "tike_cuda: temperature must be > 0");
  const int64_t N = num_rows(logits), V = logits.size(-1);
  check_vocab(V);
  TORCH_CHECK(idx.dim() == 2 && idx.size(0) == N && coef.sizes() == idx.sizes() &&
                  idx.scalar_type() == at::kInt && idx.device() == logits.device(),
              "tike_cuda: topk_kl_backward: saved tensors do not match the logits");
  if (N == 0) return;
  const at::Tensor g = saved_f32(grad_out, N, logits, "grad_out");
  const at::Tensor l = saved_f32(lse, N, logits, "lse"), sh = saved_f32(shift, N, logits, "shift");
  const at::Tensor cf = saved_f32(coef, coef.numel(), logits, "coef");
  const at::Tensor ix = idx.contiguous();
  const auto m = per_row(mask, N, logits, at::kBool, "mask");
  TopkKlBackwardArgs a;
  a.grad_out = g.data_ptr<float>();
  a.logits = logits.data_ptr();
  a.logits_layout = row_layout_of(logits);
  a.dtype = dtype_of(logits);
  a.N = N;
  a.V = V;
  a.K1 = idx.size(1);
  a.lse = l.data_ptr<float>();
  a.idx = ix.data_ptr<int32_t>();
  a.coef = cf.data_ptr<float>();
  a.shift = sh.data_ptr<float>();
  a.mask = tike::ptr_or_null<bool>(m);
  a.temperature = float(temperature);
  a.grad = grad.data_ptr();
  a.grad_layout = row_layout_of(grad);
  const size_t bytes = cuda::topk_kl_backward_workspace_bytes(a);
  const at::Tensor ws = bytes ? workspace(bytes, logits) : at::Tensor();
  C10_CUDA_CHECK(
      cuda::topk_kl_backward(a, ptr_or_null(ws), at::cuda::getCurrentCUDAStream().stream()));
}

at::Tensor topk_kl_backward_cuda(const at::Tensor& grad_out, const at::Tensor& logits_in,
                                 const at::Tensor& lse, const at::Tensor& idx,
                                 const at::Tensor& coef, const at::Tensor& shift,
                                 const c10::optional<at::Tensor>& mask, double temperature) {
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const at::Tensor logits = rows_view(logits_in);
  at::Tensor grad = at::empty(logits_in.sizes(), logits_in.options());
  topk_kl_backward_into(grad_out, logits, lse, idx, coef, shift, mask, temperature, grad);
  return grad;
}

void topk_kl_backward_inplace_cuda(const at::Tensor& grad_out, const at::Tensor& logits,
                                   const at::Tensor& lse, const at::Tensor& idx,
                                   const at::Tensor& coef, const at::Tensor& shift,
                                   const c10::optional<at::Tensor>& mask, double temperature) {
  const c10::cuda::CUDAGuard guard(logits.device());
  TORCH_CHECK(rows_view(logits).is_same(logits),
              "tike_cuda: in-place backward needs logits with a unit last stride and at most "
              "two non-mergeable leading dims");
  topk_kl_backward_into(grad_out, logits, lse, idx, coef, shift, mask, temperature, logits);
}

// ------------------------------------------------------------------ full_kl

std::tuple<at::Tensor, at::Tensor, at::Tensor> full_kl_cuda(const at::Tensor& logits_in,
                                                            const at::Tensor& ref_in,
                                                            const c10::optional<at::Tensor>& mask,
                                                            double temperature) {
  check_logits(logits_in, "logits");
  check_same(logits_in, ref_in, "ref_logits");
  check_cuda(logits_in, "logits");
  check_vocab(logits_in.size(-1));
  TORCH_CHECK(temperature > 0, "tike_cuda: temperature must be > 0");
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const at::Tensor logits = rows_view(logits_in), ref = rows_view(ref_in);
  const int64_t N = num_rows(logits);
  const auto m = per_row(mask, N, logits, at::kBool, "mask");
  const auto f32 = f32_like(logits);
  at::Tensor out = at::empty({N}, f32), lse_p = at::empty({N}, f32), lse_q = at::empty({N}, f32);
  if (N == 0) return {out, lse_p, lse_q};
  FullKlForwardArgs a;
  a.logits = logits.data_ptr();
  a.logits_layout = row_layout_of(logits);
  a.ref_logits = ref.data_ptr();
  a.ref_layout = row_layout_of(ref);
  a.dtype = dtype_of(logits);
  a.N = N;
  a.V = logits.size(-1);
  a.mask = tike::ptr_or_null<bool>(m);
  a.temperature = float(temperature);
  a.out = out.data_ptr<float>();
  a.lse_p = lse_p.data_ptr<float>();
  a.lse_q = lse_q.data_ptr<float>();
  const size_t bytes = cuda::full_kl_forward_workspace_bytes(a);
  const at::Tensor ws = bytes ? workspace(bytes, logits) : at::Tensor();
  C10_CUDA_CHECK(
      cuda::full_kl_forward(a, ptr_or_null(ws), at::cuda::getCurrentCUDAStream().stream()));
  return {out, lse_p, lse_q};
}

at::Tensor full_kl_backward_cuda(const at::Tensor& grad_out, const at::Tensor& logits_in,
                                 const at::Tensor& ref_in, const at::Tensor& out,
                                 const at::Tensor& lse_p, const at::Tensor& lse_q,
                                 const c10::optional<at::Tensor>& mask, double temperature) {
  check_logits(logits_in, "logits");
  check_same(logits_in, ref_in, "ref_logits");
  check_cuda(logits_in, "logits");
  check_vocab(logits_in.size(-1));
  TORCH_CHECK(temperature > 0, "tike_cuda: temperature must be > 0");
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const at::Tensor logits = rows_view(logits_in), ref = rows_view(ref_in);
  const int64_t N = num_rows(logits);
  at::Tensor grad = at::empty(logits_in.sizes(), logits_in.options());
  if (N == 0) return grad;
  const at::Tensor g = saved_f32(grad_out, N, logits, "grad_out");
  const at::Tensor o = saved_f32(out, N, logits, "out");
  const at::Tensor lp = saved_f32(lse_p, N, logits, "lse_p");
  const at::Tensor lq = saved_f32(lse_q, N, logits, "lse_q");
  const auto m = per_row(mask, N, logits, at::kBool, "mask");
  FullKlBackwardArgs a;
  a.grad_out = g.data_ptr<float>();
  a.logits = logits.data_ptr();
  a.logits_layout = row_layout_of(logits);
  a.ref_logits = ref.data_ptr();
  a.ref_layout = row_layout_of(ref);
  a.dtype = dtype_of(logits);
  a.N = N;
  a.V = logits.size(-1);
  a.out = o.data_ptr<float>();
  a.lse_p = lp.data_ptr<float>();
  a.lse_q = lq.data_ptr<float>();
  a.mask = tike::ptr_or_null<bool>(m);
  a.temperature = float(temperature);
  a.grad = grad.data_ptr();
  C10_CUDA_CHECK(cuda::full_kl_backward(a, at::cuda::getCurrentCUDAStream().stream()));
  return grad;
}

// ------------------------------------------------------------------ token_logprobs

std::tuple<at::Tensor, at::Tensor, at::Tensor> token_logprobs_cuda(const at::Tensor& logits_in,
                                                                   const at::Tensor& tokens_in,
                                                                   double temperature,
                                                                   bool with_entropy) {
  check_logits(logits_in, "logits");
  check_cuda(logits_in, "logits");
  check_vocab(logits_in.size(-1));
  TORCH_CHECK(temperature > 0, "tike_cuda: temperature must be > 0");
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const at::Tensor logits = rows_view(logits_in);
  const int64_t N = num_rows(logits), V = logits.size(-1);
  const at::Tensor tokens = *per_row(tokens_in, N, logits, at::kLong, "tokens");
  const auto f32 = f32_like(logits);
  at::Tensor logp = at::empty({N}, f32), lse = at::empty({N}, f32);
  at::Tensor entropy = at::empty({with_entropy ? N : 0}, f32);
  if (N == 0) return {logp, entropy, lse};
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
  const size_t bytes = cuda::token_logprobs_forward_workspace_bytes(a);
  const at::Tensor ws = bytes ? workspace(bytes, logits) : at::Tensor();
  C10_CUDA_CHECK(cuda::token_logprobs_forward(a, ptr_or_null(ws),
                                              at::cuda::getCurrentCUDAStream().stream()));
  return {logp, entropy, lse};
}

at::Tensor token_logprobs_backward_cuda(const at::Tensor& grad_logp,
                                        const c10::optional<at::Tensor>& grad_entropy,
                                        const at::Tensor& logits_in, const at::Tensor& tokens_in,
                                        const at::Tensor& lse, const at::Tensor& entropy,
                                        double temperature) {
  check_logits(logits_in, "logits");
  check_cuda(logits_in, "logits");
  check_vocab(logits_in.size(-1));
  TORCH_CHECK(temperature > 0, "tike_cuda: temperature must be > 0");
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const at::Tensor logits = rows_view(logits_in);
  const int64_t N = num_rows(logits);
  at::Tensor grad = at::empty(logits_in.sizes(), logits_in.options());
  if (N == 0) return grad;
  const at::Tensor tokens = *per_row(tokens_in, N, logits, at::kLong, "tokens");
  const at::Tensor g = saved_f32(grad_logp, N, logits, "grad_logp");
  const at::Tensor l = saved_f32(lse, N, logits, "lse");
  at::Tensor gh, h;
  if (grad_entropy.has_value()) {
    TORCH_CHECK(entropy.numel() == N, "tike_cuda: grad_entropy given but no entropy saved");
    gh = saved_f32(*grad_entropy, N, logits, "grad_entropy");
    h = saved_f32(entropy, N, logits, "entropy");
  }
  TokenLogprobsBackwardArgs a;
  a.grad_logp = g.data_ptr<float>();
  a.grad_entropy = gh.defined() ? gh.data_ptr<float>() : nullptr;
  a.logits = logits.data_ptr();
  a.logits_layout = row_layout_of(logits);
  a.dtype = dtype_of(logits);
  a.N = N;
  a.V = logits.size(-1);
  a.tokens = tokens.data_ptr<int64_t>();
  a.lse = l.data_ptr<float>();
  a.entropy = h.defined() ? h.data_ptr<float>() : nullptr;
  a.temperature = float(temperature);
  a.grad = grad.data_ptr();
  C10_CUDA_CHECK(cuda::token_logprobs_backward(a, at::cuda::getCurrentCUDAStream().stream()));
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(tike_cuda, CUDA, m) {
  m.impl("topk_kl", &topk_kl_cuda);
  m.impl("topk_kl_backward", &topk_kl_backward_cuda);
  m.impl("topk_kl_backward_", &topk_kl_backward_inplace_cuda);
  m.impl("full_kl", &full_kl_cuda);
  m.impl("full_kl_backward", &full_kl_backward_cuda);
  m.impl("token_logprobs", &token_logprobs_cuda);
  m.impl("token_logprobs_backward", &token_logprobs_backward_cuda);
}

}  // namespace tike
