// CUDA kernels and launchers of topk_kl (torch-free, header-only). See docs/kernels.md.
//
// Forward, per row: ONE streaming pass reads z and zr together (16-byte vectors) and keeps
//   * the warp-level top-k of z (topk_select.cuh) with its running threshold;
//   * the tail sums of p and q over the elements that are not (or no longer) candidates;
// then the warps' lists are merged, and the head terms, the log-sum-exps, the K1 terms
// and the outputs are computed from the final list (in double: ≤ k+1 terms per row).
// Because the candidates carry their zr value, no gather of the reference row is needed,
// and the tail bucket costs nothing extra. Rows are split over several CTAs when there
// are few rows (each CTA writes its partial list and tail sums; a combine kernel merges).
//
// k above kTopkSelectMaxK: the caller puts S (sorted, ties to the lower index) in
// idx[:, :k] first; the pass then tests membership against S's k-th key instead.
//
// topk_kl_shard (the local pass of tike_cuda.distributed) runs the same kernels and, at the
// end of the row, writes S~ with its logits, the pairs and the tail masses instead of the KL.
//
// Backward, per row: one pass over z writing g·p_j·(−shift), then the K1 entries of S~
// patched with g·p_j·(coef − shift). The S~ entries' values are computed from z before the
// dense pass, so grad may alias logits (in-place backward).
#pragma once
#include <climits>

#include "topk_kl_args.h"
#include "topk_select.cuh"

