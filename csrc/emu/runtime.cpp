// The scheduler of the CUDA emulation: runs a grid block by block, each block's threads as
// fibers that meet at barriers and warp operations (see cuda_emu.h for the model).
#include "runtime.h"

#include <cxxabi.h>
#include <dlfcn.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <unordered_map>
#include <vector>

#include "cuda_emu.h"
#include "fiber.h"

namespace tike_emu {
namespace detail {

Now g_now;

namespace {

constexpr size_t kStackBytes = 128 * 1024;

enum class St : uint8_t { Ready, Barrier, Warp, Done, Failed };

struct Thread {
  Context ctx;
  St st = St::Ready;
  int linear = 0;
  const char* file = "";  // where it waits
  int line = 0;
  WarpKind kind = WarpKind::Sync;
  unsigned mask = 0;
  uint64_t payload = 0, result = 0;
  int arg = 0;
};

// Lanes of one warp by state: a rendezvous completes when waiting covers its mask.
struct Warp {
  unsigned waiting = 0;  // at a warp operation
  unsigned done = 0;     // exited
};

struct Launch {
  void (*body)(void*) = nullptr;
  void* ctx = nullptr;
  std::string name;
  dim3 grid, block;
  int n = 0;                // threads per block
  uint64_t index = 0;       // launch counter (seeds the shuffled order)
  std::vector<Thread> th;
  std::vector<uint3> idx;   // threadIdx of each linear index
  std::vector<Warp> warps;
  Context sched;
  int cur = -1;
  bool failed = false;
  std::string error;
};

std::mutex g_mutex;  // one launch at a time: the fibers share g_now and the __shared__ TLS
Launch g_launch;
bool g_in_launch = false;
std::vector<Stack> g_stacks;

Order g_order = Order::Forward;
uint64_t g_seed = 0;
Counters g_count;

cudaError_t g_error = cudaSuccess;
bool g_sticky = false;  // a kernel failed: later launches are skipped until the error is read
std::string g_message;

std::unordered_map<const void*, int> g_max_dyn_smem;
// Completed warp rendezvous per call site ("kernels/topk_select.cuh:213 __any_sync").
std::unordered_map<const char*, std::unordered_map<int, int64_t>> g_site_raw;
std::vector<void* (*)()> g_dyn_smem;

// ---------------------------------------------------------------- messages

std::string short_file(const char* f) {
  // the last two path components: "kernels/common.cuh"
  const char* last = std::strrchr(f, '/');
  if (last == nullptr) return f;
  const char* p = last;
  while (p > f && p[-1] != '/') --p;
  return p > f ? std::string(p) : std::string(last + 1);
}

std::string site(const char* file, int line) { return short_file(file) + ":" + std::to_string(line); }

const char* kind_name(WarpKind k) {
  switch (k) {
    case WarpKind::Sync: return "__syncwarp";
    case WarpKind::ShflIdx: return "__shfl_sync";
    case WarpKind::ShflUp: return "__shfl_up_sync";
    case WarpKind::ShflDown: return "__shfl_down_sync";
    case WarpKind::ShflXor: return "__shfl_xor_sync";
    case WarpKind::Ballot: return "__ballot_sync";
    case WarpKind::Any: return "__any_sync";
    case WarpKind::All: return "__all_sync";
  }
  return "?";
}

std::string hex(unsigned m) {
  char b[16];
  std::snprintf(b, sizeof b, "0x%08x", m);
  return b;
}

std::string where(const Thread& t) {
  switch (t.st) {
    case St::Barrier: return "wait at __syncthreads (" + site(t.file, t.line) + ")";
    case St::Warp:
      return std::string("wait at ") + kind_name(t.kind) + " (" + site(t.file, t.line) +
             ", mask " + hex(t.mask) + ")";
    case St::Done: return "exited";
    case St::Failed: return "failed";
    case St::Ready: return "are runnable";
  }
  return "?";
}

// "threads 0-31 wait at ...; threads 32-255 exited": runs of consecutive threads in the
// same place.
std::string describe_threads() {
  const auto& th = g_launch.th;
  std::ostringstream os;
  int i = 0;
  bool first = true;
  while (i < g_launch.n) {
    const std::string w = where(th[i]);
    int j = i + 1;
    while (j < g_launch.n && where(th[j]) == w) ++j;
    os << (first ? "" : "; ") << (j - i == 1 ? "thread " : "threads ") << i;
    if (j - i > 1) os << "-" << (j - 1);
    os << " " << w;
    first = false;
    i = j;
  }
  return os.str();
}

std::string block_name() {
  std::ostringstream os;
  os << "block (" << g_now.block.x << "," << g_now.block.y << "," << g_now.block.z << ") of ("
     << g_launch.grid.x << "," << g_launch.grid.y << "," << g_launch.grid.z << ")";
  return os.str();
}

std::string kernel_name(const void* kernel, const char* fallback) {
  Dl_info info;
  if (dladdr(kernel, &info) && info.dli_sname && info.dli_saddr == kernel) {
    int status = 0;
    char* d = abi::__cxa_demangle(info.dli_sname, nullptr, nullptr, &status);
    if (status == 0 && d) {
      std::string s = d;
      std::free(d);
      return s;
    }
  }
  return fallback;
}

// ---------------------------------------------------------------- fibers

Thread& me() { return g_launch.th[g_launch.cur]; }

void yield_to_scheduler() {
  context_switch(me().ctx, g_launch.sched);
}

[[noreturn]] void fail_in_fiber(const std::string& what) {
  g_launch.failed = true;
  g_launch.error = what;
  me().st = St::Failed;
  context_switch(me().ctx, g_launch.sched);
  __builtin_unreachable();  // a failed launch never resumes its fibers
}

void fiber_entry() {
  g_launch.body(g_launch.ctx);
  me().st = St::Done;
  g_launch.warps[me().linear >> 5].done |= 1u << (me().linear & 31);
  context_switch(me().ctx, g_launch.sched);
  __builtin_unreachable();
}

void resume(int i) {
  Thread& t = g_launch.th[i];
  g_now.thread = g_launch.idx[i];
  g_launch.cur = i;
  context_switch(g_launch.sched, t.ctx);
  g_launch.cur = -1;
}

bool same_site(const char* f1, int l1, const char* f2, int l2) {
  return l1 == l2 && (f1 == f2 || std::strcmp(f1, f2) == 0);
}

// All threads wait at __syncthreads (none at a warp operation): release them, or fail if
// some exited or they wait at different calls.
bool complete_barrier() {
  auto& th = g_launch.th;
  int at = -1;
  for (int i = 0; i < g_launch.n; ++i) {
    if (th[i].st == St::Warp) return false;
    if (th[i].st == St::Barrier && at < 0) at = i;
  }
  if (at < 0) return false;
  for (int i = 0; i < g_launch.n; ++i) {
    const Thread& t = th[i];
    if (t.st == St::Done) {
      g_launch.failed = true;
      g_launch.error = "__syncthreads (" + site(th[at].file, th[at].line) +
                       ") is not reached by every thread: " + describe_threads();
      return false;
    }
    if (!same_site(t.file, t.line, th[at].file, th[at].line)) {
      g_launch.failed = true;
      g_launch.error = "threads wait at different barriers: " + describe_threads();
      return false;
    }
  }
  for (auto& t : th) t.st = St::Ready;
  ++g_count.barriers;
  return true;
}

uint64_t shuffle_state(uint64_t& s) {  // splitmix64
  uint64_t z = (s += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

bool run_block(const std::vector<unsigned char*>& smem, size_t dyn) {
  const int n = g_launch.n;
  auto& th = g_launch.th;
  for (int i = 0; i < n; ++i) {
    th[i] = Thread();
    th[i].linear = i;
    context_init(th[i].ctx, g_stacks[i].lo, g_stacks[i].size, &fiber_entry);
  }
  for (auto& w : g_launch.warps) w = Warp();
  const size_t span = std::min(kDynSmemCapacity, dyn + size_t(kSmemRedzone));
  for (unsigned char* p : smem) std::memset(p, 0xff, span);

  std::vector<int> order(n);
  uint64_t rng = g_seed * 0x2545f4914f6cdd1dull + g_launch.index * 1000003ull +
                 (uint64_t(g_now.block.x) << 20) + g_now.block.y + (uint64_t(g_now.block.z) << 40);
  for (uint64_t round = 0;; ++round) {
    for (int i = 0; i < n; ++i) order[i] = g_order == Order::Reversed ? n - 1 - i : i;
    if (g_order == Order::Shuffled) {
      for (int i = n - 1; i > 0; --i) std::swap(order[i], order[shuffle_state(rng) % uint64_t(i + 1)]);
    }
    bool ran = false;
    for (int i : order) {
      if (th[i].st != St::Ready) continue;
      ++g_count.switches;
      resume(i);
      ran = true;
      if (g_launch.failed) return false;
    }
    if (ran) continue;
    bool all_done = true;
    for (int i = 0; i < n && all_done; ++i) all_done = th[i].st == St::Done;
    if (all_done) break;
    if (complete_barrier()) continue;
    if (!g_launch.failed) {
      g_launch.failed = true;
      g_launch.error = "deadlock: " + describe_threads();
    }
    return false;
  }

  for (unsigned char* p : smem) {
    for (size_t o = dyn; o < span; ++o) {
      if (p[o] != 0xff) {
        g_launch.failed = true;
        g_launch.error = "a thread wrote past the " + std::to_string(dyn) +
                         " bytes of dynamic shared memory of the launch (at byte " +
                         std::to_string(o) + ")";
        return false;
      }
    }
  }
  return true;
}

void set_error(cudaError_t err, std::string msg) {
  g_error = err;
  g_message = std::move(msg);
}

}  // namespace

// ---------------------------------------------------------------- device side

void syncthreads(const char* file, int line) {
  Thread& t = me();
  t.st = St::Barrier;
  t.file = file;
  t.line = line;
  yield_to_scheduler();
}

uint64_t warp_op(WarpKind kind, unsigned mask, uint64_t payload, int arg, const char* file,
                 int line) {
  Thread& t = me();
  const int lane = t.linear & 31, base = t.linear & ~31;
  auto call = [&] { return std::string(kind_name(kind)) + " (" + site(file, line) + ")"; };
  if (!((mask >> lane) & 1u))
    fail_in_fiber("thread " + std::to_string(t.linear) + " calls " + call() + " with mask " +
                  hex(mask) + ", which does not name its own lane " + std::to_string(lane));
  if (arg < 0 && kind != WarpKind::Sync)
    fail_in_fiber(call() + ": the emulation supports width 32 only");
  if (base + 32 - __builtin_clz(mask) > g_launch.n)
    fail_in_fiber(call() + " with mask " + hex(mask) + " names lanes past the block's " +
                  std::to_string(g_launch.n) + " threads");
  t.st = St::Warp;
  t.kind = kind;
  t.mask = mask;
  t.payload = payload;
  t.arg = arg;
  t.file = file;
  t.line = line;
  auto& th = g_launch.th;
  Warp& w = g_launch.warps[base >> 5];
  if (w.done & mask)
    fail_in_fiber("thread " + std::to_string(base + __builtin_ctz(w.done & mask)) +
                  " exited before joining " + call() + " (mask " + hex(mask) + ") with thread " +
                  std::to_string(t.linear));
  w.waiting |= 1u << lane;
  if ((w.waiting & mask) != mask) {
    yield_to_scheduler();  // resumed once the last lane of the mask arrived
    return t.result;
  }
  // The last lane of the mask arrived: all must be at this very operation.
  for (unsigned m = mask; m; m &= m - 1) {
    const Thread& o = th[base + __builtin_ctz(m)];
    if (o.kind != kind || o.mask != mask || !same_site(o.file, o.line, file, line))
      fail_in_fiber("divergent warp operation in warp " + std::to_string(base / 32) +
                    ": thread " + std::to_string(t.linear) + " " + where(t) + ", thread " +
                    std::to_string(o.linear) + " " + where(o));
  }
  uint64_t ballot = 0;
  for (unsigned m = mask; m; m &= m - 1) {
    const int l = __builtin_ctz(m);
    if (th[base + l].payload) ballot |= uint64_t(1) << l;
  }
  for (unsigned m = mask; m; m &= m - 1) {
    const int l = __builtin_ctz(m);
    Thread& o = th[base + l];
    int src = l;
    switch (kind) {
      case WarpKind::Sync: o.result = 0; break;
      case WarpKind::Ballot: o.result = ballot; break;
      case WarpKind::Any: o.result = ballot != 0; break;
      case WarpKind::All: o.result = ballot == mask; break;
      case WarpKind::ShflIdx: src = o.arg & 31; break;
      case WarpKind::ShflXor: src = (l ^ o.arg) & 31; break;
      case WarpKind::ShflUp: src = l - o.arg >= 0 ? l - o.arg : l; break;
      case WarpKind::ShflDown: src = l + o.arg < 32 ? l + o.arg : l; break;
    }
    if (kind >= WarpKind::ShflIdx && kind <= WarpKind::ShflXor) {
      if (!((mask >> src) & 1u))
        fail_in_fiber("thread " + std::to_string(o.linear) + " reads lane " + std::to_string(src) +
                      " outside the mask " + hex(mask) + " in " + call());
      o.result = th[base + src].payload;
    }
  }
  for (unsigned m = mask; m; m &= m - 1) th[base + __builtin_ctz(m)].st = St::Ready;
  w.waiting &= ~mask;
  ++g_site_raw[file][line * 8 + int(kind)];
  ++g_count.warp_ops;
  return t.result;
}

void run_grid(const void* kernel, const char* name, dim3 grid, dim3 block, size_t smem,
              void (*body)(void*), void* ctx) {
  std::unique_lock<std::mutex> lock(g_mutex, std::defer_lock);
  if (g_in_launch) {
    set_error(cudaErrorNotSupported, "a kernel launched another kernel (not emulated)");
    return;
  }
  lock.lock();
  const std::string kname = kernel_name(kernel, name);
  if (g_sticky) return;  // as on a GPU after a fault: nothing runs until the error is read
  const uint64_t nthreads = uint64_t(block.x) * block.y * block.z;
  if (nthreads == 0 || nthreads > 1024 || block.x > 1024 || block.y > 1024 || block.z > 64 ||
      grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 0x7fffffffu || grid.y > 65535 ||
      grid.z > 65535) {
    set_error(cudaErrorInvalidConfiguration,
              kname + ": invalid launch configuration (grid " + std::to_string(grid.x) + "x" +
                  std::to_string(grid.y) + "x" + std::to_string(grid.z) + ", block " +
                  std::to_string(block.x) + "x" + std::to_string(block.y) + "x" +
                  std::to_string(block.z) + ")");
    return;
  }
  const auto it = g_max_dyn_smem.find(kernel);
  const size_t limit = it == g_max_dyn_smem.end() ? size_t(kSmemDefault) : size_t(it->second);
  if (smem > limit) {
    set_error(cudaErrorInvalidValue,
              kname + ": launch asks for " + std::to_string(smem) +
                  " bytes of dynamic shared memory, above " +
                  (it == g_max_dyn_smem.end()
                       ? std::string("the 48 KB a kernel gets without opting in with "
                                     "cudaFuncSetAttribute(cudaFuncAttributeMaxDynamicSharedMemorySize)")
                       : "its opt-in of " + std::to_string(limit) + " bytes"));
    return;
  }

  g_in_launch = true;
  g_launch.body = body;
  g_launch.ctx = ctx;
  g_launch.name = kname;
  g_launch.grid = grid;
  g_launch.block = block;
  g_launch.n = int(nthreads);
  g_launch.index = uint64_t(g_count.launches++);
  g_launch.failed = false;
  g_launch.error.clear();
  g_launch.th.resize(nthreads);
  g_launch.warps.resize((nthreads + 31) / 32);
  g_launch.idx.resize(nthreads);
  for (uint64_t i = 0; i < nthreads; ++i)
    g_launch.idx[i] = make_uint3(unsigned(i % block.x), unsigned((i / block.x) % block.y),
                                 unsigned(i / (uint64_t(block.x) * block.y)));
  while (g_stacks.size() < nthreads) g_stacks.push_back(stack_alloc(kStackBytes));
  std::vector<unsigned char*> buffers;
  for (auto address : g_dyn_smem) buffers.push_back(static_cast<unsigned char*>(address()));
  g_now.block_dim = block;
  g_now.grid_dim = grid;

  bool ok = true;
  for (unsigned z = 0; z < grid.z && ok; ++z) {
    for (unsigned y = 0; y < grid.y && ok; ++y) {
      for (unsigned x = 0; x < grid.x && ok; ++x) {
        g_now.block = make_uint3(x, y, z);
        ++g_count.blocks;
        ok = run_block(buffers, smem);
      }
    }
  }
  if (!ok) {
    set_error(cudaErrorLaunchFailure, "tike_cuda emulation: " + kname + ", " + block_name() +
                                          ": " + g_launch.error);
    g_sticky = true;
  }
  g_now = Now();
  g_in_launch = false;
}

cudaError_t set_max_dynamic_smem(const void* kernel, int bytes) {
  std::lock_guard<std::mutex> lock(g_mutex);
  if (bytes < 0 || bytes > kSmemOptin) {
    set_error(cudaErrorInvalidValue,
              "cudaFuncSetAttribute(cudaFuncAttributeMaxDynamicSharedMemorySize, " +
                  std::to_string(bytes) + "): the device allows at most " +
                  std::to_string(kSmemOptin) + " bytes per block");
    return cudaErrorInvalidValue;
  }
  g_max_dyn_smem[kernel] = bytes;
  return cudaSuccess;
}

int register_dynamic_smem(void* (*address)()) {
  g_dyn_smem.push_back(address);
  return int(g_dyn_smem.size());
}

}  // namespace detail

// ---------------------------------------------------------------- runtime API

cudaError_t get_last_error() {
  std::lock_guard<std::mutex> lock(detail::g_mutex);
  const cudaError_t e = detail::g_error;
  detail::g_error = cudaSuccess;
  detail::g_sticky = false;
  return e;
}

cudaError_t peek_last_error() { return detail::g_error; }

const char* last_error_message() { return detail::g_message.c_str(); }

cudaError_t get_device(int* device) {
  *device = 0;
  return cudaSuccess;
}

cudaError_t device_get_attribute(int* value, cudaDeviceAttr attr, int device) {
  if (device != 0) return cudaErrorInvalidDevice;
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = kSmCount; break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = kSmemOptin; break;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = kSmemDefault; break;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor: *value = 228 * 1024; break;
    case cudaDevAttrMaxThreadsPerBlock: *value = 1024; break;
    case cudaDevAttrMaxThreadsPerMultiProcessor: *value = 2048; break;
    case cudaDevAttrWarpSize: *value = 32; break;
    case cudaDevAttrComputeCapabilityMajor: *value = 9; break;
    case cudaDevAttrComputeCapabilityMinor: *value = 0; break;
    case cudaDevAttrMaxRegistersPerBlock: *value = 65536; break;
    default: return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}

const char* error_name(cudaError_t err) {
  switch (err) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    case cudaErrorNotSupported: return "cudaErrorNotSupported";
    default: return "cudaError";
  }
}

// ---------------------------------------------------------------- controls

void set_schedule(Order order, uint64_t seed) {
  std::lock_guard<std::mutex> lock(detail::g_mutex);
  detail::g_order = order;
  detail::g_seed = seed;
}

Order schedule_order() { return detail::g_order; }

Counters counters() { return detail::g_count; }

std::vector<std::pair<std::string, int64_t>> warp_op_sites() {
  std::lock_guard<std::mutex> lock(detail::g_mutex);
  std::vector<std::pair<std::string, int64_t>> out;
  for (const auto& [file, lines] : detail::g_site_raw) {
    for (const auto& [key, n] : lines) {
      out.emplace_back(detail::site(file, key / 8) + " " +
                           detail::kind_name(static_cast<WarpKind>(key % 8)), n);
    }
  }
  std::sort(out.begin(), out.end());
  return out;
}

void reset_counters() {
  std::lock_guard<std::mutex> lock(detail::g_mutex);
  detail::g_count = Counters();
  detail::g_site_raw.clear();
}

}  // namespace tike_emu
