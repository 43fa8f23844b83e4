// Torch-free building blocks of the CPU kernels: vectors of the width each instruction
// set runs natively, dtype conversion of a row tile into a float buffer, a vectorized
// exp, horizontal reductions in a fixed order, and TIKE_CPU_KERNEL, which compiles a
// kernel once per path and picks one at the first call (cpu_isa.h).
//
// Why hand-written GCC/Clang vector extensions and not a SIMD library: the kernels need
// a handful of operations (exp, max, compare-select, sums, bf16/fp16 loads), which fit in
// this header; Google Highway is not on PyPI (a `pip install .` would need a system
// package or a vendored source tree), and ATen's Vectorized<float> would tie the
// torch-free kernels (and the google-benchmark binary) to libtorch's internal headers
// and per-file compile flags. What a library would save is the width per instruction
// set and the dispatch; both are below (Simd<W>, TIKE_CPU_KERNEL).
//
// Width per path: Simd<16> under AVX-512, Simd<8> under AVX2 + FMA, Simd<4> for the
// baseline (SSE2 on x86-64, NEON on aarch64, scalar code elsewhere). A vector wider than
// the hardware's (e.g. 16 lanes on AVX2) is lowered partly element by element: ~5× slower.
//
// How a path is compiled: the kernel body is a template over Simd<W> whose helpers are
// all always_inline; TIKE_CPU_KERNEL instantiates it inside one function per path that
// carries `__attribute__((target(...)))`, so the inlined body is compiled for that ISA.
// Per-file -m flags would do the same but leak: std:: templates instantiated in an
// AVX-512 file are merged by the linker with those of the baseline file, and the
// baseline path may then run AVX-512 code. Out-of-line code (std::sort, the top-k heap)
// stays baseline code under target attributes.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "cpu_isa.h"
#include "row_layout.h"

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define TIKE_CPU_X86 1
#define TIKE_TARGET_AVX512 \
  __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c")))
#define TIKE_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#else
#define TIKE_CPU_X86 0
#endif
#define TIKE_INLINE inline __attribute__((always_inline))
// For lambdas in kernel bodies: `[&](vf x) TIKE_LAMBDA_INLINE { ... }`. A lambda does not
// inherit its function's target attribute; only inlined is it compiled for that path.
#define TIKE_LAMBDA_INLINE __attribute__((always_inline))

namespace tike::cpu {

constexpr int kTile = 2048;  // floats per tile: 8 KiB, stays in L1 between the passes over it
constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kLog2e = 1.44269504088896341f;

// The vector types of W lanes (one specialisation per width: GCC drops a vector_size
// that depends on a template parameter).
template <int W>
struct VecTypes;
template <>
struct VecTypes<4> {
  typedef float vf __attribute__((vector_size(16)));
  typedef int32_t vi __attribute__((vector_size(16)));
  typedef uint32_t vu __attribute__((vector_size(16)));
  typedef uint16_t vh __attribute__((vector_size(8)));
};
template <>
struct VecTypes<8> {
  typedef float vf __attribute__((vector_size(32)));
  typedef int32_t vi __attribute__((vector_size(32)));
  typedef uint32_t vu __attribute__((vector_size(32)));
  typedef uint16_t vh __attribute__((vector_size(16)));
};
template <>
struct VecTypes<16> {
  typedef float vf __attribute__((vector_size(64)));
  typedef int32_t vi __attribute__((vector_size(64)));
  typedef uint32_t vu __attribute__((vector_size(64)));
  typedef uint16_t vh __attribute__((vector_size(32)));
};

// W float lanes and the operations on them. Every member is always_inline: it is compiled
// inside the per-path function that uses it.
template <int W>
struct Simd {
  static constexpr int kLanes = W;
  using vf = typename VecTypes<W>::vf;
  using vi = typename VecTypes<W>::vi;
  using vu = typename VecTypes<W>::vu;
  using vh = typename VecTypes<W>::vh;

