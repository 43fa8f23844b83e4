// Warp-level top-k that rides along a streaming pass over a row (torch-free, header-only).
//
// Order. Every element gets a 64-bit key: the float value mapped to an order-preserving
// unsigned int in the high word (NaN ranks as −inf, −0 as +0), the bit-inverted column in
// the low word. Larger key = better, and equal values rank the lower column first, so one
// integer compare implements "value desc, index asc" and all keys are distinct. Key 0
// (below every real key) marks an empty slot.
//
// Selection (the idea of FAISS/RAFT WarpSelect, with the queue in shared memory). Each
// warp owns a buffer of `cap` keys (cap >= 2·next_pow2(k)) and knows the key of its
// current k-th best element. An element whose value is below that threshold's value can
// never enter the final top-k (the threshold only rises), so the common case costs one
// float compare and one warp vote per 16 elements. Survivors are compacted into the
// buffer by ballot; when it could overflow, the warp bitonic-sorts it, keeps the best k
// and raises the threshold. At the end the warps' lists are merged pairwise through
// shared memory (max of one list against the other reversed, then a bitonic merge).
//
// Tail sums ride along too. The terms 2^(z·c − E) of the elements that are not
// candidates (and of candidates as they are evicted) are summed directly, relative to the
// warp's threshold value (a common.cuh Ref at it: every such element is below it, so no
// term exceeds 2^(1/2)). The
// head's own terms are added at the end, so Σ_{v∉S~} p_v is a sum of positive terms, never
// 1 − Σ_{S~} p_v (no cancellation when the tail is tiny). The reference row's terms follow
// the same partition. The sampled token `excl` (when it joins S~) is kept out of both.
// Without the tails (kTails = false: topk_indices) the selection alone remains.
#pragma once
#include "common.cuh"

namespace tike::cuda {

// Largest k of the in-register/shared-memory selection; above it S comes from the caller.
constexpr int64_t kTopkSelectMaxK = 256;

__device__ __forceinline__ uint32_t order_bits(float z) {
  uint32_t u = __float_as_uint(z);
  if ((u & 0x7fffffffu) > 0x7f800000u) u = 0xff800000u;  // NaN ranks as −inf
  if ((u & 0x7fffffffu) == 0u) u = 0u;                    // −0 equals +0
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ __forceinline__ uint64_t make_key(float z, int j) {
  return (uint64_t(order_bits(z)) << 32) | uint64_t(~uint32_t(j));
}
// The (canonical) value and the column of a key.
__device__ __forceinline__ float key_value(uint64_t key) {
  const uint32_t u = uint32_t(key >> 32);
  return __uint_as_float((u & 0x80000000u) ? (u & 0x7fffffffu) : ~u);
}
__device__ __forceinline__ int key_index(uint64_t key) { return int(~uint32_t(key)); }

// Sort n (a power of two) key/value pairs in shared memory, descending by key, with one
// warp (bitonic network; pairs spread over the lanes, __syncwarp between stages).
__device__ __forceinline__ void warp_sort_desc(uint64_t* key, float* val, int n, int lane) {
  for (int size = 2; size <= n; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int t = lane; t < (n >> 1); t += 32) {
        const int lo = 2 * t - (t & (stride - 1)), hi = lo + stride;
        const bool desc = (lo & size) == 0;
        const uint64_t a = key[lo], b = key[hi];
        if ((a < b) == desc) {
          key[lo] = b;
          key[hi] = a;
          const float va = val[lo];
          val[lo] = val[hi];
          val[hi] = va;
        }
      }
      __syncwarp();
    }
  }
}

// G (a power of two) groups of KP (a power of two) entries each, every group sorted
// descending, group g at key + g·stride. Leaves the best KP of all in group 0, sorted;
// every entry pushed out is handed to evict(key, val) once (empty slots are not).
// All kThreads threads of the block take part.
template <typename Evict>
__device__ __forceinline__ void block_merge_groups(uint64_t* key, float* val, int stride, int G,
                                                   int KP, Evict&& evict) {
  const int tid = threadIdx.x;
  for (int r = 1; r < G; r <<= 1) {
    const int npairs = G / (2 * r);
    for (int t = tid; t < npairs * KP; t += kThreads) {
      const int pair = t / KP, i = t % KP;
      const int A = pair * 2 * r * stride, B = A + r * stride;
      const uint64_t a = key[A + i], b = key[B + KP - 1 - i];
      if (b > a) {
        if (a != 0) evict(a, val[A + i]);
        key[A + i] = b;
        val[A + i] = val[B + KP - 1 - i];
      } else if (b != 0) {
        evict(b, val[B + KP - 1 - i]);
      }
    }
    __syncthreads();
    // Each group A now holds a bitonic sequence of the best KP of A ∪ B: merge it.
    for (int st = KP >> 1; st > 0; st >>= 1) {
      for (int t = tid; t < npairs * (KP >> 1); t += kThreads) {
        const int pair = t / (KP >> 1), i = t % (KP >> 1);
        const int base = pair * 2 * r * stride;
        const int lo = base + 2 * i - (i & (st - 1)), hi = lo + st;
        const uint64_t a = key[lo], b = key[hi];
        if (a < b) {
          key[lo] = b;
          key[hi] = a;
          const float va = val[lo];
          val[lo] = val[hi];
          val[hi] = va;
        }
      }
      __syncthreads();
    }
  }
}

