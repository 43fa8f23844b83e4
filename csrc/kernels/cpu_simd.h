// Torch-free building blocks of the CPU kernels: dtype conversion of a row tile into a
// float buffer, a vectorized exp, and horizontal reductions in a fixed order.
//
// Vectors are GCC/Clang vector extensions (16 floats): the compiler maps them to
// AVX-512 in the x86-64-v4 clone of each hot function (TIKE_CPU_HOT), to AVX2 pairs in
// the x86-64-v3 clone and to SSE quads in the baseline one, picked at load time by the
// CPU it runs on — so one build is fast on a modern CPU and still correct on an old
// one. Every helper here is always_inline so that it is compiled inside each clone.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "row_layout.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define TIKE_CPU_HOT __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define TIKE_CPU_HOT
#endif
#define TIKE_INLINE inline __attribute__((always_inline))

namespace tike::cpu {

constexpr int kLanes = 16;
constexpr int kTile = 2048;  // floats per tile: 8 KiB, stays in L1 between the passes over it
typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

TIKE_INLINE vf splat(float x) { return vf{} + x; }

constexpr float kLog2e = 1.44269504088896341f;

// 2^y to ~2 ulp for y <= 127: 2^n · 2^f with n = round(y), f in [−1/2, 1/2] and a
// degree-6 polynomial for 2^f. Callers fold log2(e) into their scale, so an exp costs
// one multiply less than exp(x) would. 2^y below the float range (and y = −inf) is
// exactly 0; NaN stays NaN.
TIKE_INLINE vf vexp2(vf y) {
  const vf lo = splat(-126.f);
  const vf yc = y < lo ? lo : y;
  const vf magic = splat(12582912.f);  // 1.5·2^23: adding it rounds to an integer
  const vf n = (yc + magic) - magic;
  const vf f = yc - n;
  vf p = splat(1.5403530393381606e-4f);
  p = p * f + 1.3333558146428443e-3f;
  p = p * f + 9.6181291076284772e-3f;
  p = p * f + 5.5504108664821580e-2f;
  p = p * f + 2.4022650695910071e-1f;
  p = p * f + 6.9314718055994531e-1f;
  p = p * f + 1.f;
  const vi e = (__builtin_convertvector(n, vi) + 127) << 23;
  vf scale;
  std::memcpy(&scale, &e, sizeof(scale));
  return y < lo ? vf{} : p * scale;
}

// exp(x) = 2^(x·log2 e), for the few places that have no scale to fold it into.
TIKE_INLINE vf vexp(vf x) { return vexp2(x * kLog2e); }

TIKE_INLINE float sexp(float x) {
  vf v = vexp(splat(x));
  return v[0];
}

TIKE_INLINE float hsum(vf v) {  // fixed pairwise tree: reproducible
  float t[kLanes];
  std::memcpy(t, &v, sizeof(t));
  for (int w = kLanes / 2; w > 0; w /= 2)
    for (int i = 0; i < w; ++i) t[i] += t[i + w];
  return t[0];
}
TIKE_INLINE float hmax(vf v) {
  float m = v[0];
  for (int i = 1; i < kLanes; ++i) m = v[i] > m ? v[i] : m;
  return m;
}
TIKE_INLINE vf vmax(vf a, vf b) { return a > b ? a : b; }
TIKE_INLINE vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
TIKE_INLINE void store(float* p, vf v) { std::memcpy(p, &v, sizeof(v)); }

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

TIKE_INLINE float load_one(const void* row, DType dt, int64_t j) {
  switch (dt) {
    case DType::Float32: return static_cast<const float*>(row)[j];
    case DType::BFloat16: return bf16_to_float(static_cast<const uint16_t*>(row)[j]);
    default: return float(static_cast<const _Float16*>(row)[j]);
  }
}

// Converts elements [j0, j0 + n) of a row into buf[0, n) and pads buf up to a multiple
// of kLanes with `pad` (−inf: neutral for max and for sums of exp).
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
      const _Float16* s = static_cast<const _Float16*>(row) + j0;
      for (int i = 0; i < n; ++i) buf[i] = float(s[i]);
    }
  }
  for (int i = n; i % kLanes; ++i) buf[i] = pad;
}