  static TIKE_INLINE vf splat(float x) { return vf{} + x; }
  static TIKE_INLINE vf load(const float* p) {
    vf v;
    std::memcpy(&v, p, sizeof(v));
    return v;
  }
  static TIKE_INLINE void store(float* p, vf v) { std::memcpy(p, &v, sizeof(v)); }
  static TIKE_INLINE vf max(vf a, vf b) { return a > b ? a : b; }
  // 2^y to ~2 ulp for y <= 127: 2^n · 2^f with n = round(y), f in [−1/2, 1/2] and a
  // degree-6 polynomial for 2^f. Callers fold log2(e) into their scale, so an exp costs
  // one multiply less than exp(x) would. 2^y below the float range (and y = −inf) is
  // exactly 0; NaN stays NaN.
  static TIKE_INLINE vf exp2(vf y) {
    const vf lo = splat(-126.f);
    const vf yc = y < lo ? lo : y;
    const vf magic = splat(12582912.f);  // 1.5·2^23: adding it rounds to an integer
    const vf t = yc + magic;
    const vf n = t - magic;
    const vf f = yc - n;
    vf p = splat(1.5403530393381606e-4f);
    p = p * f + 1.3333558146428443e-3f;
    p = p * f + 9.6181291076284772e-3f;
    p = p * f + 5.5504108664821580e-2f;
    p = p * f + 2.4022650695910071e-1f;
    p = p * f + 6.9314718055994531e-1f;
    p = p * f + 1.f;
    // n sits in the low mantissa bits of t: 2^n's exponent field without a conversion.
    vi e;
    std::memcpy(&e, &t, sizeof(e));
    e = (e - 0x4B400000 + 127) << 23;
    vf scale;
    std::memcpy(&scale, &e, sizeof(scale));
    // Below the float range: 0, by clearing the bits (an AND, not a blend).
    const vi keep = ~(y < lo);
    vi r;
    const vf v = p * scale;
    std::memcpy(&r, &v, sizeof(r));
    r &= keep;
    vf out;
    std::memcpy(&out, &r, sizeof(out));
    return out;
  }
  // exp(x) = 2^(x·log2 e), for the few places that have no scale to fold it into.
  static TIKE_INLINE vf exp(vf x) { return exp2(x * kLog2e); }

