// CUDA implementation of every tike_cuda operator: the shared glue (ops_glue.h) over what
// only a real device has: the is_cuda check, a device guard, the current stream and
// C10_CUDA_CHECK. The CPU emulation of the same glue is csrc/emu/ops_emu.cpp.
//
// One translation unit on purpose: each .cu that includes torch headers costs about a
// minute of compile time.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "ops_glue.h"

namespace tike {
namespace {

struct CudaDevice {
  static void check_logits(const at::Tensor& logits) {
    TORCH_CHECK(logits.is_cuda(), "tike_cuda: logits must be a CUDA tensor");
  }
  using Guard = c10::cuda::CUDAGuard;
  static cudaStream_t stream() { return at::cuda::getCurrentCUDAStream().stream(); }
  static void check(cudaError_t err) { C10_CUDA_CHECK(err); }
};

}  // namespace

TORCH_LIBRARY_IMPL(tike_cuda, CUDA, m) { glue::Ops<CudaDevice>::register_all(m); }

}  // namespace tike
