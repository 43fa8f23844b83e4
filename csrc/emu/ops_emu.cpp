// The tike_cuda operators with their CUDA kernels run by the CPU emulation, registered as
// torch.ops.tike_cuda_emu.* (same schemas as torch.ops.tike_cuda.*, CPU tensors in), and
// the emulation's own controls as torch.ops.tike_emu.*. Built on first use by
// tike_cuda.testing.load_emulated() (see docs/emulation.md).
//
// The glue is the CUDA build's own (csrc/cuda/ops_glue.h): the same checks, row layouts,
// workspaces, k > 256 preselection and in-place backward; only the device policy differs.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <sstream>
#include <string>

#include "cuda_emu.h"  // before any CUDA header
#include "runtime.h"

#include "../cuda/ops_glue.h"

// Storage of the kernels' `extern __shared__` arrays (see cuda_emu.h).
namespace tike::cuda::topk_detail {
TIKE_EMU_DYNAMIC_SMEM(unsigned char, smem_raw)
TIKE_EMU_DYNAMIC_SMEM(float, patch_smem)
}  // namespace tike::cuda::topk_detail

namespace tike {
namespace {

struct EmuDevice {
  static void check_logits(const at::Tensor& logits) {
    TORCH_CHECK(logits.device().is_cpu(),
                "tike_cuda_emu: the emulated CUDA kernels take CPU tensors, got logits on ",
                logits.device());
  }
  struct Guard {
    explicit Guard(c10::Device) {}
  };
  static cudaStream_t stream() { return nullptr; }
  // As C10_CUDA_CHECK: throw, and leave no pending error for the next call to find.
  static void check(cudaError_t err) {
    if (err == cudaSuccess) return;
    (void)::tike_emu::get_last_error();
    TORCH_CHECK(false, ::tike_emu::error_name(err), ": ", ::tike_emu::last_error_message());
  }
};

// ---------------------------------------------------------------- controls

void set_schedule(c10::string_view order, int64_t seed) {
  ::tike_emu::Order o;
  if (order == "forward") {
    o = ::tike_emu::Order::Forward;
  } else if (order == "reversed") {
    o = ::tike_emu::Order::Reversed;
  } else if (order == "shuffled") {
    o = ::tike_emu::Order::Shuffled;
  } else {
    TORCH_CHECK_VALUE(false, "tike_emu: order must be 'forward', 'reversed' or 'shuffled', got '",
                      std::string(order), "'");
  }
  ::tike_emu::set_schedule(o, uint64_t(seed));
}

std::vector<int64_t> counters() {
  const auto c = ::tike_emu::counters();
  return {c.launches, c.blocks, c.barriers, c.warp_ops, c.switches};
}

void reset_counters() { ::tike_emu::reset_counters(); }

std::vector<std::string> warp_op_sites() {
  std::vector<std::string> out;
  for (const auto& [site, n] : ::tike_emu::warp_op_sites()) out.push_back(site + " " + std::to_string(n));
  return out;
}

}  // namespace

// Implemented in selftest.cpp: small kernels that break the CUDA rules on purpose.
at::Tensor emu_selftest(c10::string_view name);

}  // namespace tike

// The schemas of torch.ops.tike_cuda (csrc/ops.cpp), copied from the dispatcher: the
// tike_cuda extension is loaded first (tike_cuda.testing.load_emulated imports it).
TORCH_LIBRARY(tike_cuda_emu, m) {
  const std::string prefix = "tike_cuda::";
  auto& dispatcher = c10::Dispatcher::singleton();
  for (const auto& name : dispatcher.getAllOpNames()) {
    if (name.name.rfind(prefix, 0) != 0) continue;
    const auto op = dispatcher.findSchema(name);
    if (!op.has_value()) continue;
    std::ostringstream os;
    os << op->schema();
    const std::string schema = os.str().substr(prefix.size());
    m.def(schema.c_str());
  }
}

TORCH_LIBRARY_IMPL(tike_cuda_emu, CPU, m) {
  tike::glue::Ops<tike::EmuDevice>::register_all(m);
}

TORCH_LIBRARY(tike_emu, m) {
  m.def("set_schedule(str order, int seed=0) -> ()", &tike::set_schedule);
  m.def("counters() -> int[]", &tike::counters);
  m.def("reset_counters() -> ()", &tike::reset_counters);
  m.def("warp_op_sites() -> str[]", &tike::warp_op_sites);
  m.def("selftest(str name) -> Tensor", &tike::emu_selftest);
}
