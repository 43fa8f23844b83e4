// CPU implementation of tike_cuda::topk_indices: the shared preparation, then the
// torch-free kernel of csrc/kernels/topk_indices_cpu.h spread over rows.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../kernels/topk_indices_cpu.h"
#include "../ops_prepare.h"
#include "grain.h"

namespace tike {
namespace {

at::Tensor topk_indices_cpu(const at::Tensor& logits, int64_t k,
                            const c10::optional<at::Tensor>& mask) {
  const auto c = prepare_topk_indices(logits, k, mask);
  at::parallel_for(0, c.args.N, cpu_grain_rows(c.args.V),
                   [&](int64_t b, int64_t e) { cpu::topk_indices_rows(c.args, b, e); });
  return c.idx;
}

}  // namespace

TORCH_LIBRARY_IMPL(tike_cuda, CPU, m) { m.impl("topk_indices", &topk_indices_cpu); }

}  // namespace tike
