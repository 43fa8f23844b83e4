// CUDA kernels and launchers of the fixed-support ops (torch-free, header-only):
// sparse_reference and the forward of topk_kl_sparse (its backward is topk_kl's).
//
// Per row, one CTA, ONE streaming pass (stream_segment, 16-byte loads): the lazily
// referenced sum of 2^(x·c − E) (common.cuh: Ref) over all columns (the log-sum-exp) and,
// on a reference of its own, over the columns outside S~ only — the tail mass summed
// directly over its own terms, never 1 − head, and never underflowing against the row's
// max (LazyLseTail). Membership costs one register compare per vector: S~
// arrives sorted, and each thread walks it alongside its (increasing) columns. Then K1
// gathers: log q on S~ (sparse_reference), or the TIKE terms of tike_terms.h against the
// stored log q (topk_kl_sparse), in double.
//
// A row whose S~ holds an index outside [0, V) or an index twice, or whose sampled token
// is out of range, gives NaN (checking on the host would need a sync); nothing is read
// out of bounds. So does a row whose distribution is undefined (a NaN, a +inf logit, no
// finite logit), as in docs/kernels.md.
#pragma once
#include <climits>

#include "common.cuh"
#include "sparse_args.h"
#include "tike_terms.h"

namespace tike::cuda {
namespace sparse_detail {

// The first position in [lo, hi) of the ascending list s whose entry is >= v (hi if none).
__device__ __forceinline__ int lower_bound(const int32_t* s, int lo, int hi, int v) {
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (s[mid] < v) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// Which of the columns j .. j+n−1 (n <= 32) are in the ascending list s[0, len) or equal
// `extra`, for a thread whose calls come in increasing j (a smaller j restarts the walk).
// The common answer, none, costs one compare against the next member.
struct SupportCursor {
  const int32_t* s;
  int len, extra;
  int cur = 0, last = INT_MIN, nxt = INT_MAX;  // nxt = s[cur], or INT_MAX past the end

  __device__ __forceinline__ SupportCursor(const int32_t* list, int n, int extra_member)
      : s(list), len(n), extra(extra_member) {
    nxt = len > 0 ? s[0] : INT_MAX;
  }
  __device__ __forceinline__ void seek(int j) {  // first member >= j, from cur on
    cur = lower_bound(s, cur, len, j);
    nxt = cur < len ? s[cur] : INT_MAX;
  }
  __device__ __forceinline__ uint32_t flags(int j, int n) {
    if (j < last) {
      cur = 0;
      nxt = len > 0 ? s[0] : INT_MAX;
    }
    last = j;
    uint32_t f = uint32_t(extra - j) < uint32_t(n) ? 1u << (extra - j) : 0u;
    if (nxt < j) seek(j);
    if (nxt - j >= n) return f;
    for (int i = cur; i < len && s[i] - j < n; ++i) f |= 1u << (s[i] - j);
    return f;
  }
};

// Σ 2^(x_i·c − E) over a thread's columns (s), on one lazily moved reference (common.cuh:
// Ref, as LazyLse: it moves only when a chunk would pass 2^64); and the tail, Σ over the
// columns not flagged as members of S~, on a lazily moved reference of its OWN (E_t, the
// tail's max up to 2^64), so a tail far below the row's max (t ~ 1e-60 at a low τ, when
// S~ holds ~all the mass) keeps its digits instead of underflowing. A tail term is the
// row term times F = 2^(E − E_t) (no second exponential) where that is exact — every
// member-free term of the chunk at least 2^-100 relative to E, and F below 2^100 —, else
// its own exponential. −inf terms count 0; NaN propagates.
struct LazyLseTail {
  static constexpr float kTiny = -100.f;  // exponents below it may have lost digits
  Ref ref, rt;
  float s = 0.f, t = 0.f;
  float F = 0.f;  // 2^(E − E_t) when fast_tail
  bool fast_tail = false;

  template <int N>
  __device__ __forceinline__ void add(const float (&x)[N], uint32_t members, float c, bool tail) {
    float y[N], e[N], a = 0.f;
    ref.exponents(x, c, y);
#pragma unroll
    for (int i = 0; i < N; ++i) {
      e[i] = ex2(y[i]);
      a += e[i];
    }
    if (!(a <= kLazyLimit)) {
      add_slow(x, c);
      if (tail) tail_slow(x, members, c);
      return;
    }
    s += a;
    if (!tail) return;
    float b = 0.f;
    bool tiny = false;
#pragma unroll
    for (int i = 0; i < N; ++i) {
      const bool out = !((members >> i) & 1u);
      b += out ? e[i] : 0.f;
      tiny |= out && x[i] > -kInf && !(y[i] >= kTiny);  // NaN too
    }
    const float tb = b * F;
    if (fast_tail && !tiny && tb <= kLazyLimit) {
      t += tb;
    } else {
      tail_slow(x, members, c);
    }
  }
  template <int N>
  __device__ __forceinline__ void add_slow(const float (&x)[N], float c) {
    float mx = ref.R;
#pragma unroll
    for (int i = 0; i < N; ++i) mx = fmaxf(mx, x[i]);
    move_to(Ref::at(mx, c), c);
    float a = 0.f;
#pragma unroll
    for (int i = 0; i < N; ++i) a += x[i] == -kInf ? 0.f : ex2(ref.exponent(x[i], c));
    s += a;
  }
  // The chunk's tail terms each from its own exponential, the tail reference first
  // raised to their max (where higher).
  template <int N>
  __device__ __forceinline__ void tail_slow(const float (&x)[N], uint32_t members, float c) {
    float mx = rt.R;
#pragma unroll
    for (int i = 0; i < N; ++i) mx = ((members >> i) & 1u) ? mx : fmaxf(mx, x[i]);
    move_tail_to(Ref::at(mx, c), c);
    float b = 0.f;
#pragma unroll
    for (int i = 0; i < N; ++i)
      b += ((members >> i) & 1u) || x[i] == -kInf ? 0.f : ex2(rt.exponent(x[i], c));
    t += b;
  }
  __device__ __forceinline__ void update_factor(float c) {
    const double d = rt.R > -kInf ? ref_shift(rt, ref, c) : double(kInf);  // E − E_t
    fast_tail = d <= 100.0 && d >= -100.0;  // false for NaN
    F = fast_tail ? float(exp2(d)) : 0.f;
  }
  __device__ __forceinline__ void move_to(const Ref& to, float c) {
    if (to.R > ref.R) {
      if (s != 0.f) s *= ref_factor(ref, to, c);
      ref = to;
      update_factor(c);
    }
  }
  __device__ __forceinline__ void move_tail_to(const Ref& to, float c) {
    if (to.R > rt.R) {
      if (t != 0.f) t *= ref_factor(rt, to, c);
      rt = to;
      update_factor(c);
    }
  }
};

// The row's log-sum-exp as a reference (Ref) and log2 S, so that log p_v =
// ln2·((x_v·c − E) − log2 S), formed in double from x_v − R, keeps its digits however large
// x/τ is (never x/τ − lse, two huge numbers cancelling); and the log of the tail mass.
struct RowPass {
  Ref ref;
  float c;
  double l2s;       // log2 Σ_v 2^(x_v·c − E)
  double log_tail;  // log Σ_{v∉S~} p_v, from the tail terms (−inf when there are none)
  bool defined;     // false: a NaN, a +inf or no finite logit in the row (p undefined)

  __device__ __forceinline__ double log_prob(float x) const {
    return kLn2 * (ref.exponent_d(x, c) - l2s);
  }
  // ℓ of the saved pair (M, ℓ) = (R, ℓ): log Σ exp((x − R)/τ) = ln2·(log2 S − r).
  __device__ __forceinline__ double log_sum() const { return kLn2 * (l2s - double(ref.r)); }
};

// One pass over the row: the log-sum-exp of x/τ and (with `tail`) the tail mass of the
// columns the cursor does not flag. All kThreads threads take part; every thread gets the
// result.
template <typename T>
__device__ __forceinline__ RowPass scan_row(const T* row, int V, float c, SupportCursor& cur,
                                            bool tail, float* fs) {
  constexpr int N = Vec<T>::N;
  LazyLseTail acc;
  stream_segment<T, false, 4>(row, row, 0, V,
                              [&](const float (&x)[N], const float (&)[N], int j) {
                                acc.add(x, tail ? cur.flags(j, N) : 0u, c, tail);
                              });
  const Ref ref = Ref::at(block_max(acc.ref.R, fs), c);
  acc.move_to(ref, c);
  const float s = block_sum(acc.s, fs);
  RowPass r;
  r.ref = ref;
  r.c = c;
  r.l2s = log2(double(s));
  r.log_tail = 0.0;
  if (tail) {
    const Ref rt = Ref::at(block_max(acc.rt.R, fs), c);
    acc.move_tail_to(rt, c);
    const float t = block_sum(acc.t, fs);
    // log(Σ 2^(x·c − E_t) · 2^(E_t − E) / S), E_t − E from the references, in double
    r.log_tail = t == 0.f ? -kInfD
                          : kLn2 * (log2(double(t)) - r.l2s + ref_shift(ref, rt, c));
  }
  // s > 0 and finite: a NaN propagates into s, a +inf logit makes it inf − inf = NaN, a
  // row of −inf leaves it 0.
  r.defined = s > 0.f && s < kInf;
  return r;
}

// Whether the ascending row srt[0, n) holds an index outside [0, V) or one twice (with
// allow_empty, −1 entries are empty slots). Block-wide; every thread gets the answer.
__device__ __forceinline__ bool support_invalid(const int32_t* srt, int n, int V,
                                                bool allow_empty, float* fs) {
  bool bad = false;
  for (int i = threadIdx.x; i < n; i += kThreads) {
    const int v = srt[i];
    if (v == -1 && allow_empty) continue;
    bad |= v < 0 || v >= V || (i > 0 && srt[i - 1] == v);
  }
  return block_any(bad, fs);
}

__device__ __forceinline__ bool sorted_contains(const int32_t* s, int n, int v) {
  const int i = lower_bound(s, 0, n, v);
  return i < n && s[i] == v;
}

// The sampled token of row n: its column, −1 without sampled tokens; `bad` when out of range.
__device__ __forceinline__ int sampled_column(const int64_t* tokens, int64_t n, int V, bool& bad) {
  if (tokens == nullptr) return -1;
  const int64_t t = tokens[n];
  if (t >= 0 && t < V) return int(t);
  bad = true;
  return -1;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) reference_kernel(const SparseReferenceArgs a) {
  __shared__ float fs[kWarps];
  const int64_t n = blockIdx.x;
  const int tid = threadIdx.x, k = int(a.k), K1 = int(a.K1), V = int(a.V);
  int32_t* idx = a.idx + n * K1;
  float* lq = a.logprobs + n * K1;
  if (a.mask && !a.mask[n]) {  // never read: an empty S~, all the mass in the tail
    for (int s = tid; s < K1; s += kThreads) {
      idx[s] = -1;
      lq[s] = -kInf;
    }
    if (tid == 0) a.tail_logmass[n] = 0.f;
    return;
  }
  const int32_t* sup = a.support + n * k;
  const int32_t* srt = a.sorted + n * k;
  bool bad_o = false;
  const int o = sampled_column(a.sampled_tokens, n, V, bad_o);
  const bool bad = support_invalid(srt, k, V, false, fs) || bad_o;  // uniform
  const bool o_extra = K1 > k && o >= 0 && !bad && !sorted_contains(srt, k, o);
  for (int s = tid; s < k; s += kThreads) idx[s] = sup[s];
  if (K1 > k && tid == 0) idx[k] = o_extra ? o : -1;
  const float nan = __int_as_float(0x7fc00000);
  if (bad) {
    for (int s = tid; s < K1; s += kThreads) lq[s] = nan;
    if (tid == 0) a.tail_logmass[n] = nan;
    return;
  }
  const T* qrow = row_base<T>(a.ref_logits, a.ref_layout, n);
  SupportCursor cur(srt, k, o_extra ? o : -1);
  const RowPass q = scan_row(qrow, V, kLog2e / a.temperature, cur, true, fs);
  for (int s = tid; s < K1; s += kThreads) {
    const int j = s < k ? sup[s] : (o_extra ? o : -1);
    lq[s] = !q.defined ? nan : j < 0 ? -kInf : float(q.log_prob(load1(qrow + j)));
  }
  if (tid == 0) a.tail_logmass[n] = q.defined ? float(q.log_tail) : nan;
}

__device__ __forceinline__ void write_policy_row(const TopkKlSparseArgs& a, int64_t n, float v) {
  for (int s = threadIdx.x; s < a.K1; s += kThreads) a.coef[n * a.K1 + s] = v;
  if (threadIdx.x == 0) {
    a.out[n] = a.lse[2 * n] = a.lse[2 * n + 1] = a.shift[n] = v;
    a.stats[n * 3] = a.stats[n * 3 + 1] = a.stats[n * 3 + 2] = v;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) policy_kernel(const TopkKlSparseArgs a) {
  __shared__ float fs[kWarps];
  __shared__ double ds[kWarps];
  const int64_t n = blockIdx.x;
  const int tid = threadIdx.x, K1 = int(a.K1), V = int(a.V);
  if (a.mask && !a.mask[n]) {  // masked rows are never read
    write_policy_row(a, n, 0.f);
    return;
  }
  const int32_t* idx = a.idx + n * K1;
  const float* lq = a.ref_logprobs + n * K1;
  bool bad_o = false;
  const int o = sampled_column(a.sampled_tokens, n, V, bad_o);
  if (support_invalid(a.sorted + n * K1, K1, V, true, fs) || bad_o) {
    write_policy_row(a, n, __int_as_float(0x7fc00000));
    return;
  }
  const T* zrow = row_base<T>(a.logits, a.logits_layout, n);
  SupportCursor cur(a.sorted + n * K1, K1, -1);
  const RowPass p = scan_row(zrow, V, kLog2e / a.temperature, cur, a.tail_bucket, fs);
  if (!p.defined) {  // uniform: every thread has the same p
    write_policy_row(a, n, __int_as_float(0x7fc00000));
    return;
  }
  const double inv_tau = double(1.f / a.temperature);

  double lp_o = 0.0, ratio = 1.0;
  if (o >= 0) lp_o = p.log_prob(load1(zrow + o));
  if (a.old_logprobs) ratio = exp(lp_o - double(a.old_logprobs[n]));
  TikeHead h;
  for (int s = tid; s < K1; s += kThreads) {
    if (idx[s] >= 0) h.add(p.log_prob(load1(zrow + idx[s])), double(lq[s]));
  }
  h.D = block_sum(h.D, ds);
  h.C = block_sum(h.C, ds);
  h.m_p = block_sum(h.m_p, ds);
  h.m_q = block_sum(h.m_q, ds);
  const TikeTail t =
      a.tail_bucket ? tike_tail(p.log_tail, double(a.ref_tail_logmass[n])) : TikeTail{};
  const double scale = ratio * inv_tau;
  for (int s = tid; s < K1; s += kThreads) {
    const int j = idx[s];
    a.coef[n * K1 + s] =
        j < 0 ? 0.f : tike_coef(p.log_prob(load1(zrow + j)), double(lq[s]), scale, t.b);
  }
  if (tid == 0) {
    a.out[n] = float(ratio * (h.D + t.T));
    // the pair (M, ℓ) of docs/kernels.md
    a.lse[2 * n] = p.ref.R;
    a.lse[2 * n + 1] = float(p.log_sum());
    a.shift[n] = float(scale * (h.C - h.m_p * t.b));
    a.stats[n * 3] = float(h.m_p);
    a.stats[n * 3 + 1] = float(lp_o);
    a.stats[n * 3 + 2] = float(h.m_q);
  }
}

inline bool sizes_ok(int64_t N, int64_t V, int64_t K1, float temperature) {
  return temperature > 0.f && V >= 1 && V < (int64_t(1) << 30) && N < int64_t(INT_MAX) &&
         K1 >= 1 && K1 < (int64_t(1) << 30);
}

// launch(T{}) with T the element type of `dt`, then the launch status.
template <typename F>
inline cudaError_t launch_for(DType dt, F&& launch) {
  switch (dt) {
    case DType::Float32: launch(float{}); break;
    case DType::BFloat16: launch(__nv_bfloat16{}); break;
    case DType::Float16: launch(__half{}); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace sparse_detail

// ---------------------------------------------------------------------- launchers

inline cudaError_t sparse_reference(const SparseReferenceArgs& a, cudaStream_t stream) {
  if (a.N == 0) return cudaSuccess;
  if (!sparse_detail::sizes_ok(a.N, a.V, a.K1, a.temperature) || a.k < 1 || a.k > a.V ||
      a.K1 < a.k || a.K1 > a.k + 1)
    return cudaErrorInvalidValue;
  return sparse_detail::launch_for(a.dtype, [&](auto t) {
    TIKE_LAUNCH(sparse_detail::reference_kernel<decltype(t)>, unsigned(a.N), kThreads, 0, stream, a);
  });
}

// Forward of topk_kl_sparse; the backward is topk_kl_backward with the same idx.
inline cudaError_t topk_kl_sparse_forward(const TopkKlSparseArgs& a, cudaStream_t stream) {
  if (a.N == 0) return cudaSuccess;
  if (!sparse_detail::sizes_ok(a.N, a.V, a.K1, a.temperature)) return cudaErrorInvalidValue;
  return sparse_detail::launch_for(a.dtype, [&](auto t) {
    TIKE_LAUNCH(sparse_detail::policy_kernel<decltype(t)>, unsigned(a.N), kThreads, 0, stream, a);
  });
}

}  // namespace tike::cuda
