// Controls of the CUDA emulation that are not part of the CUDA API: the order in which a
// block's threads are scheduled between rendezvous, and counters of what a launch did.
// Torch-free (the Python bindings are in ops_emu.cpp).
#pragma once
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace tike_emu {

// Forward: thread 0 first; Reversed: the last thread first; Shuffled: a new random order
// (from the seed) every scheduling round. A kernel that is missing a barrier reads what
// another thread has or has not written yet, so its result depends on the order.
enum class Order : int { Forward = 0, Reversed = 1, Shuffled = 2 };

void set_schedule(Order order, uint64_t seed);
Order schedule_order();

struct Counters {
  int64_t launches = 0;    // kernels run (failed ones included)
  int64_t blocks = 0;      // CTAs run
  int64_t barriers = 0;    // completed __syncthreads (per block)
  int64_t warp_ops = 0;    // completed warp rendezvous (per warp)
  int64_t switches = 0;    // fiber resumptions
};
Counters counters();
// Completed warp rendezvous per call site and kind, e.g. ("kernels/topk_select.cuh:213
// __any_sync", 381): how often a kernel took a given path.
std::vector<std::pair<std::string, int64_t>> warp_op_sites();
void reset_counters();

}  // namespace tike_emu
