// Small kernels that exercise the emulation itself (tests/test_emulation.py): every warp
// operation with known results, and kernels that break the CUDA rules on purpose (a
// deadlock, divergent warp operations, a barrier some threads skip, a write past the
// dynamic shared memory, > 48 KB without opting in, a missing barrier).
#include <ATen/ATen.h>

#include <cstdio>
#include <string>
#include <vector>

#include "cuda_emu.h"  // before any CUDA header

#include "../kernels/common.cuh"
#include "runtime.h"

namespace tike::selftest_kernels {

constexpr unsigned kFull = 0xffffffffu;

// Per thread: xor/idx/up/down shuffles, ballot, any, all, and a block sum through
// __shared__ memory (8 values).
__global__ void warp_ops_kernel(int64_t* out) {
  __shared__ int part[32];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int v = 1000 * int(blockIdx.x) + tid;
  int64_t* o = out + (int64_t(blockIdx.x) * blockDim.x + tid) * 8;
  o[0] = __shfl_xor_sync(kFull, v, 5);
  o[1] = __shfl_sync(kFull, v, 3);
  o[2] = __shfl_up_sync(kFull, v, 2);
  o[3] = __shfl_down_sync(kFull, double(v) + 0.5, 4) * 2;  // 8-byte payload
  o[4] = __ballot_sync(kFull, lane % 3 == 0);
  o[5] = __any_sync(kFull, lane == 7 && warp == 1);
  o[6] = __all_sync(kFull, lane < 32);
  // Half-warp operations with their own masks, side by side.
  const unsigned half = lane < 16 ? 0x0000ffffu : 0xffff0000u;
  const int h = __shfl_xor_sync(half, v, 8);
  int s = v + h;
  for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(kFull, s, off);
  if (lane == 0) part[warp] = s;
  __syncthreads();
  int total = 0;
  for (int w = 0; w < int(blockDim.x) / 32; ++w) total += part[w];
  o[7] = total;
  __syncthreads();
}

__global__ void deadlock_kernel(int64_t* out) {
  int v = threadIdx.x;
  if (threadIdx.x == 0) {
    __syncthreads();
  } else if (threadIdx.x < 32) {
    v = __shfl_xor_sync(kFull, v, 1);  // waits for lane 0, which waits at the barrier
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = v;
}

__global__ void partial_barrier_kernel(int64_t* out) {
  if (threadIdx.x >= 128) return;
  __syncthreads();
  out[threadIdx.x] = 1;
}

__global__ void different_barriers_kernel(int64_t* out) {
  if (threadIdx.x < 128) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1;
}

__global__ void divergent_warp_kernel(int64_t* out) {
  const int lane = threadIdx.x & 31;
  int v = threadIdx.x;
  if (lane < 16) {
    v = __shfl_xor_sync(kFull, v, 1);
  } else {
    v = __shfl_xor_sync(kFull, v, 2);
  }
  out[threadIdx.x] = v;
}

__global__ void mismatched_mask_kernel(int64_t* out) {
  const int lane = threadIdx.x & 31;
  out[threadIdx.x] = __ballot_sync(lane == 5 ? 0x0000ffffu : kFull, 1);
}

__global__ void partial_warp_kernel(int64_t* out) {
  const int lane = threadIdx.x & 31;
  if (lane >= 16) return;
  out[threadIdx.x] = __shfl_xor_sync(kFull, int(threadIdx.x), 1);
}

__global__ void dyn_smem_kernel(int64_t* out, int bytes, int write_at) {
  extern __shared__ __align__(16) unsigned char dyn[];
  if (threadIdx.x == 0) {
    out[0] = dyn[0];  // poisoned: never written before
    for (int i = 0; i < bytes; ++i) dyn[i] = 1;
    if (write_at >= 0) dyn[write_at] = 2;
  }
  __syncthreads();
  int64_t s = 0;
  if (threadIdx.x == 0)
    for (int i = 0; i < bytes; ++i) s += dyn[i];
  if (threadIdx.x == 0) out[1] = s;
}

// A block sum whose barrier is optional: without it, thread 0 reads what the other threads
// have written so far (this launch's values times `salt`, or an earlier launch's), which
// depends on the order they were scheduled in.
__global__ void block_sum_kernel(int64_t* out, bool with_barrier, int salt) {
  __shared__ int vals[256];
  vals[threadIdx.x] = (int(threadIdx.x) + 1) * salt;
  if (with_barrier) __syncthreads();
  if (threadIdx.x == 0) {
    int64_t s = 0;
    for (int i = 0; i < 256; ++i) s += vals[i];
    out[0] = s;
  }
}

}  // namespace tike::selftest_kernels

namespace tike::selftest_kernels {
TIKE_EMU_DYNAMIC_SMEM(unsigned char, dyn)
}

namespace tike {

namespace {

void check(cudaError_t err) {
  if (err == cudaSuccess) return;
  (void)cudaGetLastError();
  TORCH_CHECK(false, ::tike_emu::error_name(err), ": ", ::tike_emu::last_error_message());
}

at::Tensor launch_simple(void (*k)(int64_t*), int64_t blocks, int64_t threads, int64_t per) {
  at::Tensor out = at::full({blocks * threads * per}, -1, at::kLong);
  TIKE_LAUNCH(k, unsigned(blocks), unsigned(threads), 0, nullptr, out.data_ptr<int64_t>());
  check(cudaGetLastError());
  return out;
}

}  // namespace

at::Tensor emu_selftest(c10::string_view name_view) {
  using namespace selftest_kernels;
  const std::string name(name_view);
  if (name == "warp_ops") return launch_simple(&warp_ops_kernel, 2, 64, 8).view({2 * 64, 8});
  if (name == "deadlock") return launch_simple(&deadlock_kernel, 2, 256, 1);
  if (name == "partial_barrier") return launch_simple(&partial_barrier_kernel, 1, 256, 1);
  if (name == "different_barriers") return launch_simple(&different_barriers_kernel, 1, 256, 1);
  if (name == "divergent_warp") return launch_simple(&divergent_warp_kernel, 1, 64, 1);
  if (name == "mismatched_mask") return launch_simple(&mismatched_mask_kernel, 1, 32, 1);
  if (name == "partial_warp") return launch_simple(&partial_warp_kernel, 1, 32, 1);
  // block_sum:<salt> (with its barrier) or block_sum_racy:<salt> (without)
  if (name.rfind("block_sum", 0) == 0) {
    int salt = 1;
    const bool racy = name.rfind("block_sum_racy:", 0) == 0;
    TORCH_CHECK_VALUE(std::sscanf(name.c_str() + (racy ? 15 : 10), "%d", &salt) == 1,
                      "tike_emu: selftest block_sum[_racy]:<salt>");
    at::Tensor out = at::zeros({1}, at::kLong);
    TIKE_LAUNCH(block_sum_kernel, 1u, 256u, 0, nullptr, out.data_ptr<int64_t>(), !racy, salt);
    check(cudaGetLastError());
    return out;
  }
  // dyn_smem:<bytes>:<write_at>[:optin=<bytes>]
  if (name.rfind("dyn_smem:", 0) == 0) {
    int bytes = 0, write_at = -1, optin = -1;
    const int got = std::sscanf(name.c_str(), "dyn_smem:%d:%d:optin=%d", &bytes, &write_at, &optin);
    TORCH_CHECK_VALUE(got >= 2, "tike_emu: selftest dyn_smem:<bytes>:<write_at>[:optin=<bytes>]");
    if (got == 3) check(cudaFuncSetAttribute(&dyn_smem_kernel,
                                             cudaFuncAttributeMaxDynamicSharedMemorySize, optin));
    at::Tensor out = at::full({2}, -1, at::kLong);
    TIKE_LAUNCH(dyn_smem_kernel, 1u, 32u, size_t(bytes), nullptr, out.data_ptr<int64_t>(), bytes,
                write_at);
    check(cudaGetLastError());
    return out;
  }
  if (name == "attributes") {
    int dev = -1, sms = 0, optin = 0;
    check(cudaGetDevice(&dev));
    check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
    check(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    return at::tensor(std::vector<int64_t>{dev, sms, optin, cuda::device_sm_count()}, at::kLong);
  }
  TORCH_CHECK_VALUE(false, "tike_emu: no selftest named '", name, "'");
}

}  // namespace tike