namespace tike::cuda {

struct TopkKlForwardPlan {
  int splits = 1, seg = 0;  // CTAs per row and columns per CTA
  int kp = 1, cap = 64;     // next_pow2(k); warp buffer entries
  bool preselected = false;  // k > kTopkSelectMaxK: idx[:, :k] must hold S on entry
  size_t workspace_bytes = 0;
};

namespace topk_detail {

constexpr int kHdr = 8;  // floats per partial header: R_p, s_p, R_q, s_q, nan

struct FwdParams {
  TopkKlForwardArgs a;
  int splits, seg, kp, cap, groups;
  bool preselected;
  float c;        // log2(e)/τ
  float inv_tau;  // 1/τ (as the CPU kernels round it)
  uint64_t* ws_key;
  float* ws_val;
  float* ws_hdr;
};

// Tail sums of one row (or segment): s_p = Σ 2^(z·c − E) over v ∉ S~ relative to
// Ref::at(R_p, c) (common.cuh), s_q likewise for zr.
struct TailSums {
  float R_p, s_p, R_q, s_q;
  bool nan;
};

__device__ __forceinline__ void write_masked_row(const TopkKlForwardArgs& a, int64_t n) {
  const int64_t K1 = a.K1;
  for (int64_t s = threadIdx.x; s < K1; s += kThreads) {
    a.idx[n * K1 + s] = -1;
    a.coef[n * K1 + s] = 0.f;
  }
  if (threadIdx.x == 0) {
    a.out[n] = a.lse[2 * n] = a.lse[2 * n + 1] = a.shift[n] = 0.f;
    a.stats[n * 3] = a.stats[n * 3 + 1] = a.stats[n * 3 + 2] = 0.f;
  }
  if (a.shard_values) {  // topk_kl_shard: S~ empty, pairs and tails 0
    for (int64_t s = threadIdx.x; s < 2 * K1; s += kThreads)
      a.shard_values[n * K1 * 2 + s] = -kInf;
    if (threadIdx.x < 2)
      a.shard_lse_q[2 * n + threadIdx.x] = a.shard_tails[2 * n + threadIdx.x] = 0.f;
  }
}

// topk_kl_shard's outputs of row n (docs/kernels.md): S~ with its logits, both pairs
// (M, ℓ) from the maxima mp, mq and the base-2 sums Sp, Sq relative to them (a row without
// a finite logit holds no mass: (−inf, −inf)), and the logs of the tail masses outside S~
// on this shard. `bad` (a NaN or +inf in either row, a token outside [−1, V)) makes the
// pairs and the tails NaN.
template <typename T, typename Get>
__device__ __forceinline__ void write_shard_row(const TopkKlForwardArgs& a, int64_t n,
                                                const T* zrow, int k, int K1, bool o_extra,
                                                bool write_idx, Get&& get, bool bad, float mp,
                                                double Sp, float mq, double Sq, double tp_raw,
                                                double tq_raw) {
  int32_t* idx = a.idx + n * K1;
  float* v = a.shard_values + n * K1 * 2;
  for (int s = threadIdx.x; s < K1; s += kThreads) {
    if (s >= k && !o_extra) {
      idx[s] = -1;
      v[2 * s] = v[2 * s + 1] = -kInf;
      continue;
    }
    float z, zr;
    int j;
    get(s, z, zr, j);
    if (write_idx || s >= k) idx[s] = j;
    v[2 * s] = bad ? load1(zrow + j) : z;  // the selection keys hold a NaN as −inf
    v[2 * s + 1] = zr;
  }
  if (threadIdx.x != 0) return;
  bad = bad || Sp != Sp || Sq != Sq || Sp == kInfD || Sq == kInfD;
  auto log_tail = [&](double t, double S) {
    return bad ? NAN : t > 0.0 ? float(log(t / S)) : -kInf;
  };
  a.lse[2 * n] = bad ? NAN : mp;
  a.lse[2 * n + 1] = bad ? NAN : float(kLn2 * log2(Sp));
  a.shard_lse_q[2 * n] = bad ? NAN : mq;
  a.shard_lse_q[2 * n + 1] = bad ? NAN : float(kLn2 * log2(Sq));
  a.shard_tails[2 * n] = a.tail_bucket ? log_tail(tp_raw, Sp) : 0.f;
  a.shard_tails[2 * n + 1] = a.tail_bucket ? log_tail(tq_raw, Sq) : 0.f;
}

// From the final S (entry(s, z, zr, j) for s < k, best first) and the tail sums: the
// log-sum-exps, the K1 terms and every output of row n. All kThreads threads take part.
template <typename T, typename Entry>
__device__ __forceinline__ void finalize_row(const FwdParams& P, int64_t n, const T* zrow,
                                             const T* qrow, const TailSums& ts, Entry&& entry,
                                             bool write_idx, float* fs, double* ds) {
  const TopkKlForwardArgs& a = P.a;
  const int k = int(a.k), K1 = int(a.K1), tid = threadIdx.x;
  const float c = P.c;
  bool bad = ts.nan;
  int o = -1;
  if (a.sampled_tokens) {
    const int64_t t = a.sampled_tokens[n];
    if (t >= 0 && t < a.V) {
      o = int(t);
    } else if (!(a.shard_values && t == -1)) {  // topk_kl_shard: −1 is on another shard
      bad = true;  // a token out of range poisons its row instead of reading out of bounds
    }
  }
  float zo = 0.f, zro = 0.f;
  if (o >= 0) {
    zo = load1(zrow + o);
    zro = load1(qrow + o);
  }
  float zk, zrk;
  int jk;
  entry(k - 1, zk, zrk, jk);
  const bool o_in_S = o >= 0 && make_key(zo, o) >= make_key(zk, jk);
  const bool o_extra = K1 > k && o >= 0 && !o_in_S;  // o joins S~ as entry k
  const int nent = k + (o_extra ? 1 : 0);
  auto get = [&](int s, float& z, float& zr, int& j) {
    if (s < k) {
      entry(s, z, zr, j);
    } else {
      z = zo;
      zr = zro;
      j = o;
    }
  };

  // The row maxima (every tail element is below its reference, itself at most the head's
  // k-th value), then the head terms relative to them, in double, from z − max: exact
  // however large z/τ is (τ = 1e-30, |z| near the float limit).
  float mp = ts.R_p, mq = ts.R_q;
  for (int s = tid; s < nent; s += kThreads) {
    float z, zr;
    int j;
    get(s, z, zr, j);
    mp = fmaxf(mp, z);
    mq = fmaxf(mq, zr);
  }
  mp = block_max(mp, fs);
  mq = block_max(mq, fs);
  const double dmp = double(mp), dmq = double(mq), dc = double(c);
  double hp = 0.0, hq = 0.0;
  for (int s = tid; s < nent; s += kThreads) {
    float z, zr;
    int j;
    get(s, z, zr, j);
    hp += z == -kInf ? 0.0 : exp2((double(z) - dmp) * dc);
    hq += zr == -kInf ? 0.0 : exp2((double(zr) - dmq) * dc);
  }
  hp = block_sum(hp, ds);
  hq = block_sum(hq, ds);
  // the tails, from their references E = R·c − r to the maxima
  auto from_tail = [&](float sum, float R, double dm) {
    return sum != 0.f ? double(sum) * exp2((double(R) - dm) * dc - double(Ref::at(R, c).r)) : 0.0;
  };
  const double tp_raw = from_tail(ts.s_p, ts.R_p, dmp), tq_raw = from_tail(ts.s_q, ts.R_q, dmq);
  double Sp = tp_raw + hp;
  const double Sq = tq_raw + hq;
  if (a.shard_values) {  // topk_kl_shard: the local pass only, without the KL
    write_shard_row(a, n, zrow, k, K1, o_extra, write_idx, get, bad, mp, Sp, mq, Sq, tp_raw,
                    tq_raw);
    return;
  }
  // A NaN anywhere in either row, a +inf logit (inf − inf) or a row without a finite
  // logit (Sp = 0: lse_p = −inf) leaves p or q undefined: every output of the row is NaN
  // (out, coef, shift, so the whole gradient row is NaN), as in the reference.
  bad = bad || !(Sp > 0.0) || !(Sq > 0.0) || Sp == kInfD || Sq == kInfD;
  if (bad) Sp = double(NAN);
  // log p_v = (z_v − M)/τ − ℓ (base 2 inside), never z·(1/τ) − lse_p (two huge numbers
  // cancelling).
  const double l2sp = log2(Sp), l2sq = log2(Sq);
  auto log_p = [&](float z) { return kLn2 * ((double(z) - dmp) * dc - l2sp); };
  auto log_q = [&](float zr) { return kLn2 * ((double(zr) - dmq) * dc - l2sq); };

  double D = 0.0, C = 0.0, m_p = 0.0, m_q = 0.0;
  for (int s = tid; s < nent; s += kThreads) {
    float z, zr;
    int j;
    get(s, z, zr, j);
    const double lp = log_p(z), lq = log_q(zr);
    const double p = exp(lp), q = exp(lq);
    m_p += p;
    m_q += q;
    if (p != 0.0) {  // 0 · log 0 counts as 0
      D += p * (lp - lq);
      C += p * (lp - lq + 1.0);
    }
  }
  D = block_sum(D, ds);
  C = block_sum(C, ds);
  m_p = block_sum(m_p, ds);
  m_q = block_sum(m_q, ds);

  double lp_o = 0.0, r = 1.0;
  if (a.sampled_tokens) lp_o = o >= 0 ? log_p(zo) : double(NAN);
  if (a.old_logprobs) r = exp(lp_o - double(a.old_logprobs[n]));
  double Tb = 0.0, b = 0.0;  // tail bucket term and its gradient factor
  if (a.tail_bucket) {
    const double tp = fmax(tp_raw / Sp, 0.0), tq = fmax(tq_raw / Sq, 0.0);
    if (tp > 0.0) {
      const double lr = log(tp) - log(tq);
      Tb = tp * lr;
      b = lr + 1.0;
    }
    if (Sp != Sp) Tb = Sp;
  }
  const double scale = r * double(P.inv_tau);

  int32_t* idx = a.idx + n * K1;
  float* coef = a.coef + n * K1;
  for (int s = tid; s < K1; s += kThreads) {
    if (s >= k && !o_extra) {
      idx[s] = -1;
      coef[s] = 0.f;
      continue;
    }
    float z, zr;
    int j;
    get(s, z, zr, j);
    if (write_idx || s >= k) idx[s] = j;
    const double lp = log_p(z), lq = log_q(zr);
    coef[s] = bad ? NAN : exp(lp) > 0.0 ? float(scale * (lp - lq + 1.0 - b)) : 0.f;
  }
  if (tid == 0) {
    a.out[n] = bad ? NAN : float(r * (D + Tb));
    // The saved pair (M, ℓ) of docs/kernels.md, lse_p = M/τ + ℓ: M = max z (as the CPU
    // op's), ℓ = log Σ exp((z − M)/τ).
    a.lse[2 * n] = mp;
    a.lse[2 * n + 1] = float(kLn2 * l2sp);
    a.shift[n] = bad ? NAN : float(scale * (C - m_p * b));
    a.stats[n * 3] = float(m_p);
    a.stats[n * 3 + 1] = float(lp_o);
    a.stats[n * 3 + 2] = float(m_q);
  }
}

// 3 CTAs (24 warps) per SM keep enough 16-byte loads in flight for 16-bit rows (80
// registers, 8 bytes of spill outside the hot loop's loads); fp32 rows hold twice the
// registers per column pair and get 2 CTAs (checked with --resource-usage).
template <typename T>
__global__ void __launch_bounds__(kThreads, sizeof(T) == 4 ? 2 : 3) fwd_kernel(const FwdParams P) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ float fs[kWarps];
  __shared__ double ds[kWarps];
  const TopkKlForwardArgs& a = P.a;
  const int64_t n = int64_t(blockIdx.x) / P.splits;
  const int part = int(int64_t(blockIdx.x) % P.splits);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, tid = threadIdx.x;
  if (a.mask && !a.mask[n]) {  // masked rows are never read
    if (P.splits == 1) write_masked_row(a, n);
    return;
  }
  const T* zrow = row_base<T>(a.logits, a.logits_layout, n);
  const T* qrow = row_base<T>(a.ref_logits, a.ref_layout, n);
  const int V = int(a.V), k = int(a.k), K1 = int(a.K1);
  const int b = part * P.seg, e = min(V, b + P.seg);
  const float c = P.c;

