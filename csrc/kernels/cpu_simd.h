// Torch-free building blocks of the CPU kernels: dtype conversion of a row tile into a
// float buffer, a vectorized exp, and horizontal reductions in a fixed order.
//
// Vectors are GCC/Clang vector extensions (8 floats): the compiler maps them to AVX2
// in the x86-64-v3 clone of each hot function (TIKE_CPU_HOT) and to SSE pairs in the
// baseline clone, picked at load time by the CPU it runs on — so one wheel is fast on
// a modern CPU and still correct on an old one. Every helper here is always_inline so
// that it is compiled inside each clone.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "row_layout.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define TIKE_CPU_HOT __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define TIKE_CPU_HOT
#endif
#define TIKE_INLINE inline __attribute__((always_inline))

namespace tike::cpu {

constexpr int kLanes = 8;
constexpr int kTile = 2048;  // floats per tile: 8 KiB, stays in L1 between the passes over it
typedef float vf __attribute__((vector_size(32)));
typedef int32_t vi __attribute__((vector_size(32)));

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

TIKE_INLINE vf splat(float x) { return vf{} + x; }

// exp(x) to ~1 ulp for x <= 88 (the kernels only take exp of values <= 0 plus rounding):
// 2^n · e^r with r = x − n·ln2 in [−ln2/2, ln2/2], a degree-6 polynomial for e^r.
// exp(−inf) and anything below the float range give exactly 0; NaN stays NaN.
TIKE_INLINE vf vexp(vf x) {
  const vf lo = splat(-87.33654f);
  vf xc = x < lo ? lo : x;
  const vf magic = splat(12582912.f);  // 1.5·2^23: adding it rounds to an integer
  vf n = (xc * 1.44269504088896341f + magic) - magic;
  vf r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  vf y = splat(1.9875691500e-4f);
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * (r * r) + r + 1.f;
  vi e = (__builtin_convertvector(n, vi) + 127) << 23;
  vf scale;
  std::memcpy(&scale, &e, sizeof(scale));
  y = y * scale;
  return x < lo ? vf{} : y;
}

TIKE_INLINE float sexp(float x) {
  vf v = vexp(splat(x));
  return v[0];
}

TIKE_INLINE float hsum(vf v) {  // fixed pairwise order: reproducible
  float a = (v[0] + v[4]) + (v[2] + v[6]);
  float b = (v[1] + v[5]) + (v[3] + v[7]);
  return a + b;
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

TIKE_INLINE int64_t elem_size(DType dt) { return dt == DType::Float32 ? 4 : 2; }

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
  for (int i = 0; i < n; i += kLanes) acc += vexp((load(buf + i) - vM) * s);
  return hsum(acc);
}

// Online log-sum-exp of x·s over a row, tile by tile (s = 1/τ > 0).
struct OnlineLse {
  float M = -kInf;  // running max of x
  double S = 0.0;   // Σ exp((x − M)·s)
  bool nan = false;

  // Returns the tile max; the caller may reuse it.
  TIKE_INLINE float add_tile(const float* buf, int n, float s) {
    const float tm = tile_max(buf, n, nan);
    if (tm > M) {
      if (S != 0.0) S *= std::exp(double(M - tm) * s);
      M = tm;
    }
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