// One warp's share of the streaming pass of topk_kl: the candidate buffer (warp-uniform
// state) and this lane's tail sums (kTails). With `fixed`, S is known beforehand (its
// k-th key is the threshold) and members are skipped instead of buffered.
template <bool kTails>
struct TopkStreamT {
  uint64_t* key = nullptr;  // this warp's buffer (cap entries)
  float* val = nullptr;     // the reference logit of each buffered element
  int cap = 0, k = 0, count = 0;
  uint64_t thr_key = 0;  // elements with key <= thr_key are not (or no longer) candidates
  float thr_val = -kInf;  // value of thr_key (float compare first, key compare on ties)
  Ref thr_ref;            // reference of sp: the threshold's value
  float c = 0.f;          // log2(e)/τ
  int excl = -1;          // sampled token united into S~: kept out of the tail sums
  bool fixed = false;
  // lane state
  float sp = 0.f;  // Σ 2^(z·c − E) over this lane's tail elements, relative to thr_ref
  LazyLse q;       // Σ 2^(zr·c − E_q) over the same elements
  bool nan = false;

  __device__ __forceinline__ float tail_term(float z) const {
    return z == -kInf ? 0.f : ex2(thr_ref.exponent(z, c));
  }

  // An element leaves (or never enters) the candidates: its terms go to the tails.
  __device__ __forceinline__ void to_tail(float z, float zr, int j) {
    if constexpr (kTails) {
      if (j == excl) return;
      sp += tail_term(z);
      q.add1(zr, c);
    }
  }

  // Sort the buffer, keep the best k, raise the threshold, evict the rest to the tails.
  __device__ __forceinline__ void merge(int lane) {
    __syncwarp();
    for (int i = count + lane; i < cap; i += 32) key[i] = 0;
    __syncwarp();
    warp_sort_desc(key, val, cap, lane);
    if (count >= k) {
      const uint64_t nk = key[k - 1];
      const float nv = key_value(nk);
      if constexpr (kTails) {
        const Ref nref = Ref::at(nv, c);
        if (sp != 0.f) sp *= ref_factor(thr_ref, nref, c);  // the reference only rises
        thr_ref = nref;
      }
      thr_key = nk;
      thr_val = nv;
      for (int i = k + lane; i < count; i += 32) {
        const uint64_t kk = key[i];
        to_tail(key_value(kk), val[i], key_index(kk));
        key[i] = 0;
      }
      count = k;
    }
    __syncwarp();
  }

  // Whether the element (value z, column j) would still enter the candidates: its key
  // above the threshold's. The float compare decides all but ties with the threshold's
  // value, NaN (ranked as −inf) included.
  __device__ __forceinline__ bool may_enter(float z, int j) const {
    return z > thr_val || (!(z < thr_val) && make_key(z, j) > thr_key);
  }

  // U chunks of E consecutive elements per lane: chunk u starts at column jb[u]; bit
  // u·E+i of vmask says whether element i of chunk u exists (absent ones hold −inf).
  template <int U, int E>
  __device__ __forceinline__ void process(const float (&z)[U * E], const float (&zr)[U * E],
                                          const int (&jb)[U], uint32_t vmask, int lane) {
    constexpr int NE = U * E;
    bool has_excl = false;
#pragma unroll
    for (int u = 0; u < U; ++u) has_excl |= (uint32_t(excl) - uint32_t(jb[u])) < uint32_t(E);
    bool need = has_excl;
#pragma unroll
    for (int i = 0; i < NE; ++i) need |= !(z[i] < thr_val);  // NaN too
    if (__any_sync(kFullMask, need)) {
      // Values equal to the threshold's (the −inf of a row with fewer than k finite
      // logits, bf16 ties): the full key decides, so that such rows stay on the fast path.
      need = has_excl;
#pragma unroll
      for (int i = 0; i < NE; ++i)
        need |= ((vmask >> i) & 1u) && may_enter(z[i], jb[i / E] + i % E);
      if (__any_sync(kFullMask, need)) {
        slow<U, E>(z, zr, jb, vmask, lane);
        return;
      }
    }
    // Common case: nothing here can enter the top-k.
    if constexpr (kTails) {
      float t = 0.f;
      if (thr_ref.R > -kInf) {
        float y[NE];
        thr_ref.exponents(z, c, y);
#pragma unroll
        for (int i = 0; i < NE; ++i) t += ex2(y[i]);
      } else {  // below a −inf threshold: −inf terms (0) or NaN
#pragma unroll
        for (int i = 0; i < NE; ++i) t += tail_term(z[i]);
      }
      sp += t;
      q.add(zr, c);
    }
  }