  TopkStream st;
  st.c = c;
  st.k = k;
  st.cap = P.cap;
  if (a.sampled_tokens && K1 > k) {
    const int64_t t = a.sampled_tokens[n];
    if (t >= 0 && t < V) st.excl = int(t);
  }
  uint64_t* keys = reinterpret_cast<uint64_t*>(smem_raw);
  float* vals = reinterpret_cast<float*>(keys + kWarps * P.cap);
  if (P.preselected) {
    st.fixed = true;
    const int jk = a.idx[n * K1 + k - 1];
    const uint64_t kk = make_key(load1(zrow + jk), jk);
    st.thr_key = kk - 1;  // members: key >= the k-th key
    st.thr_val = key_value(kk);
    st.thr_ref = Ref::at(st.thr_val, c);
  } else {
    st.key = keys + warp * P.cap;
    st.val = vals + warp * P.cap;
  }

  // ---- the streaming pass
  stream_topk<T, true>(st, zrow, qrow, b, e, lane, warp);
  st.finish(lane);
  __syncthreads();

  // ---- S known in advance: one reference for all lanes' p tails
  if (P.preselected) {
    const float sp = block_sum(st.sp, fs);
    const float mq = block_max(st.q.ref.R, fs);
    const float sq = block_sum(st.q.scaled(Ref::at(mq, c), c), fs);
    const bool nan = block_any(st.nan, fs);
    const TailSums ts{st.thr_val, sp, mq, sq, nan};
    const int32_t* idx = a.idx + n * K1;
    finalize_row<T>(
        P, n, zrow, qrow, ts,
        [&](int s, float& z, float& zr, int& j) {
          j = idx[s];
          z = load1(zrow + j);
          zr = load1(qrow + j);
        },
        false, fs, ds);
    return;
  }

