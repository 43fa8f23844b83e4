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

#include <algorithm>
#include <limits>

#include "../kernels/full_kl.cuh"
#include "../kernels/sparse.cuh"
#include "../kernels/token_logprobs.cuh"
#include "../kernels/topk_indices.cuh"
#include "../kernels/topk_kl.cuh"
#include "../ops_prepare.h"

namespace tike {
namespace {

constexpr int64_t kMaxV = int64_t(1) << 30;  // in-row indices are 32-bit on the device

// What only the CUDA kernels require, checked before the shared preparation.
void check_cuda_logits(const at::Tensor& logits) {
  TORCH_CHECK(logits.is_cuda(), "tike_cuda: logits must be a CUDA tensor");
  TORCH_CHECK(logits.dim() == 0 || logits.size(-1) < kMaxV,
              "tike_cuda: the CUDA kernels support V < 2^30, got ", logits.size(-1));
}

cudaStream_t stream() { return at::cuda::getCurrentCUDAStream().stream(); }

at::Tensor workspace(size_t bytes, const at::Tensor& like) {
  return at::empty({int64_t(bytes)}, like.options().dtype(at::kByte));
}

void* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

// S of every row for k above the register selection: a stable descending sort of the row
// (NaN as −inf, −0 as +0) keeps ties in index order, i.e. the lower index first. Rows are
// sorted a chunk at a time to bound the scratch memory; a chunk never crosses an outer
// block of the row layout, so a strided [B, T, V] view is read in place, not copied.
void preselect_topk(const at::Tensor& logits, const RowLayout& l, int64_t N, int64_t V,
                    int64_t k, const at::Tensor& idx) {
  const int64_t chunk = std::max<int64_t>(1, (int64_t(1) << 26) / V);
  for (int64_t r0 = 0; r0 < N;) {
    const int64_t rc = std::min({chunk, N - r0, l.T - r0 % l.T});
    const at::Tensor rows = logits.as_strided({rc, V}, {l.stride_t, 1},
                                              logits.storage_offset() + l.offset(r0));
    at::Tensor v = rows.to(at::kFloat, /*non_blocking=*/false, /*copy=*/true);
    v.masked_fill_(v.isnan(), -std::numeric_limits<float>::infinity());
    v.add_(0.0);
    const auto sorted = at::sort(v, /*stable=*/true, /*dim=*/1, /*descending=*/true);
    idx.narrow(0, r0, rc).narrow(1, 0, k).copy_(std::get<1>(sorted).narrow(1, 0, k));
    r0 += rc;
  }
}

// ------------------------------------------------------------------ topk_kl

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> topk_kl_cuda(
    const at::Tensor& logits, const at::Tensor& ref, int64_t k,
    const c10::optional<at::Tensor>& sampled, const c10::optional<at::Tensor>& old_lp,
    const c10::optional<at::Tensor>& mask, double temperature, bool union_sampled,
    bool tail_bucket) {
  check_cuda_logits(logits);
  const c10::cuda::CUDAGuard guard(logits.device());
  const auto c = prepare_topk_kl_forward(logits, ref, k, sampled, old_lp, mask, temperature,
                                         union_sampled, tail_bucket);
  if (c.args.N == 0) return c.outputs();
  const auto plan = cuda::topk_kl_forward_plan(c.args);
  if (plan.preselected) preselect_topk(c.logits, c.args.logits_layout, c.args.N, c.args.V, k, c.idx);
  const at::Tensor ws = plan.workspace_bytes ? workspace(plan.workspace_bytes, c.logits) : at::Tensor();
  C10_CUDA_CHECK(cuda::topk_kl_forward(c.args, plan, ptr_or_null(ws), stream()));
  return c.outputs();
}

void launch_topk_kl_backward(const TopkKlBackwardCall& c) {
  if (c.args.N == 0) return;
  const size_t bytes = cuda::topk_kl_backward_workspace_bytes(c.args);
  const at::Tensor ws = bytes ? workspace(bytes, c.logits) : at::Tensor();
  C10_CUDA_CHECK(cuda::topk_kl_backward(c.args, ptr_or_null(ws), stream()));
}

at::Tensor topk_kl_backward_cuda(const at::Tensor& grad_out, const at::Tensor& logits,
                                 const at::Tensor& lse, const at::Tensor& idx,
                                 const at::Tensor& coef, const at::Tensor& shift,
                                 const c10::optional<at::Tensor>& mask, double temperature) {
  check_cuda_logits(logits);
  const c10::cuda::CUDAGuard guard(logits.device());
  const auto c = prepare_topk_kl_backward(grad_out, logits, lse, idx, coef, shift, mask,
                                          temperature, empty_grad_like(logits));
  launch_topk_kl_backward(c);
  return c.grad;
}

void topk_kl_backward_inplace_cuda(const at::Tensor& grad_out, const at::Tensor& logits,
                                   const at::Tensor& lse, const at::Tensor& idx,
                                   const at::Tensor& coef, const at::Tensor& shift,
                                   const c10::optional<at::Tensor>& mask, double temperature) {
  check_cuda_logits(logits);
  check_inplace_target(logits);
  const c10::cuda::CUDAGuard guard(logits.device());
  launch_topk_kl_backward(prepare_topk_kl_backward(grad_out, logits, lse, idx, coef, shift,
                                                   mask, temperature, logits));
}

// ------------------------------------------------------------------ full_kl

std::tuple<at::Tensor, at::Tensor, at::Tensor> full_kl_cuda(const at::Tensor& logits,
                                                            const at::Tensor& ref,
                                                            const c10::optional<at::Tensor>& mask,
                                                            double temperature) {
  check_cuda_logits(logits);
  const c10::cuda::CUDAGuard guard(logits.device());
  const auto c = prepare_full_kl_forward(logits, ref, mask, temperature);
  if (c.args.N == 0) return c.outputs();
  const size_t bytes = cuda::full_kl_forward_workspace_bytes(c.args);
  const at::Tensor ws = bytes ? workspace(bytes, c.logits) : at::Tensor();
  C10_CUDA_CHECK(cuda::full_kl_forward(c.args, ptr_or_null(ws), stream()));
  return c.outputs();
}

at::Tensor full_kl_backward_cuda(const at::Tensor& grad_out, const at::Tensor& logits,
                                 const at::Tensor& ref, const at::Tensor& out,
                                 const at::Tensor& lse_p, const at::Tensor& lse_q,
                                 const c10::optional<at::Tensor>& mask, double temperature) {
  check_cuda_logits(logits);
  const c10::cuda::CUDAGuard guard(logits.device());
  const auto c =
      prepare_full_kl_backward(grad_out, logits, ref, out, lse_p, lse_q, mask, temperature);
  if (c.args.N > 0) C10_CUDA_CHECK(cuda::full_kl_backward(c.args, stream()));
  return c.grad;
}

// ------------------------------------------------------------------ token_logprobs

std::tuple<at::Tensor, at::Tensor, at::Tensor> token_logprobs_cuda(const at::Tensor& logits,
                                                                   const at::Tensor& tokens,
                                                                   double temperature,
                                                                   bool with_entropy) {
  check_cuda_logits(logits);
  const c10::cuda::CUDAGuard guard(logits.device());
  const auto c = prepare_token_logprobs_forward(logits, tokens, temperature, with_entropy);
  if (c.args.N == 0) return c.outputs();
  const size_t bytes = cuda::token_logprobs_forward_workspace_bytes(c.args);
  const at::Tensor ws = bytes ? workspace(bytes, c.logits) : at::Tensor();
  C10_CUDA_CHECK(cuda::token_logprobs_forward(c.args, ptr_or_null(ws), stream()));
  return c.outputs();
}

at::Tensor token_logprobs_backward_cuda(const at::Tensor& grad_logp,
                                        const c10::optional<at::Tensor>& grad_entropy,
                                        const at::Tensor& logits, const at::Tensor& tokens,
                                        const at::Tensor& lse, const at::Tensor& entropy,
                                        double temperature) {
  check_cuda_logits(logits);
  const c10::cuda::CUDAGuard guard(logits.device());
  const auto c = prepare_token_logprobs_backward(grad_logp, grad_entropy, logits, tokens, lse,
                                                 entropy, temperature);
  if (c.args.N > 0) C10_CUDA_CHECK(cuda::token_logprobs_backward(c.args, stream()));
  return c.grad;
}

// ------------------------------------------------------------------ fixed support

at::Tensor topk_indices_cuda(const at::Tensor& logits, int64_t k,
                             const c10::optional<at::Tensor>& mask) {
  check_cuda_logits(logits);
  const c10::cuda::CUDAGuard guard(logits.device());
  const auto c = prepare_topk_indices(logits, k, mask);
  if (c.args.N == 0) return c.idx;
  if (k > cuda::kTopkSelectMaxK) {  // as topk_kl: a stable sort of each row
    preselect_topk(c.logits, c.args.logits_layout, c.args.N, c.args.V, k, c.idx);
    if (c.mask.has_value()) c.idx.masked_fill_(c.mask->logical_not().unsqueeze(1), -1);
    return c.idx;
  }
  C10_CUDA_CHECK(cuda::topk_indices(c.args, stream()));
  return c.idx;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_reference_cuda(
    const at::Tensor& ref_logits, const at::Tensor& support,
    const c10::optional<at::Tensor>& sampled, const c10::optional<at::Tensor>& mask,
    double temperature) {
  check_cuda_logits(ref_logits);
  const c10::cuda::CUDAGuard guard(ref_logits.device());
  const auto c = prepare_sparse_reference(ref_logits, support, sampled, mask, temperature);
  if (c.args.N > 0) C10_CUDA_CHECK(cuda::sparse_reference(c.args, stream()));
  return c.outputs();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> topk_kl_sparse_cuda(
    const at::Tensor& logits, const at::Tensor& idx, const at::Tensor& ref_logprobs,
    const at::Tensor& ref_tail_logmass, const c10::optional<at::Tensor>& sampled,
    const c10::optional<at::Tensor>& old_lp, const c10::optional<at::Tensor>& mask,
    double temperature, bool tail_bucket) {
  check_cuda_logits(logits);
  const c10::cuda::CUDAGuard guard(logits.device());
  const auto c = prepare_topk_kl_sparse_forward(logits, idx, ref_logprobs, ref_tail_logmass,
                                                sampled, old_lp, mask, temperature, tail_bucket);
  if (c.args.N > 0) C10_CUDA_CHECK(cuda::topk_kl_sparse_forward(c.args, stream()));
  return c.outputs();
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
  m.impl("topk_indices", &topk_indices_cuda);
  m.impl("sparse_reference", &sparse_reference_cuda);
  m.impl("topk_kl_sparse", &topk_kl_sparse_cuda);
}

}  // namespace tike
