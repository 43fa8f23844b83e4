// The CPU gradient cache (grad_cache.h): a c10::Allocator whose large buffers are
// anonymous mappings, kept after their tensor dies and handed to the next request that
// fits. Small requests, and every request off Linux, go to the default CPU allocator.
#include "grad_cache.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/CPUAllocator.h>

#include <algorithm>
#include <cstdlib>
#include <mutex>
#include <new>
#include <vector>

#if defined(__linux__)
#include <pthread.h>
#include <sys/mman.h>
#define TIKE_GRAD_CACHE_MMAP 1
#else
#define TIKE_GRAD_CACHE_MMAP 0
#endif

namespace tike {
namespace {

constexpr size_t kMinCachedBytes = size_t(1) << 20;  // below: the default allocator
constexpr size_t kPage = size_t(4) << 10;
constexpr size_t kHuge = size_t(2) << 20;

struct Block {
  void* base;
  size_t size;        // bytes mapped at base
  uint64_t last_use;  // tick of its last release (LRU)
};

size_t cap_from_env() {
  const char* s = std::getenv("TIKE_CPU_GRAD_CACHE_MB");
  if (s == nullptr || *s == '\0') return size_t(2048) << 20;
  char* end = nullptr;
  const long long mb = std::strtoll(s, &end, 10);
  TORCH_CHECK(end != s && *end == '\0' && mb >= 0,
              "tike_cuda: TIKE_CPU_GRAD_CACHE_MB must be a whole number of MiB >= 0, got '", s,
              "'");
  return size_t(mb) << 20;
}

#if TIKE_GRAD_CACHE_MMAP
// A fresh mapping of `size` bytes (a multiple of the page), 2 MiB-aligned when it spans
// whole huge pages and advised to use them: faulting a huge page maps 512 small ones at
// once. The advice costs a synchronous compaction now and then, which a cached buffer
// pays once, not per call.
void* map_block(size_t size) {
  const bool huge = size >= 2 * kHuge;
  const size_t len = huge ? size + kHuge : size;
  void* p = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  TORCH_CHECK(p != MAP_FAILED, "tike_cuda: out of memory allocating a ", size,
              "-byte CPU gradient");
  if (!huge) return p;
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  const uintptr_t lo = (a + kHuge - 1) & ~uintptr_t(kHuge - 1);
  if (lo > a) munmap(p, lo - a);
  if (a + len > lo + size) munmap(reinterpret_cast<void*>(lo + size), a + len - (lo + size));
#if defined(MADV_HUGEPAGE)
  (void)madvise(reinterpret_cast<void*>(lo), size, MADV_HUGEPAGE);
#endif
  return reinterpret_cast<void*>(lo);
}
void unmap_block(const Block& b) { munmap(b.base, b.size); }
#endif

class GradCacheAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
#if TIKE_GRAD_CACHE_MMAP
    if (n >= kMinCachedBytes) {
      const size_t size = (n + kPage - 1) / kPage * kPage;
      Block* b = take(size);
      if (b == nullptr) b = new Block{map_block(size), size, 0};
      return {b->base, b, &GradCacheAllocator::release, c10::Device(c10::DeviceType::CPU)};
    }
#endif
    return c10::GetDefaultCPUAllocator()->allocate(n);
  }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  CpuGradCacheInfo info() {
    std::lock_guard<std::mutex> lock(mu_);
    CpuGradCacheInfo i;
    i.idle_blocks = int64_t(idle_.size());
    i.idle_bytes = int64_t(idle_bytes_);
    i.hits = hits_;
    i.misses = misses_;
    i.cap_bytes = int64_t(cap_);
    return i;
  }

  void clear() {
    std::vector<Block*> drop;
    {
      std::lock_guard<std::mutex> lock(mu_);
      drop.swap(idle_);
      idle_bytes_ = 0;
    }
    for (Block* b : drop) destroy(b);
  }

  static GradCacheAllocator& get() {
    // Never destroyed: tensors may outlive static destruction at interpreter exit.
    static GradCacheAllocator* a = new GradCacheAllocator();
    return *a;
  }

 private:
  GradCacheAllocator() : cap_(cap_from_env()) {
#if TIKE_GRAD_CACHE_MMAP
    // A fork (a DataLoader worker) while another thread holds the lock would leave the
    // child's copy locked for good: the child starts with a fresh one.
    pthread_atfork(nullptr, nullptr, [] { new (&get().mu_) std::mutex(); });
#endif
  }

  // The smallest idle block of at least `size` bytes and at most 1.5x that, the most
  // recently released of equal ones (its lines are likelier still in cache), or null.
  Block* take(size_t size) {
    std::lock_guard<std::mutex> lock(mu_);
    auto best = idle_.end();
    for (auto it = idle_.begin(); it != idle_.end(); ++it) {
      const Block& b = **it;
      if (b.size < size || 2 * b.size > 3 * size) continue;
      if (best == idle_.end() || b.size < (*best)->size ||
          (b.size == (*best)->size && b.last_use > (*best)->last_use))
        best = it;
    }
    if (best == idle_.end()) {
      ++misses_;
      return nullptr;
    }
    Block* b = *best;
    idle_.erase(best);
    idle_bytes_ -= b->size;
    ++hits_;
    return b;
  }

  static void release(void* ctx) { get().put(static_cast<Block*>(ctx)); }

  void put(Block* b) {
    std::vector<Block*> drop;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (b->size <= cap_) {
        b->last_use = ++tick_;
        idle_.push_back(b);
        idle_bytes_ += b->size;
        while (idle_bytes_ > cap_) {  // drop the least recently released
          auto lru = std::min_element(idle_.begin(), idle_.end(), [](Block* x, Block* y) {
            return x->last_use < y->last_use;
          });
          idle_bytes_ -= (*lru)->size;
          drop.push_back(*lru);
          idle_.erase(lru);
        }
      } else {
        drop.push_back(b);
      }
    }
    for (Block* d : drop) destroy(d);  // unmapping outside the lock
  }

  static void destroy(Block* b) {
#if TIKE_GRAD_CACHE_MMAP
    unmap_block(*b);
#endif
    delete b;
  }

  std::mutex mu_;
  std::vector<Block*> idle_;
  size_t idle_bytes_ = 0;
  const size_t cap_;
  uint64_t tick_ = 0;
  int64_t hits_ = 0, misses_ = 0;
};

}  // namespace

at::Tensor cpu_cached_empty(at::IntArrayRef sizes, at::ScalarType dtype) {
  return at::detail::empty_generic(sizes, &GradCacheAllocator::get(),
                                   c10::DispatchKeySet(c10::DispatchKey::CPU), dtype,
                                   c10::nullopt);
}

CpuGradCacheInfo cpu_grad_cache_info() { return GradCacheAllocator::get().info(); }

void cpu_grad_cache_clear() { GradCacheAllocator::get().clear(); }

}  // namespace tike