  // ---- merge the warps' lists; evicted entries join the tails
  const int KP = P.kp, cap = P.cap;
  float mp = -kInf;
  for (int w = 0; w < kWarps; ++w) {
    const uint64_t kk = keys[w * cap];
    if (kk != 0) mp = fmaxf(mp, key_value(kk));
  }
  // every element of the segment is <= the best of the warps' lists
  float mq = st.q.ref.R;
  for (int t = tid; t < kWarps * KP; t += kThreads) {
    const int w = t / KP, i = t % KP;
    if (keys[w * cap + i] != 0) mq = fmaxf(mq, vals[w * cap + i]);
  }
  mq = block_max(mq, fs);
  const Ref rp = Ref::at(mp, c), rq = Ref::at(mq, c);
  float ep = st.sp != 0.f ? st.sp * ref_factor(st.thr_ref, rp, c) : 0.f;
  float eq = st.q.scaled(rq, c);
  const int excl = st.excl;
  auto evict = [&](uint64_t kk, float zrv) {
    if (key_index(kk) == excl) return;
    const float zv = key_value(kk);
    ep += zv == -kInf ? 0.f : ex2(rp.exponent(zv, c));
    eq += zrv == -kInf ? 0.f : ex2(rq.exponent(zrv, c));
  };
  block_merge_groups(keys, vals, cap, kWarps, KP, evict);
  for (int i = k + tid; i < KP; i += kThreads) {
    if (keys[i] != 0) evict(keys[i], vals[i]);
    keys[i] = 0;
  }
  const bool nan = block_any(st.nan, fs);  // (its barrier also publishes the zeroing)
  const TailSums ts{mp, block_sum(ep, fs), mq, block_sum(eq, fs), nan};