  template <int U, int E>
  __device__ __forceinline__ void slow(const float (&z)[U * E], const float (&zr)[U * E],
                                       const int (&jb)[U], uint32_t vmask, int lane) {
    constexpr int NE = U * E;
    uint32_t pend = 0;
#pragma unroll
    for (int u = 0; u < U; ++u) {
#pragma unroll
      for (int i = 0; i < E; ++i) {
        const int e = u * E + i;
        const bool p = ((vmask >> e) & 1u) && (may_enter(z[e], jb[u] + i) || jb[u] + i == excl);
        pend |= uint32_t(p) << e;
      }
    }
    // Elements that cannot enter go straight to the tails (the threshold only rises).
    if constexpr (kTails) {
      float t = 0.f, zq[NE];
#pragma unroll
      for (int e = 0; e < NE; ++e) {
        const bool p = (pend >> e) & 1u;
        t += p ? 0.f : tail_term(z[e]);
        zq[e] = p ? -kInf : zr[e];
      }
      sp += t;
      q.add(zq, c);
    }
    // The rest in rounds, one pending element per lane per round (usually one round):
    // full key compare, then ballot-compaction into the buffer. The element is picked
    // from registers by unrolled selects; a run-time array index would go to local memory.
    const uint32_t lt = (1u << lane) - 1u;
    while (__any_sync(kFullMask, pend != 0u)) {
      const bool p = pend != 0u;
      const int e = p ? __ffs(int(pend)) - 1 : 0;
      pend &= pend - 1u;
      float ze = z[0], zre = zr[0];
      int je = jb[0];
#pragma unroll
      for (int i = 1; i < NE; ++i) {
        if (e == i) {
          ze = z[i];
          zre = zr[i];
          je = jb[i / E] + i % E;
        }
      }
      if (!fixed && count + 32 > cap) merge(lane);
      const uint64_t kk = make_key(ze, je);
      const bool push = p && kk > thr_key;
      if (p && !push) to_tail(ze, zre, je);
      if (push && is_nan(ze)) nan = true;
      if (!fixed) {
        const uint32_t b = __ballot_sync(kFullMask, push);
        if (push) {
          const int pos = count + __popc(b & lt);
          key[pos] = kk;
          val[pos] = zre;
        }
        count += __popc(b);
      }
    }
  }

  // End of the stream: the best min(k, count) sorted at the front, zeros after.
  __device__ __forceinline__ void finish(int lane) {
    if (!fixed) merge(lane);
  }
};
using TopkStream = TopkStreamT<true>;

// Streams the columns [b, e) of zrow through st, 16 elements per lane per step (16-byte
// vectors), warp w taking every kWarps-th group of 32·U vectors; with TWO, the same
// columns of qrow travel along as the candidates' values (else z does). The < 2N columns
// outside the aligned body go to the last warp, one per lane. Call st.finish() after.
template <typename T, bool TWO, typename Stream>
__device__ __forceinline__ void stream_topk(Stream& st, const T* zrow, const T* qrow, int b,
                                            int e, int lane, int warp) {
  constexpr int N = Vec<T>::N, U = 16 / N;
  const Span span = make_span(zrow, b, e);
  const bool qal = TWO ? is_aligned16(qrow + span.body_b) : true;
  for (int base = warp * 32 * U; base < span.nvec; base += kWarps * 32 * U) {
    float z[U * N], zr[U * N];
    int jb[U];
    uint32_t vm = 0;
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int ci = base + u * 32 + lane;
      float tz[N], tq[N];
      if (ci < span.nvec) {
        jb[u] = span.body_b + ci * N;
        load_vec(zrow + jb[u], tz);
        if (TWO) load_vec_any(qrow + jb[u], qal, tq);
        vm |= ((1u << N) - 1u) << (u * N);
      } else {
        jb[u] = -(1 << 30);
#pragma unroll
        for (int i = 0; i < N; ++i) tz[i] = tq[i] = -kInf;
      }
#pragma unroll
      for (int i = 0; i < N; ++i) {
        z[u * N + i] = tz[i];
        zr[u * N + i] = TWO ? tq[i] : tz[i];
      }
    }
    st.template process<U, N>(z, zr, jb, vm, lane);
  }
  const int nx = span.num_extra(N);  // < 2N <= 16 columns outside the aligned body
  if (nx > 0 && warp == kWarps - 1) {
    const int j = lane < nx ? span.extra(lane, N) : -1;
    float z1[1] = {-kInf}, q1[1] = {-kInf};
    int jb1[1] = {-(1 << 30)};
    if (j >= 0) {
      z1[0] = load1(zrow + j);
      q1[0] = TWO ? load1(qrow + j) : z1[0];
      jb1[0] = j;
    }
    st.template process<1, 1>(z1, q1, jb1, j >= 0 ? 1u : 0u, lane);
  }
}


}  // namespace tike::cuda
