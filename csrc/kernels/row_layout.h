// Torch-free description of where row n of an [N, V] view starts.
//
// The logits a GRPO loss hands over are often a slice such as logits[:, :-1, :]
// (strides T*V, V, 1) that cannot be flattened to [N, V] without a copy of N*V
// elements. Rather than copy, kernels address row n of a [B, T, V] view as
//   offset(n) = (n / T) * stride_b + (n % T) * stride_t      (64-bit).
// A plain contiguous [N, V] tensor is T = N, stride_t = V (stride_b unused).
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define TIKE_HD __host__ __device__ __forceinline__
#else
#define TIKE_HD inline
#endif

namespace tike {

struct RowLayout {
  int64_t T = 1;         // rows per outer block (the size of the inner leading dim)
  int64_t stride_b = 0;  // elements between outer blocks
  int64_t stride_t = 0;  // elements between consecutive rows of a block

  TIKE_HD int64_t offset(int64_t n) const {
    return (n / T) * stride_b + (n % T) * stride_t;
  }
  static RowLayout contiguous(int64_t N, int64_t V) {
    RowLayout l;
    l.T = N > 0 ? N : 1;
    l.stride_b = 0;
    l.stride_t = V;
    return l;
  }
};

// The three input dtypes, as the torch-free kernels see them (16-bit types are raw bits).
enum class DType : int { Float32 = 0, BFloat16 = 1, Float16 = 2 };

}  // namespace tike
