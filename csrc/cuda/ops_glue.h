// The CUDA glue of every tike_cuda operator (schemas in csrc/ops.cpp), written once over a
// device policy `D`: the shared preparation (csrc/ops_prepare.h), workspaces, the k > 256
// preselection and the torch-free launchers of csrc/kernels/*.cuh. Two policies use it:
//   * CudaDevice (ops_cuda.cu): CUDA tensors, the current stream, a device guard and
//     C10_CUDA_CHECK;
//   * EmuDevice (csrc/emu/ops_emu.cpp): CPU tensors, the kernels run by the CPU emulation of
//     the CUDA execution model, errors with the emulation's message.
// No host synchronisation: values that would need one (a token out of [0, V)) are caught on
// the device and give NaN rows.
//
// D provides:  static void check_logits(const at::Tensor&);   what only D requires
//              using Guard = ...;  (constructed from a c10::Device)
//              static cudaStream_t stream();
//              static void check(cudaError_t);               throws on an error
#pragma once
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "../kernels/full_kl.cuh"
#include "../kernels/sparse.cuh"
#include "../kernels/token_logprobs.cuh"
#include "../kernels/topk_indices.cuh"
#include "../kernels/topk_kl.cuh"
#include "../ops_prepare.h"

namespace tike::glue {

constexpr int64_t kMaxV = int64_t(1) << 30;  // in-row indices are 32-bit on the device

inline void check_v(const at::Tensor& logits) {
  TORCH_CHECK(logits.dim() == 0 || logits.size(-1) < kMaxV,
              "tike_cuda: the CUDA kernels support V < 2^30, got ", logits.size(-1));
}

inline at::Tensor workspace(size_t bytes, const at::Tensor& like) {
  return bytes ? at::empty({int64_t(bytes)}, like.options().dtype(at::kByte)) : at::Tensor();
}

inline void* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

// S of every row for k above the register selection: a stable descending sort of the row
// (NaN as −inf, −0 as +0) keeps ties in index order, i.e. the lower index first. Rows are
// sorted a chunk at a time to bound the scratch memory; a chunk never crosses an outer
// block of the row layout, so a strided [B, T, V] view is read in place, not copied.
inline void preselect_topk(const at::Tensor& logits, const RowLayout& l, int64_t N, int64_t V,
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

template <class D>
struct Ops {
  using Tensor = at::Tensor;
  using OptTensor = c10::optional<at::Tensor>;

  // ---------------------------------------------------------------- topk_kl

  static std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> topk_kl(
      const Tensor& logits, const Tensor& ref, int64_t k, const OptTensor& sampled,
      const OptTensor& old_lp, const OptTensor& mask, double temperature, bool union_sampled,
      bool tail_bucket) {
    D::check_logits(logits);
    check_v(logits);
    const typename D::Guard guard(logits.device());
    const auto c = prepare_topk_kl_forward(logits, ref, k, sampled, old_lp, mask, temperature,
                                           union_sampled, tail_bucket);
    launch_topk_kl_forward(c);
    return c.outputs();
  }

  // topk_kl's forward kernels with the shard outputs set (no host sync: a token outside
  // [-1, V) gives a NaN row, as in topk_kl).
  static std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> topk_kl_shard(
      const Tensor& logits, const Tensor& ref, int64_t k, const OptTensor& sampled,
      const OptTensor& mask, double temperature, bool tail_bucket) {
    D::check_logits(logits);
    check_v(logits);
    const typename D::Guard guard(logits.device());
    const auto c = prepare_topk_kl_shard(logits, ref, k, sampled, mask, temperature, tail_bucket);
    launch_topk_kl_forward(c.fwd);
    return c.outputs();
  }

  static void launch_topk_kl_forward(const TopkKlForwardCall& c) {
    if (c.args.N == 0) return;
    const auto plan = cuda::topk_kl_forward_plan(c.args);
    const TopkKlForwardArgs& a = c.args;
    if (plan.preselected) preselect_topk(c.logits, a.logits_layout, a.N, a.V, a.k, c.idx);
    const Tensor ws = workspace(plan.workspace_bytes, c.logits);
    D::check(cuda::topk_kl_forward(c.args, plan, ptr_or_null(ws), D::stream()));
  }

  static void launch_topk_kl_backward(const TopkKlBackwardCall& c) {
    if (c.args.N == 0) return;
    const Tensor ws = workspace(cuda::topk_kl_backward_workspace_bytes(c.args), c.logits);
    D::check(cuda::topk_kl_backward(c.args, ptr_or_null(ws), D::stream()));
  }

  static Tensor topk_kl_backward(const Tensor& grad_out, const Tensor& logits, const Tensor& lse,
                                 const Tensor& idx, const Tensor& coef, const Tensor& shift,
                                 const OptTensor& mask, double temperature) {
    D::check_logits(logits);
    check_v(logits);
    const typename D::Guard guard(logits.device());
    const auto c = prepare_topk_kl_backward(grad_out, logits, lse, idx, coef, shift, mask,
                                            temperature, empty_grad_like(logits));
    launch_topk_kl_backward(c);
    return c.grad;
  }

  static void topk_kl_backward_inplace(const Tensor& grad_out, const Tensor& logits,
                                       const Tensor& lse, const Tensor& idx, const Tensor& coef,
                                       const Tensor& shift, const OptTensor& mask,
                                       double temperature) {
    D::check_logits(logits);
    check_v(logits);
    check_inplace_target(logits);
    const typename D::Guard guard(logits.device());
    launch_topk_kl_backward(prepare_topk_kl_backward(grad_out, logits, lse, idx, coef, shift,
                                                     mask, temperature, logits));
  }

  // ---------------------------------------------------------------- full_kl

  static std::tuple<Tensor, Tensor, Tensor> full_kl(const Tensor& logits, const Tensor& ref,
                                                    const OptTensor& mask, double temperature) {
    D::check_logits(logits);
    check_v(logits);
    const typename D::Guard guard(logits.device());
    const auto c = prepare_full_kl_forward(logits, ref, mask, temperature);
    if (c.args.N == 0) return c.outputs();
    const Tensor ws = workspace(cuda::full_kl_forward_workspace_bytes(c.args), c.logits);
    D::check(cuda::full_kl_forward(c.args, ptr_or_null(ws), D::stream()));
    return c.outputs();
  }

  static Tensor full_kl_backward(const Tensor& grad_out, const Tensor& logits, const Tensor& ref,
                                 const Tensor& out, const Tensor& lse_p, const Tensor& lse_q,
                                 const OptTensor& mask, double temperature) {
    D::check_logits(logits);
    check_v(logits);
    const typename D::Guard guard(logits.device());
    const auto c =
        prepare_full_kl_backward(grad_out, logits, ref, out, lse_p, lse_q, mask, temperature);
    if (c.args.N > 0) D::check(cuda::full_kl_backward(c.args, D::stream()));
    return c.grad;
  }

  // ---------------------------------------------------------------- token_logprobs

  static std::tuple<Tensor, Tensor, Tensor> token_logprobs(const Tensor& logits,
                                                           const Tensor& tokens,
                                                           double temperature,
                                                           bool with_entropy) {
    D::check_logits(logits);
    check_v(logits);
    const typename D::Guard guard(logits.device());
    const auto c = prepare_token_logprobs_forward(logits, tokens, temperature, with_entropy);
    if (c.args.N == 0) return c.outputs();
    const Tensor ws = workspace(cuda::token_logprobs_forward_workspace_bytes(c.args), c.logits);
    D::check(cuda::token_logprobs_forward(c.args, ptr_or_null(ws), D::stream()));
    return c.outputs();
  }

  static Tensor token_logprobs_backward(const Tensor& grad_logp, const OptTensor& grad_entropy,
                                        const Tensor& logits, const Tensor& tokens,
                                        const Tensor& lse, const Tensor& entropy,
                                        double temperature) {
    D::check_logits(logits);
    check_v(logits);
    const typename D::Guard guard(logits.device());
    const auto c = prepare_token_logprobs_backward(grad_logp, grad_entropy, logits, tokens, lse,
                                                   entropy, temperature);
    if (c.args.N > 0) D::check(cuda::token_logprobs_backward(c.args, D::stream()));
    return c.grad;
  }

  // ---------------------------------------------------------------- fixed support

  static Tensor topk_indices(const Tensor& logits, int64_t k, const OptTensor& mask) {
    D::check_logits(logits);
    check_v(logits);
    const typename D::Guard guard(logits.device());
    const auto c = prepare_topk_indices(logits, k, mask);
    if (c.args.N == 0) return c.idx;
    if (k > cuda::kTopkSelectMaxK) {  // as topk_kl: a stable sort of each row
      preselect_topk(c.logits, c.args.logits_layout, c.args.N, c.args.V, k, c.idx);
      if (c.mask.has_value()) c.idx.masked_fill_(c.mask->logical_not().unsqueeze(1), -1);
      return c.idx;
    }
    D::check(cuda::topk_indices(c.args, D::stream()));
    return c.idx;
  }

  static std::tuple<Tensor, Tensor, Tensor> sparse_reference(const Tensor& ref_logits,
                                                             const Tensor& support,
                                                             const OptTensor& sampled,
                                                             const OptTensor& mask,
                                                             double temperature) {
    D::check_logits(ref_logits);
    check_v(ref_logits);
    const typename D::Guard guard(ref_logits.device());
    const auto c = prepare_sparse_reference(ref_logits, support, sampled, mask, temperature);
    if (c.args.N > 0) D::check(cuda::sparse_reference(c.args, D::stream()));
    return c.outputs();
  }

  static std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> topk_kl_sparse(
      const Tensor& logits, const Tensor& idx, const Tensor& ref_logprobs,
      const Tensor& ref_tail_logmass, const OptTensor& sampled, const OptTensor& old_lp,
      const OptTensor& mask, double temperature, bool tail_bucket) {
    D::check_logits(logits);
    check_v(logits);
    const typename D::Guard guard(logits.device());
    const auto c = prepare_topk_kl_sparse_forward(logits, idx, ref_logprobs, ref_tail_logmass,
                                                  sampled, old_lp, mask, temperature, tail_bucket);
    if (c.args.N > 0) D::check(cuda::topk_kl_sparse_forward(c.args, D::stream()));
    return c.outputs();
  }

  // Every op of the tike_cuda schemas, for one TORCH_LIBRARY_IMPL block.
  static void register_all(torch::Library& m) {
    m.impl("topk_kl", &topk_kl);
    m.impl("topk_kl_shard", &topk_kl_shard);
    m.impl("topk_kl_backward", &topk_kl_backward);
    m.impl("topk_kl_backward_", &topk_kl_backward_inplace);
    m.impl("full_kl", &full_kl);
    m.impl("full_kl_backward", &full_kl_backward);
    m.impl("token_logprobs", &token_logprobs);
    m.impl("token_logprobs_backward", &token_logprobs_backward);
    m.impl("topk_indices", &topk_indices);
    m.impl("sparse_reference", &sparse_reference);
    m.impl("topk_kl_sparse", &topk_kl_sparse);
  }
};

}  // namespace tike::glue
