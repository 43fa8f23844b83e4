// google-benchmark of the CUDA kernels (header-only launchers in csrc/kernels/*.cuh) next
// to a device-to-device copy of the same bytes, so the byte floor (design.md §5) is
// visible in the same run.
//
// Each iteration: flush L2 (memset of 2x its size), then time the op alone with CUDA
// events (UseManualTime). Counters: bytes_per_second (the op's byte model),
// items_per_second (logit elements per pass over z), floor_frac = (bytes / copy
// bandwidth) / time, 1.0 meaning copy speed.
//
//   bench_cuda_kernels [--rows=4096,16384] [--vocab=32000,128256,151936]
//                      [--ks=1,4,16,64,256] [--dtypes=bf16] [google-benchmark flags]
#include <benchmark/benchmark.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <memory>

#include "bench_common.h"

// The launchers are compiled in when their headers exist.
#if __has_include("kernels/topk_kl.cuh")
#include "kernels/topk_kl.cuh"
#define TIKE_BENCH_TOPK 1
#endif
#if __has_include("kernels/full_kl.cuh")
#include "kernels/full_kl.cuh"
#define TIKE_BENCH_FULL 1
#endif
#if __has_include("kernels/token_logprobs.cuh")
#include "kernels/token_logprobs.cuh"
#define TIKE_BENCH_TOKEN 1
#endif

namespace {
using namespace tike;
using namespace tike::bench;

#define CHECK_CUDA(expr)                                                            \
  do {                                                                              \
    cudaError_t e_ = (expr);                                                        \
    if (e_ != cudaSuccess) {                                                        \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #expr,            \
                   cudaGetErrorString(e_));                                         \
      std::exit(1);                                                                 \
    }                                                                               \
  } while (0)

struct DeviceBuffer {
  void* p = nullptr;
  size_t bytes = 0;
  explicit DeviceBuffer(size_t b) : bytes(b) {
    CHECK_CUDA(cudaMalloc(&p, std::max<size_t>(b, 16)));
    CHECK_CUDA(cudaMemset(p, 0, std::max<size_t>(b, 16)));
  }
  ~DeviceBuffer() { cudaFree(p); }
  DeviceBuffer(DeviceBuffer&& o) noexcept : p(o.p), bytes(o.bytes) { o.p = nullptr; }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  template <class T> T* as() const { return static_cast<T*>(p); }
};

// Hash-based normal deviates: z ~ N(0, 2^2), zr = z + N(0, 0.5^2) (as bench_common.h, on device).
__device__ float hash_normal(uint64_t key) {
  uint64_t a = key * 0x9E3779B97F4A7C15ull + 0x632BE59BD9B4E019ull;
  a = (a ^ (a >> 30)) * 0xBF58476D1CE4E5B9ull;
  a = (a ^ (a >> 27)) * 0x94D049BB133111EBull;
  a ^= a >> 31;
  float u1 = ((a >> 40) + 0.5f) * (1.f / 16777216.f);
  float u2 = (((a >> 16) & 0xffffff) + 0.5f) * (1.f / 16777216.f);
  return sqrtf(-2.f * logf(u1)) * cospif(2.f * u2);
}

__device__ void store_dev(void* p, DType d, int64_t i, float v) {
  if (d == DType::Float32) {
    static_cast<float*>(p)[i] = v;
  } else if (d == DType::BFloat16) {
    uint32_t u = __float_as_uint(v);
    u += 0x7fffu + ((u >> 16) & 1u);
    static_cast<uint16_t*>(p)[i] = static_cast<uint16_t>(u >> 16);
  } else {
    static_cast<__half_raw*>(p)[i] = static_cast<__half_raw>(__float2half_rn(v));
  }
}

__global__ void fill_kernel(void* z, void* zr, DType d, int64_t n, int64_t V) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    float a = 2.f * hash_normal(2 * uint64_t(i));
    store_dev(z, d, i, a);
    store_dev(zr, d, i, a + 0.5f * hash_normal(2 * uint64_t(i) + 1));
  }
}

__global__ void tokens_kernel(int64_t* tokens, float* old_lp, int64_t N, int64_t V) {
  int64_t n = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (n < N) {
    tokens[n] = static_cast<int64_t>(fabsf(hash_normal(uint64_t(n) + (1ull << 60))) * 1e6f) % V;
    old_lp[n] = -2.f - 0.1f * fabsf(hash_normal(uint64_t(n) + (1ull << 61)));
  }
}

__global__ void fill_f32(float* p, int64_t n, float v) {
  int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i < n) p[i] = v;
}

// State shared by all benchmarks: the L2 flush buffer, timing events, copy bandwidth.
struct Device {
  cudaStream_t stream = nullptr;
  cudaEvent_t start, stop;
  std::unique_ptr<DeviceBuffer> flush;
  double copy_bw = 0;  // read + write bytes per second of cudaMemcpyAsync D2D

