// CUDA kernel and launcher of topk_indices (torch-free, header-only): topk_kl's warp-level
// selection (topk_select.cuh) without the tail sums — one streaming pass over each row,
// one CTA per row; the warps' lists are merged through shared memory and the best k
// written best first. k above kTopkSelectMaxK: the caller sorts instead (as topk_kl does).
#pragma once
#include <climits>

#include "sparse_args.h"
#include "topk_select.cuh"

namespace tike::cuda {
namespace topk_indices_detail {

struct Params {
  TopkIndicesArgs a;
  int kp, cap;  // next_pow2(k); entries of each warp's buffer
};

inline size_t smem_bytes(int cap) { return size_t(kWarps) * cap * 12; }

template <typename T>
__global__ void __launch_bounds__(kThreads) kernel(const Params P) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const TopkIndicesArgs& a = P.a;
  const int64_t n = blockIdx.x;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, tid = threadIdx.x, k = int(a.k);
  int32_t* out = a.idx + n * a.k;
  if (a.mask && !a.mask[n]) {  // masked rows are never read
    for (int s = tid; s < k; s += kThreads) out[s] = -1;
    return;
  }
  uint64_t* keys = reinterpret_cast<uint64_t*>(smem_raw);
  float* vals = reinterpret_cast<float*>(keys + kWarps * P.cap);
  TopkStreamT<false> st;
  st.c = 1.f;
  st.k = k;
  st.cap = P.cap;
  st.key = keys + warp * P.cap;
  st.val = vals + warp * P.cap;
  const T* zrow = row_base<T>(a.logits, a.logits_layout, n);
  stream_topk<T, false>(st, zrow, zrow, 0, int(a.V), lane, warp);
  st.finish(lane);
  __syncthreads();
  block_merge_groups(keys, vals, P.cap, kWarps, P.kp, [](uint64_t, float) {});
  for (int s = tid; s < k; s += kThreads) out[s] = key_index(keys[s]);
}

template <typename T>
inline cudaError_t launch(const Params& P, cudaStream_t stream) {
  const size_t smem = smem_bytes(P.cap);
  cudaError_t err = allow_smem(kernel<T>, smem);
  if (err != cudaSuccess) return err;
  TIKE_LAUNCH(kernel<T>, unsigned(P.a.N), kThreads, smem, stream, P);
  return cudaGetLastError();
}

}  // namespace topk_indices_detail

// topk_indices for 1 <= k <= kTopkSelectMaxK (larger k: sort, see ops_cuda.cu).
inline cudaError_t topk_indices(const TopkIndicesArgs& a, cudaStream_t stream) {
  if (a.N == 0) return cudaSuccess;
  if (a.k < 1 || a.k > a.V || a.k > kTopkSelectMaxK || a.V >= (int64_t(1) << 30) ||
      a.N >= int64_t(INT_MAX))
    return cudaErrorInvalidValue;
  topk_indices_detail::Params P;
  P.a = a;
  P.kp = next_pow2(a.k);
  P.cap = 2 * (P.kp > 32 ? P.kp : 32);
  switch (a.dtype) {
    case DType::Float32: return topk_indices_detail::launch<float>(P, stream);
    case DType::BFloat16: return topk_indices_detail::launch<__nv_bfloat16>(P, stream);
    case DType::Float16: return topk_indices_detail::launch<__half>(P, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace tike::cuda