// The floats of elements [j0, j0 + n) of a row, padded to a multiple of kLanes: the row
// itself for a full float32 tile (no staging copy), else converted into buf.
TIKE_INLINE const float* tile_src(const void* row, DType dt, int64_t j0, int n, float* buf,
                                  float pad = -kInf) {
  if (dt == DType::Float32 && n % kLanes == 0) return static_cast<const float*>(row) + j0;
  load_tile(row, dt, j0, n, buf, pad);
  return buf;
}

// Where a kernel computes the floats of output elements [j0, j0 + n): straight into a
// float32 row when the tile needs no padding, else into buf (then store_tile).
TIKE_INLINE float* tile_dst(void* row, DType dt, int64_t j0, int n, float* buf) {
  if (dt == DType::Float32 && n % kLanes == 0) return static_cast<float*>(row) + j0;
  return buf;
}
TIKE_INLINE void store_tile(void* row, DType dt, int64_t j0, int n, const float* buf);
TIKE_INLINE void finish_tile(void* row, DType dt, int64_t j0, int n, const float* dst,
                             const float* buf) {
  if (dst == buf) store_tile(row, dt, j0, n, buf);
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
      _Float16* d = static_cast<_Float16*>(row) + j0;
      for (int i = 0; i < n; ++i) d[i] = _Float16(buf[i]);
    }
  }
}

TIKE_INLINE const void* row_ptr(const void* base, DType dt, const RowLayout& l, int64_t n) {
  return static_cast<const char*>(base) + l.offset(n) * elem_size(dt);
}
TIKE_INLINE void* row_ptr(void* base, DType dt, const RowLayout& l, int64_t n) {
  return static_cast<char*>(base) + l.offset(n) * elem_size(dt);
}

// Max over a padded tile; `nan` is set when any element is NaN (max alone would hide it).
TIKE_INLINE float tile_max(const float* buf, int n, bool& nan) {
  vf m = splat(-kInf);
  vi bad = vi{};
  for (int i = 0; i < n; i += kLanes) {
    vf x = load(buf + i);
    m = vmax(m, x);
    bad |= (x != x);
  }
  for (int i = 0; i < kLanes; ++i) nan |= bad[i] != 0;
  return hmax(m);
}

// Σ exp((x − M)·s) over a padded tile (−inf padding contributes 0).
TIKE_INLINE float tile_sumexp(const float* buf, int n, float M, float s) {
  vf acc = vf{};
  const vf vM = splat(M);
  const float c = s * kLog2e;
  for (int i = 0; i < n; i += kLanes) acc += vexp2((load(buf + i) - vM) * c);
  return hsum(acc);
}

// Online log-sum-exp of x·s over a row, tile by tile (s = 1/τ > 0).
struct OnlineLse {
  float M = -kInf;  // running max of x
  double S = 0.0;   // Σ exp((x − M)·s)
  bool nan = false;

  // Raises the running max to tm when tm is larger, rescaling S; returns the factor every
  // other sum kept relative to M must be multiplied by (1 when M stays; 0 while M was −inf).
  TIKE_INLINE double raise_max(float tm, float s) {
    if (!(tm > M)) return 1.0;
    const double f = std::exp(double(M - tm) * s);
    S *= f;
    M = tm;
    return f;
  }

  // Returns the tile max; the caller may reuse it.
  TIKE_INLINE float add_tile(const float* buf, int n, float s) {
    const float tm = tile_max(buf, n, nan);
    raise_max(tm, s);
    if (M > -kInf) S += tile_sumexp(buf, n, M, s);
    return tm;
  }
  TIKE_INLINE float lse(float s) const {
    if (nan) return kNaN;
    if (M == kInf) return kInf;
    return float(double(M) * s + std::log(S));
  }
};

}  // namespace tike::cpu