  Device() {
    CHECK_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    CHECK_CUDA(cudaEventCreate(&start));
    CHECK_CUDA(cudaEventCreate(&stop));
    int dev = 0, l2 = 0;
    CHECK_CUDA(cudaGetDevice(&dev));
    CHECK_CUDA(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, dev));
    flush = std::make_unique<DeviceBuffer>(2 * size_t(std::max(l2, 1 << 20)));
    copy_bw = measure_copy();
  }
  void flush_l2() { CHECK_CUDA(cudaMemsetAsync(flush->p, 0, flush->bytes, stream)); }

  // Median of 9 timed copies of 2 GiB (after one warm-up).
  double measure_copy() {
    const size_t bytes = size_t(2) << 30;
    DeviceBuffer a(bytes), b(bytes);
    std::vector<float> ms;
    for (int i = 0; i < 10; ++i) {
      flush_l2();
      CHECK_CUDA(cudaEventRecord(start, stream));
      CHECK_CUDA(cudaMemcpyAsync(b.p, a.p, bytes, cudaMemcpyDeviceToDevice, stream));
      CHECK_CUDA(cudaEventRecord(stop, stream));
      CHECK_CUDA(cudaEventSynchronize(stop));
      float t = 0;
      CHECK_CUDA(cudaEventElapsedTime(&t, start, stop));
      if (i > 0) ms.push_back(t);
    }
    std::sort(ms.begin(), ms.end());
    return 2.0 * bytes / (ms[ms.size() / 2] * 1e-3);
  }
};

Device& device() {
  static Device d;
  return d;
}

// One [N, V] problem on the device, cached: consecutive benchmarks of a size share it.
struct Problem {
  int64_t N, V;
  DType dtype;
  DeviceBuffer z, zr, tokens, old_lp;
  Problem(int64_t n, int64_t v, DType d)
      : N(n), V(v), dtype(d), z(n * v * dtype_size(d)), zr(n * v * dtype_size(d)),
        tokens(n * 8), old_lp(n * 4) {
    fill_kernel<<<4096, 256>>>(z.p, zr.p, d, N * V, V);
    tokens_kernel<<<(N + 255) / 256, 256>>>(tokens.as<int64_t>(), old_lp.as<float>(), N, V);
    CHECK_CUDA(cudaGetLastError());
    CHECK_CUDA(cudaDeviceSynchronize());
  }
  size_t pass_bytes() const { return size_t(N * V) * dtype_size(dtype); }
};

const Problem& problem(int64_t N, int64_t V, DType d) {
  static std::unique_ptr<Problem> cached;
  if (!cached || cached->N != N || cached->V != V || cached->dtype != d) {
    cached.reset();
    cached = std::make_unique<Problem>(N, V, d);
  }
  return *cached;
}

DeviceBuffer ones(int64_t N) {
  DeviceBuffer g(N * 4);
  fill_f32<<<(N + 255) / 256, 256>>>(g.as<float>(), N, 1.f);
  CHECK_CUDA(cudaGetLastError());
  return g;
}

// Flush L2, time body() with events, set the counters. body() must launch on dev.stream
// and return a cudaError_t.
template <class F>
void run_timed(benchmark::State& s, Op op, const Problem& p, F&& body) {
  Device& dev = device();
  CHECK_CUDA(body());  // warm-up, and catches launch errors before timing
  CHECK_CUDA(cudaStreamSynchronize(dev.stream));
  double total = 0;
  for (auto _ : s) {
    dev.flush_l2();
    CHECK_CUDA(cudaEventRecord(dev.start, dev.stream));
    CHECK_CUDA(body());
    CHECK_CUDA(cudaEventRecord(dev.stop, dev.stream));
    CHECK_CUDA(cudaEventSynchronize(dev.stop));
    float ms = 0;
    CHECK_CUDA(cudaEventElapsedTime(&ms, dev.start, dev.stop));
    s.SetIterationTime(ms * 1e-3);
    total += ms * 1e-3;
  }
  const double bytes = static_cast<double>(passes(op)) * p.pass_bytes();
  s.SetBytesProcessed(static_cast<int64_t>(bytes) * s.iterations());
  s.SetItemsProcessed(p.N * p.V * s.iterations());
  if (total > 0) s.counters["floor_frac"] = bytes / dev.copy_bw * s.iterations() / total;
}

void BM_copy(benchmark::State& s, int64_t N, int64_t V, DType d) {
  const Problem& p = problem(N, V, d);
  DeviceBuffer dst(p.pass_bytes());
  run_timed(s, Op::Copy, p, [&] {
    return cudaMemcpyAsync(dst.p, p.z.p, p.pass_bytes(), cudaMemcpyDeviceToDevice,
                           device().stream);
  });
}