  static TIKE_INLINE float hsum(vf v) {  // fixed pairwise tree: reproducible
    float t[W];
    std::memcpy(t, &v, sizeof(t));
    for (int w = W / 2; w > 0; w /= 2)
      for (int i = 0; i < w; ++i) t[i] += t[i + w];
    return t[0];
  }
  static TIKE_INLINE float hmax(vf v) {
    float m = v[0];
    for (int i = 1; i < W; ++i) m = v[i] > m ? v[i] : m;
    return m;
  }
  static TIKE_INLINE float hmin(vf v) {
    float m = v[0];
    for (int i = 1; i < W; ++i) m = v[i] < m ? v[i] : m;
    return m;
  }
  static TIKE_INLINE bool any(vi m) {
    for (int i = 0; i < W; ++i)
      if (m[i] != 0) return true;
    return false;
  }
  // n rounded up to whole vectors: tiles are padded to it.
  static constexpr int padded(int n) { return (n + W - 1) / W * W; }
};

// exp(x) of one float with the vector code (the kernels' exp, bit for bit).
template <class S>
TIKE_INLINE float sexp(float x) {
  return S::exp(S::splat(x))[0];
}

// Picks one of the per-path instantiations of a kernel (TIKE_CPU_KERNEL).
template <class Fn>
Fn pick_kernel(Fn avx512, Fn avx2, Fn baseline) {
  switch (active_isa()) {
    case Isa::Avx512: return avx512;
    case Isa::Avx2: return avx2;
    default: return baseline;
  }
}

// Defines `void name(const Args&, int64_t begin, int64_t end)` running
// `body<Simd<W>>(args, begin, end)` with the widest path selected (cpu_isa.h). The body
// must be a TIKE_INLINE function template, and so must everything it calls that touches
// vectors; use at namespace scope in the kernel's .cpp.
#if TIKE_CPU_X86
#define TIKE_CPU_KERNEL(name, Args, body)                                          \
  namespace {                                                                      \
  TIKE_TARGET_AVX512 void name##_avx512(const Args& a, int64_t b, int64_t e) {     \
    body<::tike::cpu::Simd<16>>(a, b, e);                                          \
  }                                                                                \
  TIKE_TARGET_AVX2 void name##_avx2(const Args& a, int64_t b, int64_t e) {         \
    body<::tike::cpu::Simd<8>>(a, b, e);                                           \
  }                                                                                \
  void name##_baseline(const Args& a, int64_t b, int64_t e) {                      \
    body<::tike::cpu::Simd<4>>(a, b, e);                                           \
  }                                                                                \
  }                                                                                \
  void name(const Args& a, int64_t b, int64_t e) {                                 \
    static void (*const fn)(const Args&, int64_t, int64_t) =                       \
        ::tike::cpu::pick_kernel(&name##_avx512, &name##_avx2, &name##_baseline);  \
    fn(a, b, e);                                                                   \
  }
#else
#define TIKE_CPU_KERNEL(name, Args, body)                  \
  void name(const Args& a, int64_t b, int64_t e) {         \
    static const bool checked = (::tike::cpu::active_isa(), true); \
    (void)checked;                                         \
    body<::tike::cpu::Simd<4>>(a, b, e);                   \
  }
#endif

TIKE_INLINE int64_t elem_size(DType dt) { return dt == DType::Float32 ? 4 : 2; }

// ---- scalar dtype conversion ------------------------------------------------------------
TIKE_INLINE float bf16_to_float(uint16_t b) {
  uint32_t u = uint32_t(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
TIKE_INLINE uint16_t float_to_bf16(float f) {  // round to nearest even, NaN kept quiet
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

// IEEE half precision: a native type where the compiler has one in C++ (_Float16 on x86-64
// with GCC >= 12 / Clang, __fp16 on Arm), else bit conversions in software (forced by
// -DTIKE_SOFT_HALF, to test them).
#if defined(TIKE_SOFT_HALF)
#define TIKE_HALF_IN_SOFTWARE 1
#elif defined(__aarch64__) || defined(__ARM_FP16_FORMAT_IEEE)
typedef __fp16 half_t;
TIKE_INLINE float half_to_float(half_t h) { return float(h); }
TIKE_INLINE half_t float_to_half(float f) { return half_t(f); }
#elif defined(__FLT16_MANT_DIG__) && (defined(__x86_64__) || defined(__clang__))
typedef _Float16 half_t;
TIKE_INLINE float half_to_float(half_t h) { return float(h); }
TIKE_INLINE half_t float_to_half(float f) { return half_t(f); }
#else
#define TIKE_HALF_IN_SOFTWARE 1
#endif
#if defined(TIKE_HALF_IN_SOFTWARE)
struct half_t {
  uint16_t bits;
};
TIKE_INLINE float half_to_float(half_t h) {
  const uint32_t sign = uint32_t(h.bits & 0x8000u) << 16, e = (h.bits >> 10) & 0x1fu,
                 m = h.bits & 0x3ffu;
  float f;
  if (e == 31) {  // inf / NaN
    const uint32_t u = sign | 0x7f800000u | (m << 13);
    std::memcpy(&f, &u, 4);
  } else if (e == 0) {  // zero / subnormal: m · 2^-24
    f = std::ldexp(float(m), -24);
    if (sign) f = -f;
  } else {
    const uint32_t u = sign | ((e + 112u) << 23) | (m << 13);
    std::memcpy(&f, &u, 4);
  }
  return f;
}
TIKE_INLINE half_t float_to_half(float f) {  // round to nearest even
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  const float a = std::fabs(f);
  if (a != a) return {uint16_t(sign | 0x7e00u)};
  if (a >= 65520.f) return {uint16_t(sign | 0x7c00u)};
  if (a < 6.103515625e-05f) return {uint16_t(sign | uint16_t(std::nearbyint(a * 16777216.f)))};
  uint32_t v;
  std::memcpy(&v, &a, 4);
  v += 0xfffu + ((v >> 13) & 1u);
  return {uint16_t(sign | uint16_t((v >> 13) - (112u << 10)))};
}
#endif

TIKE_INLINE float load_one(const void* row, DType dt, int64_t j) {
  switch (dt) {
    case DType::Float32: return static_cast<const float*>(row)[j];
    case DType::BFloat16: return bf16_to_float(static_cast<const uint16_t*>(row)[j]);
    default: return half_to_float(static_cast<const half_t*>(row)[j]);
  }
}

// Converts elements [j0, j0 + n) of a row into buf[0, n) and pads buf up to whole
// vectors with `pad` (−inf: neutral for max and for sums of exp).
template <class S>
TIKE_INLINE void load_tile(const void* row, DType dt, int64_t j0, int n, float* buf,
                           float pad = -kInf) {
  switch (dt) {
    case DType::Float32:
      std::memcpy(buf, static_cast<const float*>(row) + j0, sizeof(float) * n);
      break;
    case DType::BFloat16: {
      const uint16_t* s = static_cast<const uint16_t*>(row) + j0;
      uint32_t* d = reinterpret_cast<uint32_t*>(buf);
      for (int i = 0; i < n; ++i) d[i] = uint32_t(s[i]) << 16;
      break;
    }
    default: {
      const half_t* s = static_cast<const half_t*>(row) + j0;
      for (int i = 0; i < n; ++i) buf[i] = half_to_float(s[i]);
    }
  }
  for (int i = n; i < S::padded(n); ++i) buf[i] = pad;
}

// The floats of elements [j0, j0 + n) of a row, padded to whole vectors: the row itself
// for a full float32 tile (no staging copy), else converted into buf.
template <class S>
TIKE_INLINE const float* tile_src(const void* row, DType dt, int64_t j0, int n, float* buf,
                                  float pad = -kInf) {
  if (dt == DType::Float32 && n % S::kLanes == 0) return static_cast<const float*>(row) + j0;
  load_tile<S>(row, dt, j0, n, buf, pad);
  return buf;
}

// Writes buf[0, n) as elements [j0, j0 + n) of a row of dtype dt (rounded once).
TIKE_INLINE void store_tile(void* row, DType dt, int64_t j0, int n, const float* buf) {
  switch (dt) {
    case DType::Float32:
      std::memcpy(static_cast<float*>(row) + j0, buf, sizeof(float) * n);
      break;
    case DType::BFloat16: {
      uint16_t* d = static_cast<uint16_t*>(row) + j0;
      for (int i = 0; i < n; ++i) d[i] = float_to_bf16(buf[i]);
      break;
    }
    default: {
      half_t* d = static_cast<half_t*>(row) + j0;
      for (int i = 0; i < n; ++i) d[i] = float_to_half(buf[i]);
    }
  }
}

// A row of V zeros (masked rows' gradients): +0 is all zero bits in every dtype.
TIKE_INLINE void zero_row(void* row, DType dt, int64_t V) {
  std::memset(row, 0, size_t(V) * size_t(dt == DType::Float32 ? 4 : 2));
}

// Writes one element of a row of dtype dt (rounded once, as store_tile).
TIKE_INLINE void store_one(void* row, DType dt, int64_t j, float x) {
  switch (dt) {
    case DType::Float32: static_cast<float*>(row)[j] = x; break;
    case DType::BFloat16: static_cast<uint16_t*>(row)[j] = float_to_bf16(x); break;
    default: static_cast<half_t*>(row)[j] = float_to_half(x);
  }
}

// Whole vectors of a float32 or bfloat16 row, converted in registers: a one-pass loop (a
// backward reads each logit once and writes each gradient element once) then needs no
// staging buffer, which for bfloat16 costs two more L1 passes per element. The bfloat16
// rounding is float_to_bf16's, lane by lane (the same bits).
template <class S>
TIKE_INLINE typename S::vf load_vec(const void* row, DType dt, int64_t j) {
  if (dt == DType::Float32) return S::load(static_cast<const float*>(row) + j);
  typename S::vh h;
  std::memcpy(&h, static_cast<const uint16_t*>(row) + j, sizeof(h));
  const typename S::vu u = __builtin_convertvector(h, typename S::vu) << 16;
  typename S::vf v;
  std::memcpy(&v, &u, sizeof(v));
  return v;
}
template <class S>
TIKE_INLINE void store_vec(void* row, DType dt, int64_t j, typename S::vf v) {
  if (dt == DType::Float32) return S::store(static_cast<float*>(row) + j, v);
  using vu = typename S::vu;
  vu u;
  std::memcpy(&u, &v, sizeof(u));
  const vu nearest = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const vu quiet = (u >> 16) | 0x40u;
  const vu r = v != v ? quiet : nearest;
  const typename S::vh h = __builtin_convertvector(r, typename S::vh);
  std::memcpy(static_cast<uint16_t*>(row) + j, &h, sizeof(h));
}

TIKE_INLINE const void* row_ptr(const void* base, DType dt, const RowLayout& l, int64_t n) {
  return static_cast<const char*>(base) + l.offset(n) * elem_size(dt);
}
TIKE_INLINE void* row_ptr(void* base, DType dt, const RowLayout& l, int64_t n) {
  return static_cast<char*>(base) + l.offset(n) * elem_size(dt);
}

// Software prefetch of the next tile of a row, spread over the compute loop of the current
// one: a pass then overlaps its memory traffic with the exponentials instead of
// alternating between waiting for a tile (the hardware prefetcher runs only a few lines
// ahead) and computing on it.
struct NextTile {
  const char* p = nullptr;  // the next tile's first byte; null: nothing to prefetch
  int esize = 0;            // bytes per element
  // For the elements of the vector at float index i of the current tile.
  TIKE_INLINE void at(int i) const {
    if (p != nullptr) __builtin_prefetch(p + int64_t(i) * esize, 0, 3);
  }
};
// The tile after [j0, j0 + kTile) of a row (none past the row's end).
TIKE_INLINE NextTile next_tile(const void* row, DType dt, int64_t j0, int64_t V) {
  NextTile t;
  if (j0 + kTile < V) {
    t.esize = int(elem_size(dt));
    t.p = static_cast<const char*>(row) + (j0 + kTile) * t.esize;
  }
  return t;
}

// out_j = f(z_j, q_j) over elements [j0, j0 + n) of a row (q_j = 0 without `qrow`), the
// elementwise pass of a backward: by whole vectors straight from and to the rows where
// the dtype and n allow it, else through the buffers (zb holds z and then the output; qb
// holds q, padded with 0). Each vector is read before its output is written, so the
// output row may alias zrow (an in-place backward). f must be lane-wise.
// Plain stores, not non-temporal ones: with a fresh gradient per call (before the gradient
// cache) non-temporal stores made the fp32 backwards 20-30 % slower through the ops (the
// OS's zeroing of a fresh page leaves its lines in cache); not re-measured since.
template <class S, class F>
TIKE_INLINE void map_tile(void* grow, const void* zrow, const void* qrow, DType dt, int64_t j0,
                          int n, int64_t V, float* zb, float* qb, F f) {
  using vf = typename S::vf;
  const NextTile nz = next_tile(zrow, dt, j0, V);
  const NextTile nq = qrow ? next_tile(qrow, dt, j0, V) : NextTile{};
  // bfloat16 in registers on AVX-512 only: there the backwards ran 20-25 % faster; on
  // AVX2 it gained nothing (16 registers: the conversions' constants crowd the exp's),
  // and SSE2, without pmovzxwd and packusdw, ran 40 % slower (bench_cpu_kernels).
  const bool direct = dt == DType::Float32 || (dt == DType::BFloat16 && S::kLanes == 16);
  if (direct && n % S::kLanes == 0) {
    for (int i = 0; i < n; i += S::kLanes) {
      nz.at(i);
      nq.at(i);
      const vf q = qrow ? load_vec<S>(qrow, dt, j0 + i) : vf{};
      store_vec<S>(grow, dt, j0 + i, f(load_vec<S>(zrow, dt, j0 + i), q));
    }
    return;
  }
  const int npad = S::padded(n);
  load_tile<S>(zrow, dt, j0, n, zb);
  if (qrow) load_tile<S>(qrow, dt, j0, n, qb, 0.f);
  for (int i = 0; i < npad; i += S::kLanes) {
    nz.at(i);
    nq.at(i);
    S::store(zb + i, f(S::load(zb + i), qrow ? S::load(qb + i) : vf{}));
  }
  store_tile(grow, dt, j0, n, zb);
}

// Max over a padded tile; `nan` is set when any element is NaN (max alone would hide it).
template <class S>
TIKE_INLINE float tile_max(const float* buf, int n, bool& nan) {
  typename S::vf m = S::splat(-kInf);
  typename S::vi bad = typename S::vi{};
  for (int i = 0; i < n; i += S::kLanes) {
    const typename S::vf x = S::load(buf + i);
    m = S::max(m, x);
    bad |= (x != x);
  }
  nan |= S::any(bad);
  return S::hmax(m);
}

// Σ exp((x − M)·s) over a padded tile (−inf padding contributes 0). x − M is formed
// before scaling, so neither a large M nor a large s overflows.
template <class S>
TIKE_INLINE float tile_sumexp(const float* buf, int n, float M, float s,
                              const NextTile& next = NextTile{}) {
  typename S::vf acc = typename S::vf{};
  const typename S::vf vM = S::splat(M);
  const float c = s * kLog2e;
  for (int i = 0; i < n; i += S::kLanes) {
    next.at(i);
    acc += S::exp2((S::load(buf + i) - vM) * c);
  }
  return S::hsum(acc);
}

// A row's log-sum-exp of x·s as the pair the kernels save for the backward:
// (M, ℓ) with M = max x and ℓ = log Σ exp((x − M)·s), so lse = M·s + ℓ and
// log p_v = (x_v − M)·s − ℓ, never forming M·s (which loses log p's digits at low τ,
// and overflows for logits near the float limit). A NaN or +inf logit makes both NaN
// (as log_softmax does); an all −inf row gives (−inf, −inf).
struct LsePair {
  float max = 0.f, log_sum = 0.f;
  // log p of a logit x at scale s, in double (for the few entries gathered per row).
  double logp(float x, float s) const {
    return (double(x) - double(max)) * double(s) - double(log_sum);
  }
};

// Online log-sum-exp of x·s over a row, tile by tile (s = 1/τ > 0).
template <class S>
struct OnlineLse {
  float M = -kInf;  // running max of x
  double sum = 0.0;  // Σ exp((x − M)·s)
  bool nan = false;

  // Raises the running max to tm when tm is larger, rescaling the sum; returns the factor
  // every other sum kept relative to M must be multiplied by (1 when M stays; 0 while M
  // was −inf).
  TIKE_INLINE double raise_max(float tm, float s) {
    if (!(tm > M)) return 1.0;
    const double f = std::exp((double(M) - double(tm)) * s);
    sum *= f;
    M = tm;
    return f;
  }

  // Returns the tile max; the caller may reuse it.
  TIKE_INLINE float add_tile(const float* buf, int n, float s, const NextTile& next = NextTile{}) {
    const float tm = tile_max<S>(buf, n, nan);
    raise_max(tm, s);
    if (M > -kInf && M < kInf) sum += tile_sumexp<S>(buf, n, M, s, next);
    return tm;
  }
  TIKE_INLINE bool bad() const { return nan || M == kInf; }
  TIKE_INLINE LsePair pair() const {
    if (bad()) return {kNaN, kNaN};
    return {M, float(std::log(sum))};
  }
  // log Σ exp(x·s) − M·s in double (−inf for an empty or all −inf row).
  TIKE_INLINE double log_sum() const { return bad() ? double(kNaN) : std::log(sum); }
};

}  // namespace tike::cpu