  if (P.splits == 1) {
    finalize_row<T>(
        P, n, zrow, qrow, ts,
        [&](int s, float& z, float& zr, int& j) {
          const uint64_t kk = keys[s];
          z = key_value(kk);
          zr = vals[s];
          j = key_index(kk);
        },
        true, fs, ds);
    return;
  }
  // ---- several CTAs per row: hand the partial to the combine kernel
  const int64_t slot = n * P.splits + part;
  for (int i = tid; i < KP; i += kThreads) {
    P.ws_key[slot * KP + i] = keys[i];
    P.ws_val[slot * KP + i] = vals[i];
  }
  if (tid == 0) {
    float* h = P.ws_hdr + slot * kHdr;
    h[0] = ts.R_p;
    h[1] = ts.s_p;
    h[2] = ts.R_q;
    h[3] = ts.s_q;
    h[4] = ts.nan ? 1.f : 0.f;
  }
}

// One CTA per row: merges the splits' lists and tail sums, then finalizes the row.
template <typename T>
__global__ void __launch_bounds__(kThreads) combine_kernel(const FwdParams P) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ float fs[kWarps];
  __shared__ double ds[kWarps];
  const TopkKlForwardArgs& a = P.a;
  const int64_t n = blockIdx.x;
  const int tid = threadIdx.x, k = int(a.k), KP = P.kp, G = P.groups, S = P.splits;
  if (a.mask && !a.mask[n]) {
    write_masked_row(a, n);
    return;
  }
  const T* zrow = row_base<T>(a.logits, a.logits_layout, n);
  const T* qrow = row_base<T>(a.ref_logits, a.ref_layout, n);
  uint64_t* keys = reinterpret_cast<uint64_t*>(smem_raw);
  float* vals = reinterpret_cast<float*>(keys + G * KP);
  const float* hdr = P.ws_hdr + n * S * kHdr;
  float mp = -kInf, mq = -kInf;
  bool nan = false;
  for (int s = 0; s < S; ++s) {
    mp = fmaxf(mp, hdr[s * kHdr]);
    mq = fmaxf(mq, hdr[s * kHdr + 2]);
    nan |= hdr[s * kHdr + 4] != 0.f;
  }
  for (int t = tid; t < G * KP; t += kThreads) {
    const int g = t / KP;
    keys[t] = g < S ? P.ws_key[(n * S + g) * KP + t % KP] : 0;
    vals[t] = g < S ? P.ws_val[(n * S + g) * KP + t % KP] : 0.f;
  }
  __syncthreads();
  int excl = -1;
  if (a.sampled_tokens && a.K1 > a.k) {
    const int64_t t = a.sampled_tokens[n];
    if (t >= 0 && t < a.V) excl = int(t);
  }
  const float c = P.c;
  const Ref rp = Ref::at(mp, c), rq = Ref::at(mq, c);
  float ep = 0.f, eq = 0.f;
  auto evict = [&](uint64_t kk, float zrv) {
    if (key_index(kk) == excl) return;
    const float zv = key_value(kk);
    ep += zv == -kInf ? 0.f : ex2(rp.exponent(zv, c));
    eq += zrv == -kInf ? 0.f : ex2(rq.exponent(zrv, c));
  };
  block_merge_groups(keys, vals, KP, G, KP, evict);
  for (int i = k + tid; i < KP; i += kThreads) {
    if (keys[i] != 0) evict(keys[i], vals[i]);
    keys[i] = 0;
  }
  float sp = block_sum(ep, fs), sq = block_sum(eq, fs);
  for (int s = 0; s < S; ++s) {  // same order in every thread
    const float* h = hdr + s * kHdr;
    sp += h[1] != 0.f ? h[1] * ref_factor(Ref::at(h[0], c), rp, c) : 0.f;
    sq += h[3] != 0.f ? h[3] * ref_factor(Ref::at(h[2], c), rq, c) : 0.f;
  }
  const TailSums ts{mp, sp, mq, sq, nan};
  finalize_row<T>(
      P, n, zrow, qrow, ts,
      [&](int s, float& z, float& zr, int& j) {
        const uint64_t kk = keys[s];
        z = key_value(kk);
        zr = vals[s];
        j = key_index(kk);
      },
      true, fs, ds);
}

// ------------------------------------------------------------------ backward