#ifdef TIKE_BENCH_TOPK
void BM_topk_kl(benchmark::State& s, Op op, int64_t N, int64_t V, int64_t k, DType d) {
  const Problem& p = problem(N, V, d);
  const int64_t K1 = k + 1;  // sampled token united, as in RL training
  DeviceBuffer out(N * 4), lse(N * 4), idx(N * K1 * 4), coef(N * K1 * 4), shift(N * 4),
      stats(N * 12), g = ones(N);
  TopkKlForwardArgs f;
  f.logits = p.z.p, f.ref_logits = p.zr.p;
  f.logits_layout = f.ref_layout = RowLayout::contiguous(N, V);
  f.dtype = d, f.N = N, f.V = V, f.k = k, f.K1 = K1;
  f.sampled_tokens = p.tokens.as<int64_t>(), f.old_logprobs = p.old_lp.as<float>();
  f.out = out.as<float>(), f.lse = lse.as<float>(), f.idx = idx.as<int32_t>();
  f.coef = coef.as<float>(), f.shift = shift.as<float>(), f.stats = stats.as<float>();
  const tike::cuda::TopkKlForwardPlan plan = tike::cuda::topk_kl_forward_plan(f);
  DeviceBuffer fwd_ws(plan.workspace_bytes);
  cudaStream_t st = device().stream;
  std::unique_ptr<DeviceBuffer> grad, bwd_ws;
  TopkKlBackwardArgs b;
  if (op != Op::TopkFwd) {
    grad = std::make_unique<DeviceBuffer>(p.pass_bytes());
    CHECK_CUDA(tike::cuda::topk_kl_forward(f, plan, fwd_ws.p, st));
    b.grad_out = g.as<float>(), b.logits = f.logits;
    b.logits_layout = b.grad_layout = f.logits_layout;
    b.dtype = d, b.N = N, b.V = V, b.K1 = K1;
    b.lse = f.lse, b.idx = f.idx, b.coef = f.coef, b.shift = f.shift;
    b.grad = grad->p;
    bwd_ws = std::make_unique<DeviceBuffer>(tike::cuda::topk_kl_backward_workspace_bytes(b));
  }
  run_timed(s, op, p, [&] {
    cudaError_t e = cudaSuccess;
    if (op != Op::TopkBwd) e = tike::cuda::topk_kl_forward(f, plan, fwd_ws.p, st);
    if (e == cudaSuccess && op != Op::TopkFwd) e = tike::cuda::topk_kl_backward(b, bwd_ws->p, st);
    return e;
  });
}
#endif

#ifdef TIKE_BENCH_FULL
void BM_full_kl(benchmark::State& s, Op op, int64_t N, int64_t V, DType d) {
  const Problem& p = problem(N, V, d);
  DeviceBuffer out(N * 4), lse_p(N * 4), lse_q(N * 4), g = ones(N);
  FullKlForwardArgs f;
  f.logits = p.z.p, f.ref_logits = p.zr.p;
  f.logits_layout = f.ref_layout = RowLayout::contiguous(N, V);
  f.dtype = d, f.N = N, f.V = V;
  f.out = out.as<float>(), f.lse_p = lse_p.as<float>(), f.lse_q = lse_q.as<float>();
  cudaStream_t st = device().stream;
  DeviceBuffer ws(tike::cuda::full_kl_forward_workspace_bytes(f));
  CHECK_CUDA(tike::cuda::full_kl_forward(f, ws.p, st));
  std::unique_ptr<DeviceBuffer> grad;
  FullKlBackwardArgs b;
  if (op == Op::FullBwd) {
    grad = std::make_unique<DeviceBuffer>(p.pass_bytes());
    b.grad_out = g.as<float>(), b.logits = f.logits, b.ref_logits = f.ref_logits;
    b.logits_layout = f.logits_layout, b.ref_layout = f.ref_layout;
    b.dtype = d, b.N = N, b.V = V, b.out = f.out, b.lse_p = f.lse_p, b.lse_q = f.lse_q;
    b.grad = grad->p;
  }
  run_timed(s, op, p, [&] {
    return op == Op::FullFwd ? tike::cuda::full_kl_forward(f, ws.p, st)
                             : tike::cuda::full_kl_backward(b, st);
  });
}
#endif

