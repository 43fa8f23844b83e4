// A cache of the CPU backwards' [N, V] gradient buffers.
//
// Why: a fresh 150 MB gradient is fresh memory. The OS maps and zeroes it a page at a
// time on first touch, which on the CPU costs more than the backward's arithmetic (~30 ms
// of page faults for a 256 x 151,936 float32 gradient on a 2-core Xeon, against ~10 ms
// to write it when it is already mapped). A training loop frees the gradient of the
// logits within the same backward (the LM head's matmul consumes it), so the next step
// can take the same, already-mapped memory back, as CUDA's caching allocator does on the
// GPU.
//
// What is kept: buffers of at least kMinCachedBytes, once no tensor uses them (a buffer
// is never handed out twice), up to a cap on the idle bytes (TIKE_CPU_GRAD_CACHE_MB,
// default 2048; 0 turns the cache off), least recently used dropped first. A request
// takes the smallest idle buffer that holds it and is at most 1.5x its size. Tensors
// from the cache are ordinary resizable CPU tensors.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>

namespace tike {

// An uninitialized contiguous CPU tensor whose storage comes from the cache.
at::Tensor cpu_cached_empty(at::IntArrayRef sizes, at::ScalarType dtype);

struct CpuGradCacheInfo {
  int64_t idle_blocks = 0, idle_bytes = 0;  // kept for reuse now
  int64_t hits = 0, misses = 0;             // requests served from it / by a new buffer
  int64_t cap_bytes = 0;                    // the limit on idle_bytes
};
CpuGradCacheInfo cpu_grad_cache_info();

// Returns every idle buffer to the OS.
void cpu_grad_cache_clear();

}  // namespace tike
