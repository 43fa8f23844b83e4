// What every device implementation of an op does before launching its kernels, written
// once for the CPU (csrc/cpu) and CUDA (csrc/cuda) glue: the checks, the row views of the
// inputs, the outputs (same shapes and dtypes on every device) and the torch-free
// argument struct pointing into them. A *Call keeps alive every tensor its args point to.
#pragma once
#include <ATen/ATen.h>

#include <tuple>

#include "kernels/full_kl_args.h"
#include "kernels/sparse_args.h"
#include "kernels/token_logprobs_args.h"
#include "kernels/topk_kl_args.h"
#include "ops_common.h"

namespace tike {

inline void check_temperature(double temperature) {
  TORCH_CHECK(temperature > 0, "tike_cuda: temperature must be > 0, got ", temperature);
}

// A float32 tensor saved by a forward op (or an upstream gradient), as `numel` contiguous
// floats on the logits' device.
inline at::Tensor saved_f32(const at::Tensor& t, int64_t numel, const at::Tensor& logits,
                            const char* name) {
  TORCH_CHECK(t.numel() == numel, "tike_cuda: ", name, " must have ", numel, " elements, got ",
              t.numel());
  TORCH_CHECK(t.device() == logits.device(), "tike_cuda: ", name,
              " must be on the logits' device");
  return t.to(at::kFloat).contiguous();
}

// ---------------------------------------------------------------------------- topk_kl

struct TopkKlForwardCall {
  at::Tensor logits, ref;
  c10::optional<at::Tensor> tokens, old, mask;
  at::Tensor out, lse, idx, coef, shift, stats;
  TopkKlForwardArgs args;
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> outputs()
      const {
    return {out, lse, idx, coef, shift, stats};
  }
};

inline TopkKlForwardCall prepare_topk_kl_forward(
    const at::Tensor& logits_in, const at::Tensor& ref_in, int64_t k,
    const c10::optional<at::Tensor>& sampled, const c10::optional<at::Tensor>& old_lp,
    const c10::optional<at::Tensor>& mask, double temperature, bool union_sampled,
    bool tail_bucket) {
  check_logits(logits_in, "logits");
  check_same(logits_in, ref_in, "ref_logits");
  const int64_t V = logits_in.size(-1);
  TORCH_CHECK(k >= 1 && k <= V, "tike_cuda: k must be in [1, V=", V, "], got ", k);
  check_temperature(temperature);
  TORCH_CHECK(!old_lp.has_value() || sampled.has_value(),
              "tike_cuda: old_logprobs needs sampled_tokens");
  TopkKlForwardCall c;
  c.logits = rows_view(logits_in);
  c.ref = rows_view(ref_in);
  const int64_t N = num_rows(c.logits);
  c.tokens = per_row(sampled, N, c.logits, at::kLong, "sampled_tokens");
  c.old = per_row(old_lp, N, c.logits, at::kFloat, "old_logprobs");
  c.mask = per_row(mask, N, c.logits, at::kBool, "mask");
  const int64_t K1 = k + ((c.tokens.has_value() && union_sampled) ? 1 : 0);
  const auto f32 = f32_like(c.logits);
  c.out = at::empty({N}, f32);
  c.lse = at::empty({N, 2}, f32);  // per row (max z, log Σ exp((z − max)/τ)): kernels.md
  c.shift = at::empty({N}, f32);
  c.idx = at::empty({N, K1}, c.logits.options().dtype(at::kInt));
  c.coef = at::empty({N, K1}, f32);
  c.stats = at::empty({N, 3}, f32);

  TopkKlForwardArgs& a = c.args;
  a.logits = c.logits.data_ptr();
  a.logits_layout = row_layout_of(c.logits);
  a.ref_logits = c.ref.data_ptr();
  a.ref_layout = row_layout_of(c.ref);
  a.dtype = dtype_of(c.logits);
  a.N = N;
  a.V = V;
  a.k = k;
  a.K1 = K1;
  a.sampled_tokens = ptr_or_null<int64_t>(c.tokens);
  a.old_logprobs = ptr_or_null<float>(c.old);
  a.mask = ptr_or_null<bool>(c.mask);
  a.temperature = float(temperature);
  a.tail_bucket = tail_bucket;
  a.out = c.out.data_ptr<float>();
  a.lse = c.lse.data_ptr<float>();
  a.idx = c.idx.data_ptr<int32_t>();
  a.coef = c.coef.data_ptr<float>();
  a.shift = c.shift.data_ptr<float>();
  a.stats = c.stats.data_ptr<float>();
  return c;
}

// topk_kl_shard: topk_kl's preparation (the sampled token united, no old_logprobs) and
// the local pass's own outputs (docs/kernels.md).
struct TopkKlShardCall {
  TopkKlForwardCall fwd;
  at::Tensor values, lse_q, tails;
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> outputs() const {
    return {fwd.idx, values, fwd.lse, lse_q, tails};
  }
};

inline TopkKlShardCall prepare_topk_kl_shard(const at::Tensor& logits, const at::Tensor& ref,
                                             int64_t k, const c10::optional<at::Tensor>& sampled,
                                             const c10::optional<at::Tensor>& mask,
                                             double temperature, bool tail_bucket) {
  TopkKlShardCall c;
  c.fwd = prepare_topk_kl_forward(logits, ref, k, sampled, c10::nullopt, mask, temperature,
                                  /*union_sampled=*/true, tail_bucket);
  const auto f32 = f32_like(c.fwd.logits);
  c.values = at::empty({c.fwd.args.N, c.fwd.args.K1, 2}, f32);
  c.lse_q = at::empty({c.fwd.args.N, 2}, f32);
  c.tails = at::empty({c.fwd.args.N, 2}, f32);
  TopkKlForwardArgs& a = c.fwd.args;
  a.shard_values = c.values.data_ptr<float>();
  a.shard_lse_q = c.lse_q.data_ptr<float>();
  a.shard_tails = c.tails.data_ptr<float>();
  return c;
}

struct TopkKlBackwardCall {
  at::Tensor logits, g, lse, idx, coef, shift, grad;
  c10::optional<at::Tensor> mask;
  TopkKlBackwardArgs args;
};

// `grad` receives the gradient: a fresh empty_grad_like(logits), or logits itself for the
// in-place variant (which must then be addressable without a copy).
inline TopkKlBackwardCall prepare_topk_kl_backward(
    const at::Tensor& grad_out, const at::Tensor& logits_in, const at::Tensor& lse,
    const at::Tensor& idx, const at::Tensor& coef, const at::Tensor& shift,
    const c10::optional<at::Tensor>& mask, double temperature, const at::Tensor& grad) {
  check_logits(logits_in, "logits");
  check_temperature(temperature);
  TopkKlBackwardCall c;
  c.logits = rows_view(logits_in);
  const int64_t N = num_rows(c.logits), V = c.logits.size(-1);
  TORCH_CHECK(idx.dim() == 2 && idx.size(0) == N && coef.sizes() == idx.sizes() &&
                  idx.scalar_type() == at::kInt && idx.device() == c.logits.device(),
              "tike_cuda: topk_kl_backward: saved tensors do not match the logits");
  c.g = saved_f32(grad_out, N, c.logits, "grad_out");
  c.lse = saved_f32(lse, 2 * N, c.logits, "lse");
  c.shift = saved_f32(shift, N, c.logits, "shift");
  c.coef = saved_f32(coef, coef.numel(), c.logits, "coef");
  c.idx = idx.contiguous();
  c.mask = per_row(mask, N, c.logits, at::kBool, "mask");
  c.grad = grad;
  TopkKlBackwardArgs& a = c.args;
  a.grad_out = c.g.data_ptr<float>();
  a.logits = c.logits.data_ptr();
  a.logits_layout = row_layout_of(c.logits);
  a.dtype = dtype_of(c.logits);
  a.N = N;
  a.V = V;
  a.K1 = idx.size(1);
  a.lse = c.lse.data_ptr<float>();
  a.idx = c.idx.data_ptr<int32_t>();
  a.coef = c.coef.data_ptr<float>();
  a.shift = c.shift.data_ptr<float>();
  a.mask = ptr_or_null<bool>(c.mask);
  a.temperature = float(temperature);
  a.grad = grad.data_ptr();
  a.grad_layout = row_layout_of(grad);
  return c;
}

inline void check_inplace_target(const at::Tensor& logits) {
  TORCH_CHECK(rows_view(logits).is_same(logits),
              "tike_cuda: in-place backward needs logits with a unit last stride and at most "
              "two non-mergeable leading dims");
}

// ---------------------------------------------------------------------------- full_kl

struct FullKlForwardCall {
  at::Tensor logits, ref, out, lse_p, lse_q;
  c10::optional<at::Tensor> mask;
  FullKlForwardArgs args;
  std::tuple<at::Tensor, at::Tensor, at::Tensor> outputs() const { return {out, lse_p, lse_q}; }
};

inline FullKlForwardCall prepare_full_kl_forward(const at::Tensor& logits_in,
                                                 const at::Tensor& ref_in,
                                                 const c10::optional<at::Tensor>& mask,
                                                 double temperature) {
  check_logits(logits_in, "logits");
  check_same(logits_in, ref_in, "ref_logits");
  check_temperature(temperature);
  FullKlForwardCall c;
  c.logits = rows_view(logits_in);
  c.ref = rows_view(ref_in);
  const int64_t N = num_rows(c.logits);
  c.mask = per_row(mask, N, c.logits, at::kBool, "mask");
  const auto f32 = f32_like(c.logits);
  c.out = at::empty({N}, f32);
  c.lse_p = at::empty({N, 2}, f32);  // (max, log Σ exp((x − max)/τ)) per row: kernels.md
  c.lse_q = at::empty({N, 2}, f32);
  FullKlForwardArgs& a = c.args;
  a.logits = c.logits.data_ptr();
  a.logits_layout = row_layout_of(c.logits);
  a.ref_logits = c.ref.data_ptr();
  a.ref_layout = row_layout_of(c.ref);
  a.dtype = dtype_of(c.logits);
  a.N = N;
  a.V = c.logits.size(-1);
  a.mask = ptr_or_null<bool>(c.mask);
  a.temperature = float(temperature);
  a.out = c.out.data_ptr<float>();
  a.lse_p = c.lse_p.data_ptr<float>();
  a.lse_q = c.lse_q.data_ptr<float>();
  return c;
}

struct FullKlBackwardCall {
  at::Tensor logits, ref, g, out, lse_p, lse_q, grad;
  c10::optional<at::Tensor> mask;
  FullKlBackwardArgs args;
};

inline FullKlBackwardCall prepare_full_kl_backward(
    const at::Tensor& grad_out, const at::Tensor& logits_in, const at::Tensor& ref_in,
    const at::Tensor& out, const at::Tensor& lse_p, const at::Tensor& lse_q,
    const c10::optional<at::Tensor>& mask, double temperature) {
  check_logits(logits_in, "logits");
  check_same(logits_in, ref_in, "ref_logits");
  check_temperature(temperature);
  FullKlBackwardCall c;
  c.logits = rows_view(logits_in);
  c.ref = rows_view(ref_in);
  const int64_t N = num_rows(c.logits);
  c.g = saved_f32(grad_out, N, c.logits, "grad_out");
  c.out = saved_f32(out, N, c.logits, "out");
  c.lse_p = saved_f32(lse_p, 2 * N, c.logits, "lse_p");
  c.lse_q = saved_f32(lse_q, 2 * N, c.logits, "lse_q");
  c.mask = per_row(mask, N, c.logits, at::kBool, "mask");
  c.grad = empty_grad_like(logits_in);
  FullKlBackwardArgs& a = c.args;
  a.grad_out = c.g.data_ptr<float>();
  a.logits = c.logits.data_ptr();
  a.logits_layout = row_layout_of(c.logits);
  a.ref_logits = c.ref.data_ptr();
  a.ref_layout = row_layout_of(c.ref);
  a.dtype = dtype_of(c.logits);
  a.N = N;
  a.V = c.logits.size(-1);
  a.out = c.out.data_ptr<float>();
  a.lse_p = c.lse_p.data_ptr<float>();
  a.lse_q = c.lse_q.data_ptr<float>();
  a.mask = ptr_or_null<bool>(c.mask);
  a.temperature = float(temperature);
  a.grad = c.grad.data_ptr();
  return c;
}

// ---------------------------------------------------------------------- token_logprobs

struct TokenLogprobsForwardCall {
  at::Tensor logits, tokens, logp, entropy, lse;
  TokenLogprobsForwardArgs args;
  std::tuple<at::Tensor, at::Tensor, at::Tensor> outputs() const { return {logp, entropy, lse}; }
};

inline TokenLogprobsForwardCall prepare_token_logprobs_forward(const at::Tensor& logits_in,
                                                               const at::Tensor& tokens,
                                                               double temperature,
                                                               bool with_entropy) {
  check_logits(logits_in, "logits");
  check_temperature(temperature);
  TokenLogprobsForwardCall c;
  c.logits = rows_view(logits_in);
  const int64_t N = num_rows(c.logits);
  c.tokens = *per_row(tokens, N, c.logits, at::kLong, "tokens");
  const auto f32 = f32_like(c.logits);
  c.logp = at::empty({N}, f32);
  c.lse = at::empty({N, 2}, f32);  // (max z, log Σ exp((z − max)/τ)) per row: kernels.md
  c.entropy = at::empty({with_entropy ? N : 0}, f32);
  TokenLogprobsForwardArgs& a = c.args;
  a.logits = c.logits.data_ptr();
  a.logits_layout = row_layout_of(c.logits);
  a.dtype = dtype_of(c.logits);
  a.N = N;
  a.V = c.logits.size(-1);
  a.tokens = c.tokens.data_ptr<int64_t>();
  a.temperature = float(temperature);
  a.logp = c.logp.data_ptr<float>();
  a.entropy = with_entropy ? c.entropy.data_ptr<float>() : nullptr;
  a.lse = c.lse.data_ptr<float>();
  return c;
}

struct TokenLogprobsBackwardCall {
  at::Tensor logits, tokens, g, lse, grad;
  c10::optional<at::Tensor> g_entropy, entropy;
  TokenLogprobsBackwardArgs args;
};

inline TokenLogprobsBackwardCall prepare_token_logprobs_backward(
    const at::Tensor& grad_logp, const c10::optional<at::Tensor>& grad_entropy,
    const at::Tensor& logits_in, const at::Tensor& tokens, const at::Tensor& lse,
    const at::Tensor& entropy, double temperature) {
  check_logits(logits_in, "logits");
  check_temperature(temperature);
  TokenLogprobsBackwardCall c;
  c.logits = rows_view(logits_in);
  const int64_t N = num_rows(c.logits);
  c.tokens = *per_row(tokens, N, c.logits, at::kLong, "tokens");
  c.g = saved_f32(grad_logp, N, c.logits, "grad_logp");
  c.lse = saved_f32(lse, 2 * N, c.logits, "lse");
  if (grad_entropy.has_value()) {
    TORCH_CHECK(entropy.numel() == N, "tike_cuda: grad_entropy given but no entropy saved");
    c.g_entropy = saved_f32(*grad_entropy, N, c.logits, "grad_entropy");
    c.entropy = saved_f32(entropy, N, c.logits, "entropy");
  }
  c.grad = empty_grad_like(logits_in);
  TokenLogprobsBackwardArgs& a = c.args;
  a.grad_logp = c.g.data_ptr<float>();
  a.grad_entropy = ptr_or_null<float>(c.g_entropy);
  a.logits = c.logits.data_ptr();
  a.logits_layout = row_layout_of(c.logits);
  a.dtype = dtype_of(c.logits);
  a.N = N;
  a.V = c.logits.size(-1);
  a.tokens = c.tokens.data_ptr<int64_t>();
  a.lse = c.lse.data_ptr<float>();
  a.entropy = ptr_or_null<float>(c.entropy);
  a.temperature = float(temperature);
  a.grad = c.grad.data_ptr();
  return c;
}

// ----------------------------------------------------------- topk_indices (fixed support)

struct TopkIndicesCall {
  at::Tensor logits, idx;
  c10::optional<at::Tensor> mask;
  TopkIndicesArgs args;
};

inline TopkIndicesCall prepare_topk_indices(const at::Tensor& logits_in, int64_t k,
                                            const c10::optional<at::Tensor>& mask) {
  check_logits(logits_in, "logits");
  const int64_t V = logits_in.size(-1);
  TORCH_CHECK(k >= 1 && k <= V, "tike_cuda: k must be in [1, V=", V, "], got ", k);
  TopkIndicesCall c;
  c.logits = rows_view(logits_in);
  const int64_t N = num_rows(c.logits);
  c.mask = per_row(mask, N, c.logits, at::kBool, "mask");
  c.idx = at::empty({N, k}, c.logits.options().dtype(at::kInt));
  TopkIndicesArgs& a = c.args;
  a.logits = c.logits.data_ptr();
  a.logits_layout = row_layout_of(c.logits);
  a.dtype = dtype_of(c.logits);
  a.N = N;
  a.V = V;
  a.k = k;
  a.mask = ptr_or_null<bool>(c.mask);
  a.idx = c.idx.data_ptr<int32_t>();
  return c;
}

// Rows of S~ indices [N, K] as int32, and the same rows sorted ascending (the kernels walk
// S~ in column order and check it: an index outside [0, V) or given twice makes the row
// invalid). Values outside the int32 range are clamped to −1 / V first, which keeps them
// invalid, so no conversion can turn a bad index into a valid one. No host sync.
inline std::pair<at::Tensor, at::Tensor> support_rows(const at::Tensor& s, int64_t N,
                                                      int64_t V) {
  at::Tensor rows = s.reshape({N, s.size(-1)});
  if (rows.scalar_type() != at::kInt) rows = rows.clamp(-1, V).to(at::kInt);
  rows = rows.contiguous();
  return {rows, std::get<0>(at::sort(rows, /*dim=*/1))};
}

// ------------------------------------------------------------------------ sparse_reference

struct SparseReferenceCall {
  at::Tensor ref, support, sorted, idx, logprobs, tail;
  c10::optional<at::Tensor> tokens, mask;
  SparseReferenceArgs args;
  std::tuple<at::Tensor, at::Tensor, at::Tensor> outputs() const { return {idx, logprobs, tail}; }
};

inline SparseReferenceCall prepare_sparse_reference(const at::Tensor& ref_in,
                                                    const at::Tensor& support,
                                                    const c10::optional<at::Tensor>& sampled,
                                                    const c10::optional<at::Tensor>& mask,
                                                    double temperature) {
  check_logits(ref_in, "ref_logits");
  check_temperature(temperature);
  const int64_t V = ref_in.size(-1);
  SparseReferenceCall c;
  c.ref = rows_view(ref_in);
  const int64_t N = num_rows(c.ref);
  TORCH_CHECK(support.dim() >= 1 && !at::isFloatingType(support.scalar_type()) &&
                  support.scalar_type() != at::kBool,
              "tike_cuda: support must be an integer tensor [..., k]");
  const int64_t k = support.size(-1);
  TORCH_CHECK(k >= 1 && k <= V, "tike_cuda: support must have k in [1, V=", V, "] columns, got ", k);
  TORCH_CHECK(support.numel() == N * k, "tike_cuda: support must have one row of k per "
              "ref_logits row (", N, " x ", k, "), got ", support.sizes());
  TORCH_CHECK(support.device() == c.ref.device(), "tike_cuda: support must be on the ref_logits' device");
  std::tie(c.support, c.sorted) = support_rows(support, N, V);
  c.tokens = per_row(sampled, N, c.ref, at::kLong, "sampled_tokens");
  c.mask = per_row(mask, N, c.ref, at::kBool, "mask");
  const int64_t K1 = k + (c.tokens.has_value() ? 1 : 0);
  c.idx = at::empty({N, K1}, c.ref.options().dtype(at::kInt));
  c.logprobs = at::empty({N, K1}, f32_like(c.ref));
  c.tail = at::empty({N}, f32_like(c.ref));
  SparseReferenceArgs& a = c.args;
  a.ref_logits = c.ref.data_ptr();
  a.ref_layout = row_layout_of(c.ref);
  a.dtype = dtype_of(c.ref);
  a.N = N;
  a.V = V;
  a.k = k;
  a.K1 = K1;
  a.support = c.support.data_ptr<int32_t>();
  a.sorted = c.sorted.data_ptr<int32_t>();
  a.sampled_tokens = ptr_or_null<int64_t>(c.tokens);
  a.mask = ptr_or_null<bool>(c.mask);
  a.temperature = float(temperature);
  a.idx = c.idx.data_ptr<int32_t>();
  a.logprobs = c.logprobs.data_ptr<float>();
  a.tail_logmass = c.tail.data_ptr<float>();
  return c;
}

// -------------------------------------------------------------------------- topk_kl_sparse

struct TopkKlSparseForwardCall {
  at::Tensor logits, idx, sorted, ref_lp, ref_tail;
  c10::optional<at::Tensor> tokens, old, mask;
  at::Tensor out, lse, coef, shift, stats;
  TopkKlSparseArgs args;
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> outputs() const {
    return {out, lse, coef, shift, stats};
  }
};

inline TopkKlSparseForwardCall prepare_topk_kl_sparse_forward(
    const at::Tensor& logits_in, const at::Tensor& idx, const at::Tensor& ref_logprobs,
    const at::Tensor& ref_tail_logmass, const c10::optional<at::Tensor>& sampled,
    const c10::optional<at::Tensor>& old_lp, const c10::optional<at::Tensor>& mask,
    double temperature, bool tail_bucket) {
  check_logits(logits_in, "logits");
  check_temperature(temperature);
  TORCH_CHECK(!old_lp.has_value() || sampled.has_value(),
              "tike_cuda: old_logprobs needs sampled_tokens");
  TopkKlSparseForwardCall c;
  c.logits = rows_view(logits_in);
  const int64_t N = num_rows(c.logits), V = c.logits.size(-1);
  TORCH_CHECK(idx.dim() == 2 && idx.size(0) == N && idx.size(1) >= 1 &&
                  idx.scalar_type() == at::kInt && idx.device() == c.logits.device(),
              "tike_cuda: idx must be int32 [N=", N, ", K1 >= 1] on the logits' device");
  TORCH_CHECK(ref_logprobs.sizes() == idx.sizes() && ref_logprobs.scalar_type() == at::kFloat &&
                  ref_logprobs.device() == c.logits.device(),
              "tike_cuda: ref_logprobs must be float32 of idx's shape on the logits' device");
  const int64_t K1 = idx.size(1);
  std::tie(c.idx, c.sorted) = support_rows(idx, N, V);
  c.ref_lp = ref_logprobs.contiguous();
  c.ref_tail = *per_row(ref_tail_logmass, N, c.logits, at::kFloat, "ref_tail_logmass");
  c.tokens = per_row(sampled, N, c.logits, at::kLong, "sampled_tokens");
  c.old = per_row(old_lp, N, c.logits, at::kFloat, "old_logprobs");
  c.mask = per_row(mask, N, c.logits, at::kBool, "mask");
  const auto f32 = f32_like(c.logits);
  c.out = at::empty({N}, f32);
  c.lse = at::empty({N, 2}, f32);  // (M, ℓ) per row, as topk_kl's: kernels.md
  c.shift = at::empty({N}, f32);
  c.coef = at::empty({N, K1}, f32);
  c.stats = at::empty({N, 3}, f32);
  TopkKlSparseArgs& a = c.args;
  a.logits = c.logits.data_ptr();
  a.logits_layout = row_layout_of(c.logits);
  a.dtype = dtype_of(c.logits);
  a.N = N;
  a.V = V;
  a.K1 = K1;
  a.idx = c.idx.data_ptr<int32_t>();
  a.sorted = c.sorted.data_ptr<int32_t>();
  a.ref_logprobs = c.ref_lp.data_ptr<float>();
  a.ref_tail_logmass = c.ref_tail.data_ptr<float>();
  a.sampled_tokens = ptr_or_null<int64_t>(c.tokens);
  a.old_logprobs = ptr_or_null<float>(c.old);
  a.mask = ptr_or_null<bool>(c.mask);
  a.temperature = float(temperature);
  a.tail_bucket = tail_bucket;
  a.out = c.out.data_ptr<float>();
  a.lse = c.lse.data_ptr<float>();
  a.coef = c.coef.data_ptr<float>();
  a.shift = c.shift.data_ptr<float>();
  a.stats = c.stats.data_ptr<float>();
  return c;
}

}  // namespace tike