#ifdef TIKE_BENCH_TOKEN
void BM_token_logprobs(benchmark::State& s, Op op, int64_t N, int64_t V, DType d) {
  const Problem& p = problem(N, V, d);
  DeviceBuffer logp(N * 4), lse(N * 4), g = ones(N);
  TokenLogprobsForwardArgs f;
  f.logits = p.z.p, f.logits_layout = RowLayout::contiguous(N, V);
  f.dtype = d, f.N = N, f.V = V, f.tokens = p.tokens.as<int64_t>();
  f.logp = logp.as<float>(), f.lse = lse.as<float>();  // no entropy: the API's default
  cudaStream_t st = device().stream;
  DeviceBuffer ws(tike::cuda::token_logprobs_forward_workspace_bytes(f));
  CHECK_CUDA(tike::cuda::token_logprobs_forward(f, ws.p, st));
  std::unique_ptr<DeviceBuffer> grad;
  TokenLogprobsBackwardArgs b;
  if (op == Op::TokenBwd) {
    grad = std::make_unique<DeviceBuffer>(p.pass_bytes());
    b.grad_logp = g.as<float>(), b.logits = f.logits, b.logits_layout = f.logits_layout;
    b.dtype = d, b.N = N, b.V = V, b.tokens = f.tokens, b.lse = f.lse;
    b.grad = grad->p;
  }
  run_timed(s, op, p, [&] {
    return op == Op::TokenFwd ? tike::cuda::token_logprobs_forward(f, ws.p, st)
                              : tike::cuda::token_logprobs_backward(b, st);
  });
}
#endif

std::string tag(const char* name, DType d, int64_t N, int64_t V) {
  return std::string(name) + "/" + dtype_name(d) + "/N:" + std::to_string(N) + "/V:" +
         std::to_string(V);
}

void register_all(const Config& c) {
  auto reg = [](const std::string& name, auto fn) {
    benchmark::RegisterBenchmark(name.c_str(), fn)->UseManualTime()->Unit(benchmark::kMillisecond);
  };
  for (DType d : c.dtypes)
    for (int64_t N : c.rows)
      for (int64_t V : c.vocab) {
        reg(tag("copy", d, N, V), [=](benchmark::State& s) { BM_copy(s, N, V, d); });
#ifdef TIKE_BENCH_TOPK
        std::vector<int64_t> ks{c.k_default};
        if (V == c.vocab.back()) ks = c.ks;  // the k sweep at the largest vocabulary
        // Above kTopkSelectMaxK the launcher expects S from the caller: not a fused op.
        auto fused_k = [&](int64_t k) { return k <= V && k <= tike::cuda::kTopkSelectMaxK; };
        for (int64_t k : ks) {
          if (!fused_k(k)) continue;
          reg(tag("topk_kl_fwd", d, N, V) + "/k:" + std::to_string(k),
              [=](benchmark::State& s) { BM_topk_kl(s, Op::TopkFwd, N, V, k, d); });
        }
        for (int64_t k : ks) {
          if (!fused_k(k)) continue;
          reg(tag("topk_kl_fwdbwd", d, N, V) + "/k:" + std::to_string(k),
              [=](benchmark::State& s) { BM_topk_kl(s, Op::TopkFwdBwd, N, V, k, d); });
        }
        std::string k16 = "/k:" + std::to_string(c.k_default);
        reg(tag("topk_kl_bwd", d, N, V) + k16,
            [=](benchmark::State& s) { BM_topk_kl(s, Op::TopkBwd, N, V, c.k_default, d); });
#endif
#ifdef TIKE_BENCH_FULL
        reg(tag("full_kl_fwd", d, N, V), [=](benchmark::State& s) { BM_full_kl(s, Op::FullFwd, N, V, d); });
        reg(tag("full_kl_bwd", d, N, V), [=](benchmark::State& s) { BM_full_kl(s, Op::FullBwd, N, V, d); });
#endif
#ifdef TIKE_BENCH_TOKEN
        reg(tag("token_logprobs_fwd", d, N, V),
            [=](benchmark::State& s) { BM_token_logprobs(s, Op::TokenFwd, N, V, d); });
        reg(tag("token_logprobs_bwd", d, N, V),
            [=](benchmark::State& s) { BM_token_logprobs(s, Op::TokenBwd, N, V, d); });
#endif
      }
}

}  // namespace

int main(int argc, char** argv) {
  Config cfg;
  cfg.rows = {4096, 16384};  // 16384 x 151936 is design.md §5's reference point
  cfg.dtypes = {DType::BFloat16};
  cfg.parse(&argc, argv);
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    std::fprintf(stderr, "bench_cuda_kernels: no CUDA device visible; nothing to run\n");
    return 1;
  }
  cudaDeviceProp prop;
  CHECK_CUDA(cudaGetDeviceProperties(&prop, 0));
  benchmark::AddCustomContext("gpu", prop.name);
  benchmark::AddCustomContext("copy_GBps", std::to_string(device().copy_bw / 1e9));
  register_all(cfg);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