struct BwdParams {
  TopkKlBackwardArgs a;
  int splits, seg;
  float c;           // log2(e)/τ
  bool patch_smem;   // S~ values staged in shared memory (else in ws_patch, [N, K1])
  float* ws_patch;
};

template <typename T>
__global__ void __launch_bounds__(kThreads) bwd_kernel(const BwdParams P) {
  extern __shared__ __align__(16) float patch_smem[];
  const TopkKlBackwardArgs& a = P.a;
  const int64_t n = int64_t(blockIdx.x) / P.splits;
  const int part = int(int64_t(blockIdx.x) % P.splits);
  const int tid = threadIdx.x, V = int(a.V), K1 = int(a.K1);
  const int b = part * P.seg, e = min(V, b + P.seg);
  T* grow = static_cast<T*>(a.grad) + a.grad_layout.offset(n);
  const T* zrow = row_base<T>(a.logits, a.logits_layout, n);
  if (a.mask && !a.mask[n]) {  // zero gradient; logits not read
    zero_segment(grow, b, e);
    return;
  }
  const float g = a.grad_out[n], sh = a.shift[n];
  // p_j = 2^(y_j)·K from the saved pair (PairExp: one FFMA and one EX2 per element where
  // ordinary); K goes into the dense factor.
  const PairExp pe = PairExp::of(a.lse + 2 * n, P.c);
  const float dense = -g * sh * pe.K;
  float* patch = P.patch_smem ? patch_smem : P.ws_patch + n * K1;
  const int32_t* idx = a.idx + n * K1;
  const float* coef = a.coef + n * K1;

  // 1. S~ entries of this segment, from z before anything is overwritten.
  for (int s = tid; s < K1; s += kThreads) {
    const int j = idx[s];
    if (j >= b && j < e) {
      const float p = pe.p(load1(zrow + j));
      // p != 0, not p > 0: a NaN row's S~ entries stay NaN like its dense part (CPU)
      patch[s] = p != 0.f ? g * p * (coef[s] - sh) : 0.f;
    }
  }
  __syncthreads();
  // 2. dense g·p_j·(−shift)
  constexpr int N = Vec<T>::N;
  map_segment<T, false, 4>(zrow, zrow, grow, b, e,
                           [&](const float (&z)[N], const float (&)[N], int, float (&o)[N]) {
                             float y[N];
                             pe.ys(z, y);
#pragma unroll
                             for (int i = 0; i < N; ++i) o[i] = ex2(y[i]) * dense;
                           });
  __syncthreads();  // the patches below must land after the dense writes
  // 3. the S~ entries
  for (int s = tid; s < K1; s += kThreads) {
    const int j = idx[s];
    if (j >= b && j < e) store1(grow + j, patch[s]);
  }
}

template <typename T>
inline cudaError_t launch_forward(const FwdParams& P, int64_t N, cudaStream_t stream) {
  const size_t smem = P.preselected ? 0 : size_t(kWarps) * P.cap * 12;
  cudaError_t err = allow_smem(fwd_kernel<T>, smem);
  if (err != cudaSuccess) return err;
  TIKE_LAUNCH(fwd_kernel<T>, unsigned(N * P.splits), kThreads, smem, stream, P);
  if (P.splits > 1) {
    const size_t csmem = size_t(P.groups) * P.kp * 12;
    err = allow_smem(combine_kernel<T>, csmem);
    if (err != cudaSuccess) return err;
    TIKE_LAUNCH(combine_kernel<T>, unsigned(N), kThreads, csmem, stream, P);
  }
  return cudaGetLastError();
}

constexpr int kPatchSmemMax = 8192;  // S~ entries staged in shared memory (32 KB)

template <typename T>
inline cudaError_t launch_backward(const BwdParams& P, int64_t N, cudaStream_t stream) {
  const size_t smem = P.patch_smem ? size_t(P.a.K1) * sizeof(float) : 0;
  TIKE_LAUNCH(bwd_kernel<T>, unsigned(N * P.splits), kThreads, smem, stream, P);
  return cudaGetLastError();
}

inline bool sizes_ok(int64_t N, int64_t V, int splits) {
  return V >= 1 && V < (int64_t(1) << 30) && N * splits < int64_t(INT_MAX);
}

}  // namespace topk_detail

// ---------------------------------------------------------------------- launchers

