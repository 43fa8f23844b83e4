// google-benchmark of the torch-free CPU kernels (csrc/kernels/*_cpu.h), rows split over
// all hardware threads with std::thread, next to a plain parallel memcpy of the same
// bytes so that the byte floor (design.md §5) is visible in the same run.
//
// Counters: bytes_per_second (the op's byte model), items_per_second (logit elements per
// pass over z), floor_frac = (bytes / copy bandwidth) / time, 1.0 meaning copy speed.
// The "Time" column is wall-clock time per call (manual timing); "CPU" is the main
// thread's CPU time only and is not meaningful with worker threads.
//
//   TIKE_CPU_ISA=avx2 bench_cpu_kernels   (the path to time; default: the best this CPU runs)
//   bench_cpu_kernels [--rows=256] [--vocab=32000,128256,151936] [--ks=1,4,16,64,256]
//                     [--dtypes=f32,bf16] [google-benchmark flags]
#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <exception>
#include <memory>
#include <thread>

#include "bench_common.h"
#include "kernels/cpu_isa.h"
#include "kernels/full_kl_cpu.h"
#include "kernels/token_logprobs_cpu.h"
#include "kernels/topk_kl_cpu.h"

namespace {
using namespace tike;
using namespace tike::bench;

int num_threads() {
  static const int n = std::max(1u, std::thread::hardware_concurrency());
  return n;
}

// fn(begin, end) over [0, N) in one contiguous chunk per thread. Threads are started per
// call: ~50 us, far below the milliseconds a call over >= 100 MB takes.
template <class F>
void parallel_rows(int64_t N, F&& fn) {
  int T = static_cast<int>(std::min<int64_t>(num_threads(), std::max<int64_t>(N, 1)));
  std::vector<std::thread> pool;
  pool.reserve(T - 1);
  for (int t = 1; t < T; ++t)
    pool.emplace_back([&, t] { fn(N * t / T, N * (t + 1) / T); });
  fn(0, N / T);
  for (auto& th : pool) th.join();
}

// Page-aligned buffer, first touched by the threads that will use it (no page faults
// inside the timed loop).
struct Buffer {
  std::unique_ptr<char, decltype(&std::free)> p{nullptr, &std::free};
  size_t bytes = 0;
  explicit Buffer(size_t b) : bytes(b) {
    p.reset(static_cast<char*>(std::aligned_alloc(4096, (b + 4095) / 4096 * 4096)));
    parallel_rows(static_cast<int64_t>(b >> 12) + 1, [&](int64_t r0, int64_t r1) {
      size_t a = std::min(b, static_cast<size_t>(r0) << 12);
      size_t e = std::min(b, static_cast<size_t>(r1) << 12);
      if (e > a) std::memset(p.get() + a, 0, e - a);
    });
  }
  void* get() const { return p.get(); }
};

void parallel_copy(void* dst, const void* src, size_t bytes) {
  parallel_rows(static_cast<int64_t>(bytes >> 16) + 1, [&](int64_t r0, int64_t r1) {
    size_t a = std::min(bytes, static_cast<size_t>(r0) << 16);
    size_t e = std::min(bytes, static_cast<size_t>(r1) << 16);
    if (e > a) std::memcpy(static_cast<char*>(dst) + a, static_cast<const char*>(src) + a, e - a);
  });
}

// Copy bandwidth (read + write bytes per second) of this machine, median of 7 copies of
// 512 MiB: the denominator of floor_frac.
double copy_bandwidth() {
  static const double bw = [] {
    const size_t bytes = size_t(512) << 20;
    Buffer a(bytes), b(bytes);
    std::vector<double> t;
    for (int i = 0; i < 8; ++i) {
      auto t0 = std::chrono::steady_clock::now();
      parallel_copy(b.get(), a.get(), bytes);
      auto t1 = std::chrono::steady_clock::now();
      if (i > 0) t.push_back(std::chrono::duration<double>(t1 - t0).count());
    }
    std::sort(t.begin(), t.end());
    return 2.0 * bytes / t[t.size() / 2];
  }();
  return bw;
}

// One [N, V] problem (z, zr, tokens, old log-probs), cached so that consecutive
// benchmarks of the same size do not regenerate 2 x N x V random numbers.
struct Problem {
  int64_t N, V;
  DType dtype;
  Buffer z, zr;
  std::vector<int64_t> tokens;
  std::vector<float> old_lp;
  Problem(int64_t n, int64_t v, DType d)
      : N(n), V(v), dtype(d), z(n * v * dtype_size(d)), zr(n * v * dtype_size(d)) {
    parallel_rows(N, [&](int64_t r0, int64_t r1) { fill_rows(z.get(), zr.get(), d, V, r0, r1); });
    Rng rng(7);
    for (int64_t n2 = 0; n2 < N; ++n2) {
      tokens.push_back(static_cast<int64_t>(rng.next() % static_cast<uint64_t>(V)));
      old_lp.push_back(-2.f - rng.uniform());
    }
  }
  size_t pass_bytes() const { return static_cast<size_t>(N * V) * dtype_size(dtype); }
};

const Problem& problem(int64_t N, int64_t V, DType d) {
  static std::unique_ptr<Problem> cached;
  if (!cached || cached->N != N || cached->V != V || cached->dtype != d) {
    cached.reset();  // free the old one first: at most one problem in memory
    cached = std::make_unique<Problem>(N, V, d);
  }
  return *cached;
}

// Times every iteration with a wall clock (the work runs on other threads, so the
// library's CPU time of the main thread means nothing) and sets the counters.
// floor_frac = byte-floor time / measured time: 1.0 is copy speed.
template <class F>
void run_timed(benchmark::State& s, Op op, const Problem& p, F&& body) {
  double total = 0;
  for (auto _ : s) {
    auto t0 = std::chrono::steady_clock::now();
    body();
    benchmark::ClobberMemory();
    auto t1 = std::chrono::steady_clock::now();
    double dt = std::chrono::duration<double>(t1 - t0).count();
    s.SetIterationTime(dt);
    total += dt;
  }
  const double bytes = static_cast<double>(passes(op)) * p.pass_bytes();
  s.SetBytesProcessed(static_cast<int64_t>(bytes) * s.iterations());
  s.SetItemsProcessed(p.N * p.V * s.iterations());
  if (total > 0) s.counters["floor_frac"] = bytes / copy_bandwidth() * s.iterations() / total;
  s.counters["threads"] = num_threads();
}

// The saved tensors of a topk_kl forward (what the backward consumes).
struct TopkOut {
  std::vector<float> out, lse, coef, shift, stats;
  std::vector<int32_t> idx;
  TopkOut(int64_t N, int64_t K1) : out(N), lse(2 * N), coef(N * K1), shift(N), stats(N * 3), idx(N * K1) {}
};

TopkKlForwardArgs topk_fwd_args(const Problem& p, int64_t k, TopkOut& o) {
  TopkKlForwardArgs a;
  a.logits = p.z.get();
  a.ref_logits = p.zr.get();
  a.logits_layout = a.ref_layout = RowLayout::contiguous(p.N, p.V);
  a.dtype = p.dtype;
  a.N = p.N, a.V = p.V, a.k = k, a.K1 = k + 1;  // sampled token united, as in RL training
  a.sampled_tokens = p.tokens.data();
  a.old_logprobs = p.old_lp.data();
  a.out = o.out.data(), a.lse = o.lse.data(), a.idx = o.idx.data();
  a.coef = o.coef.data(), a.shift = o.shift.data(), a.stats = o.stats.data();
  return a;
}

TopkKlBackwardArgs topk_bwd_args(const Problem& p, const TopkKlForwardArgs& f,
                                 const std::vector<float>& g, void* grad) {
  TopkKlBackwardArgs b;
  b.grad_out = g.data();
  b.logits = p.z.get();
  b.logits_layout = b.grad_layout = f.logits_layout;
  b.dtype = p.dtype;
  b.N = p.N, b.V = p.V, b.K1 = f.K1;
  b.lse = f.lse, b.idx = f.idx, b.coef = f.coef, b.shift = f.shift;
  b.grad = grad;
  return b;
}

void BM_copy(benchmark::State& s, int64_t N, int64_t V, DType d) {
  const Problem& p = problem(N, V, d);
  Buffer dst(p.pass_bytes());
  run_timed(s, Op::Copy, p, [&] { parallel_copy(dst.get(), p.z.get(), p.pass_bytes()); });
}

void BM_topk_kl(benchmark::State& s, Op op, int64_t N, int64_t V, int64_t k, DType d) {
  const Problem& p = problem(N, V, d);
  TopkOut o(N, k + 1);
  TopkKlForwardArgs f = topk_fwd_args(p, k, o);
  std::vector<float> g(N, 1.f);
  std::unique_ptr<Buffer> grad;
  TopkKlBackwardArgs b;
  if (op != Op::TopkFwd) {
    grad = std::make_unique<Buffer>(p.pass_bytes());
    parallel_rows(N, [&](int64_t r0, int64_t r1) { cpu::topk_kl_forward_rows(f, r0, r1); });
    b = topk_bwd_args(p, f, g, grad->get());
  }
  run_timed(s, op, p, [&] {
    if (op != Op::TopkBwd)
      parallel_rows(N, [&](int64_t r0, int64_t r1) { cpu::topk_kl_forward_rows(f, r0, r1); });
    if (op != Op::TopkFwd)
      parallel_rows(N, [&](int64_t r0, int64_t r1) { cpu::topk_kl_backward_rows(b, r0, r1); });
  });
}

void BM_full_kl(benchmark::State& s, Op op, int64_t N, int64_t V, DType d) {
  const Problem& p = problem(N, V, d);
  std::vector<float> out(N), lse_p(2 * N), lse_q(2 * N), g(N, 1.f);
  FullKlForwardArgs f;
  f.logits = p.z.get(), f.ref_logits = p.zr.get();
  f.logits_layout = f.ref_layout = RowLayout::contiguous(N, V);
  f.dtype = d, f.N = N, f.V = V;
  f.out = out.data(), f.lse_p = lse_p.data(), f.lse_q = lse_q.data();
  parallel_rows(N, [&](int64_t r0, int64_t r1) { cpu::full_kl_forward_rows(f, r0, r1); });
  std::unique_ptr<Buffer> grad;
  FullKlBackwardArgs b;
  if (op == Op::FullBwd) {
    grad = std::make_unique<Buffer>(p.pass_bytes());
    b.grad_out = g.data(), b.logits = f.logits, b.ref_logits = f.ref_logits;
    b.logits_layout = f.logits_layout, b.ref_layout = f.ref_layout;
    b.dtype = d, b.N = N, b.V = V;
    b.out = out.data(), b.lse_p = lse_p.data(), b.lse_q = lse_q.data();
    b.grad = grad->get();
  }
  run_timed(s, op, p, [&] {
    if (op == Op::FullFwd)
      parallel_rows(N, [&](int64_t r0, int64_t r1) { cpu::full_kl_forward_rows(f, r0, r1); });
    else
      parallel_rows(N, [&](int64_t r0, int64_t r1) { cpu::full_kl_backward_rows(b, r0, r1); });
  });
}

void BM_token_logprobs(benchmark::State& s, Op op, int64_t N, int64_t V, DType d) {
  const Problem& p = problem(N, V, d);
  std::vector<float> logp(N), lse(2 * N), g(N, 1.f);
  TokenLogprobsForwardArgs f;
  f.logits = p.z.get(), f.logits_layout = RowLayout::contiguous(N, V);
  f.dtype = d, f.N = N, f.V = V, f.tokens = p.tokens.data();
  f.logp = logp.data(), f.lse = lse.data();  // no entropy: the API's default
  parallel_rows(N, [&](int64_t r0, int64_t r1) { cpu::token_logprobs_forward_rows(f, r0, r1); });
  std::unique_ptr<Buffer> grad;
  TokenLogprobsBackwardArgs b;
  if (op == Op::TokenBwd) {
    grad = std::make_unique<Buffer>(p.pass_bytes());
    b.grad_logp = g.data(), b.logits = f.logits, b.logits_layout = f.logits_layout;
    b.dtype = d, b.N = N, b.V = V, b.tokens = f.tokens, b.lse = lse.data();
    b.grad = grad->get();
  }
  run_timed(s, op, p, [&] {
    if (op == Op::TokenFwd)
      parallel_rows(N, [&](int64_t r0, int64_t r1) { cpu::token_logprobs_forward_rows(f, r0, r1); });
    else
      parallel_rows(N, [&](int64_t r0, int64_t r1) { cpu::token_logprobs_backward_rows(b, r0, r1); });
  });
}

std::string tag(const char* name, DType d, int64_t N, int64_t V) {
  return std::string(name) + "/" + dtype_name(d) + "/N:" + std::to_string(N) + "/V:" +
         std::to_string(V);
}

// Ordered so that each (dtype, V) problem is generated once.
void register_all(const Config& c) {
  auto reg = [](const std::string& name, auto fn) {
    benchmark::RegisterBenchmark(name.c_str(), fn)->UseManualTime()->Unit(benchmark::kMillisecond);
  };
  for (DType d : c.dtypes)
    for (int64_t N : c.rows)
      for (int64_t V : c.vocab) {
        reg(tag("copy", d, N, V), [=](benchmark::State& s) { BM_copy(s, N, V, d); });
        // The k sweep at the largest vocabulary only; the default k elsewhere.
        std::vector<int64_t> ks{c.k_default};
        if (V == c.vocab.back()) ks = c.ks;
        for (int64_t k : ks) {
          if (k > V) continue;
          reg(tag("topk_kl_fwd", d, N, V) + "/k:" + std::to_string(k),
              [=](benchmark::State& s) { BM_topk_kl(s, Op::TopkFwd, N, V, k, d); });
        }
        std::string k16 = "/k:" + std::to_string(c.k_default);
        reg(tag("topk_kl_bwd", d, N, V) + k16,
            [=](benchmark::State& s) { BM_topk_kl(s, Op::TopkBwd, N, V, c.k_default, d); });
        reg(tag("topk_kl_fwdbwd", d, N, V) + k16,
            [=](benchmark::State& s) { BM_topk_kl(s, Op::TopkFwdBwd, N, V, c.k_default, d); });
        reg(tag("full_kl_fwd", d, N, V), [=](benchmark::State& s) { BM_full_kl(s, Op::FullFwd, N, V, d); });
        reg(tag("full_kl_bwd", d, N, V), [=](benchmark::State& s) { BM_full_kl(s, Op::FullBwd, N, V, d); });
        reg(tag("token_logprobs_fwd", d, N, V),
            [=](benchmark::State& s) { BM_token_logprobs(s, Op::TokenFwd, N, V, d); });
        reg(tag("token_logprobs_bwd", d, N, V),
            [=](benchmark::State& s) { BM_token_logprobs(s, Op::TokenBwd, N, V, d); });
      }
}

}  // namespace

int main(int argc, char** argv) {
  Config cfg;
  cfg.rows = {256};  // ~150 MB per fp32 operand at V = 151936: well past the caches
  cfg.parse(&argc, argv);
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::AddCustomContext("threads", std::to_string(num_threads()));
  // The instruction-set path of the kernels (TIKE_CPU_ISA=avx512|avx2|sse2|auto).
  try {
    benchmark::AddCustomContext("cpu_isa", cpu::isa_name(cpu::active_isa()));
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 2;
  }
  benchmark::AddCustomContext("copy_GBps", std::to_string(copy_bandwidth() / 1e9));
  register_all(cfg);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
