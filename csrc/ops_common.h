// Torch-side helpers shared by the CPU (csrc/cpu) and CUDA (csrc/cuda) glue: the one copy
// of the input checks, the row layout of a [..., V] tensor and the dtype tag the
// torch-free kernels take. The Python layer validates user input with clear messages;
// these checks are the backstop for direct calls of torch.ops.tike_cuda.*.
#pragma once
#include <ATen/ATen.h>

#include <vector>

#include "cpu/grad_cache.h"
#include "kernels/row_layout.h"

namespace tike {

inline DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::Float32;
    case at::kBFloat16: return DType::BFloat16;
    case at::kHalf: return DType::Float16;
    default:
      TORCH_CHECK_TYPE(false, "tike_cuda: logits must be float32, bfloat16 or float16, got ",
                       t.scalar_type());
  }
}

// The leading dims of t (all but the last) after dropping size-1 dims and merging
// dims that are contiguous with each other: (size, stride) pairs, outermost first.
inline std::vector<std::pair<int64_t, int64_t>> collapsed_leading_dims(const at::Tensor& t) {
  std::vector<std::pair<int64_t, int64_t>> dims;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) {
    if (t.size(d) == 1) continue;
    if (!dims.empty() && dims.back().second == t.stride(d) * t.size(d)) {
      dims.back() = {dims.back().first * t.size(d), t.stride(d)};
    } else {
      dims.emplace_back(t.size(d), t.stride(d));
    }
  }
  return dims;
}

// t itself when the kernels can address its rows through a RowLayout (unit stride on
// the last dim, at most two leading dims after collapsing), else a contiguous copy.
inline at::Tensor rows_view(const at::Tensor& t) {
  const bool unit_last = t.dim() == 0 || t.size(-1) <= 1 || t.stride(-1) == 1;
  if (unit_last && collapsed_leading_dims(t).size() <= 2) return t;
  return t.contiguous();
}

// Row addressing of a tensor already passed through rows_view().
inline RowLayout row_layout_of(const at::Tensor& t) {
  const auto dims = collapsed_leading_dims(t);
  RowLayout l;
  if (dims.empty()) {  // zero or one row
    l.T = 1;
  } else if (dims.size() == 1) {
    l.T = dims[0].first;
    l.stride_t = dims[0].second;
  } else {
    TORCH_CHECK(dims.size() == 2, "tike_cuda: internal error, call rows_view() first");
    l.T = dims[1].first;
    l.stride_b = dims[0].second;
    l.stride_t = dims[1].second;
  }
  if (l.T <= 0) l.T = 1;
  return l;
}

inline int64_t num_rows(const at::Tensor& logits) {
  return logits.size(-1) == 0 ? 0 : logits.numel() / logits.size(-1);
}

// Shape, dtype and device agreement of the per-row inputs.
inline void check_logits(const at::Tensor& logits, const char* name) {
  TORCH_CHECK(logits.dim() >= 1, "tike_cuda: ", name, " must have at least one dim [..., V]");
  TORCH_CHECK(logits.size(-1) >= 1, "tike_cuda: ", name, " must have V >= 1");
  (void)dtype_of(logits);
}

inline void check_same(const at::Tensor& a, const at::Tensor& b, const char* name) {
  TORCH_CHECK(a.sizes() == b.sizes(), "tike_cuda: ", name, " must have the logits' shape");
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "tike_cuda: ", name,
              " must have the logits' dtype");
  TORCH_CHECK(a.device() == b.device(), "tike_cuda: ", name, " must be on the logits' device");
}

// An optional per-row tensor: N elements of `type` on the logits' device, made contiguous.
inline c10::optional<at::Tensor> per_row(const c10::optional<at::Tensor>& t, int64_t N,
                                         const at::Tensor& logits, at::ScalarType type,
                                         const char* name) {
  if (!t.has_value()) return c10::nullopt;
  TORCH_CHECK(t->numel() == N, "tike_cuda: ", name, " must have one entry per row (", N,
              "), got ", t->numel());
  TORCH_CHECK(t->device() == logits.device(), "tike_cuda: ", name,
              " must be on the logits' device");
  TORCH_CHECK(t->scalar_type() == type, "tike_cuda: ", name, " must be ", type, ", got ",
              t->scalar_type());
  return t->contiguous().reshape({N});
}

template <class T>
inline const T* ptr_or_null(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}

// The N x V gradient: a contiguous tensor of the logits' shape and dtype, uninitialized
// (the backwards write every element). On the CPU it comes from the gradient cache
// (csrc/cpu/grad_cache.h): faulting in fresh memory costs more than computing it.
inline at::Tensor empty_grad_like(const at::Tensor& logits) {
  if (logits.device().is_cpu()) return cpu_cached_empty(logits.sizes(), logits.scalar_type());
  return at::empty(logits.sizes(), logits.options());
}

inline at::TensorOptions f32_like(const at::Tensor& t) {
  return t.options().dtype(at::kFloat);
}

}  // namespace tike