inline TopkKlForwardPlan topk_kl_forward_plan(const TopkKlForwardArgs& a) {
  TopkKlForwardPlan p;
  p.preselected = a.k > kTopkSelectMaxK;
  p.kp = next_pow2(a.k < 1 ? 1 : (a.k > kTopkSelectMaxK ? 1 : a.k));
  p.cap = 2 * (p.kp > 32 ? p.kp : 32);
  p.seg = int(a.V);
  if (!p.preselected) {
    // The combine kernel holds next_pow2(splits)·kp entries in shared memory (<= 48 KB).
    const int max_splits = 4096 / p.kp < 32 ? 4096 / p.kp : 32;
    const RowSplit rs = plan_row_split(a.N, a.V, max_splits);
    p.splits = rs.splits;
    p.seg = rs.seg;
  }
  if (p.splits > 1) {
    const size_t slots = size_t(a.N) * p.splits;
    p.workspace_bytes = slots * (size_t(p.kp) * 12 + topk_detail::kHdr * sizeof(float));
  }
  return p;
}

// Forward of topk_kl. `workspace` holds plan.workspace_bytes (any alignment of 16).
// With plan.preselected, idx[n, 0:k] must already hold S of every unmasked row.
inline cudaError_t topk_kl_forward(const TopkKlForwardArgs& a, const TopkKlForwardPlan& plan,
                                   void* workspace, cudaStream_t stream) {
  if (a.N == 0) return cudaSuccess;
  if (!(a.temperature > 0.f) || a.k < 1 || a.k > a.V || a.K1 < a.k || a.K1 > a.k + 1 ||
      !topk_detail::sizes_ok(a.N, a.V, plan.splits))
    return cudaErrorInvalidValue;
  if (plan.splits > 1 && workspace == nullptr) return cudaErrorInvalidValue;
  topk_detail::FwdParams P;
  P.a = a;
  P.splits = plan.splits;
  P.seg = plan.seg;
  P.kp = plan.kp;
  P.cap = plan.cap;
  P.groups = next_pow2(plan.splits);
  P.preselected = plan.preselected;
  P.c = kLog2e / a.temperature;
  P.inv_tau = 1.f / a.temperature;
  const size_t slots = size_t(a.N) * plan.splits;
  P.ws_key = static_cast<uint64_t*>(workspace);
  P.ws_val = workspace ? reinterpret_cast<float*>(P.ws_key + slots * plan.kp) : nullptr;
  P.ws_hdr = workspace ? P.ws_val + slots * plan.kp : nullptr;
  switch (a.dtype) {
    case DType::Float32: return topk_detail::launch_forward<float>(P, a.N, stream);
    case DType::BFloat16: return topk_detail::launch_forward<__nv_bfloat16>(P, a.N, stream);
    case DType::Float16: return topk_detail::launch_forward<__half>(P, a.N, stream);
  }
  return cudaErrorInvalidValue;
}

// Scratch the backward needs: S~ values of rows whose K1 does not fit shared memory.
inline size_t topk_kl_backward_workspace_bytes(const TopkKlBackwardArgs& a) {
  return a.K1 > topk_detail::kPatchSmemMax ? size_t(a.N) * a.K1 * sizeof(float) : 0;
}

// Backward of topk_kl; a.grad may equal a.logits (same layout) for the in-place variant.
inline cudaError_t topk_kl_backward(const TopkKlBackwardArgs& a, void* workspace,
                                    cudaStream_t stream) {
  if (a.N == 0) return cudaSuccess;
  const RowSplit rs = plan_row_split(a.N, a.V, 64);
  if (!(a.temperature > 0.f) || !topk_detail::sizes_ok(a.N, a.V, rs.splits))
    return cudaErrorInvalidValue;
  topk_detail::BwdParams P;
  P.a = a;
  P.splits = rs.splits;
  P.seg = rs.seg;
  P.c = kLog2e / a.temperature;
  P.patch_smem = a.K1 <= topk_detail::kPatchSmemMax;
  P.ws_patch = static_cast<float*>(workspace);
  if (!P.patch_smem && workspace == nullptr) return cudaErrorInvalidValue;
  switch (a.dtype) {
    case DType::Float32: return topk_detail::launch_backward<float>(P, a.N, stream);
    case DType::BFloat16: return topk_detail::launch_backward<__nv_bfloat16>(P, a.N, stream);
    case DType::Float16: return topk_detail::launch_backward<__half>(P, a.N, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace tike::cuda
