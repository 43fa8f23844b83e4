// Shared by the C++ benchmark binaries: the byte model of design.md §5, synthetic inputs,
// argument lists and dtype conversion. Torch-free and CUDA-free.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "kernels/row_layout.h"

namespace tike::bench {

inline size_t dtype_size(DType d) { return d == DType::Float32 ? 4 : 2; }
inline const char* dtype_name(DType d) {
  return d == DType::Float32 ? "f32" : d == DType::BFloat16 ? "bf16" : "f16";
}

// Passes over an N x V array that each op must make at least (design.md §5): the
// fastest possible kernel moves these bytes at copy bandwidth, so time / floor is the
// figure of merit. A copy itself is one read plus one write: 2 passes.
enum class Op { Copy, TopkFwd, TopkBwd, TopkFwdBwd, FullFwd, FullBwd, TokenFwd, TokenBwd };
inline int passes(Op op) {
  switch (op) {
    case Op::Copy: return 2;        // read src, write dst
    case Op::TopkFwd: return 2;     // read z, zr
    case Op::TopkBwd: return 2;     // read z, write grad (zr is never re-read)
    case Op::TopkFwdBwd: return 4;  // z, zr, z again, grad
    case Op::FullFwd: return 2;     // z, zr
    case Op::FullBwd: return 3;     // z, zr, grad
    case Op::TokenFwd: return 1;    // z
    case Op::TokenBwd: return 2;    // z, grad
  }
  return 1;
}

// float -> 16-bit, round to nearest even (the kernels see 16-bit types as raw bits).
inline uint16_t to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
inline uint16_t to_f16(float f) {
  // Inputs here are moderate logits (|x| < 60): normal half range, no denormal care needed.
  uint32_t u;
  std::memcpy(&u, &f, 4);
  uint32_t sign = (u >> 16) & 0x8000u;
  int32_t e = static_cast<int32_t>((u >> 23) & 0xff) - 127 + 15;
  uint32_t m = u & 0x7fffffu;
  if (e <= 0) return static_cast<uint16_t>(sign);
  if (e >= 31) return static_cast<uint16_t>(sign | 0x7c00u);
  uint32_t h = (static_cast<uint32_t>(e) << 10) | (m >> 13);
  uint32_t rest = m & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;
  return static_cast<uint16_t>(sign | h);
}

// Deterministic pseudo-random logits: z ~ N(0, 2^2) and zr = z + N(0, 0.5^2), a policy
// close to its reference as in RL fine-tuning. Element i of row n depends only on
// (seed, n, i), so rows can be filled in parallel and reproducibly.
struct Rng {
  uint64_t s;
  explicit Rng(uint64_t seed) : s(seed * 0x9E3779B97F4A7C15ull + 1) {}
  uint64_t next() {  // splitmix64
    uint64_t z = (s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  float uniform() { return ((next() >> 40) + 0.5f) * (1.0f / 16777216.0f); }
  float normal() {  // Box-Muller; one of the pair is enough here
    float u1 = uniform(), u2 = uniform();
    return std::sqrt(-2.f * std::log(u1)) * std::cos(6.2831853f * u2);
  }
};

inline void store(void* base, DType d, int64_t i, float v) {
  if (d == DType::Float32) {
    static_cast<float*>(base)[i] = v;
  } else {
    static_cast<uint16_t*>(base)[i] = d == DType::BFloat16 ? to_bf16(v) : to_f16(v);
  }
}

// Fills rows [r0, r1) of contiguous z and zr ([N, V]).
inline void fill_rows(void* z, void* zr, DType d, int64_t V, int64_t r0, int64_t r1) {
  for (int64_t n = r0; n < r1; ++n) {
    Rng rng(static_cast<uint64_t>(n) + 12345);
    for (int64_t i = 0; i < V; ++i) {
      float a = 2.f * rng.normal();
      store(z, d, n * V + i, a);
      store(zr, d, n * V + i, a + 0.5f * rng.normal());
    }
  }
}

// "--name=1,2,3" -> {1,2,3}; returns false when `arg` is not that flag.
inline bool parse_list(const char* arg, const char* name, std::vector<int64_t>* out) {
  std::string prefix = std::string("--") + name + "=";
  if (std::strncmp(arg, prefix.c_str(), prefix.size()) != 0) return false;
  out->clear();
  for (const char* p = arg + prefix.size(); *p;) {
    char* end = nullptr;
    out->push_back(std::strtoll(p, &end, 10));
    p = (*end == ',') ? end + 1 : end;
    if (end == p && *p) break;
  }
  return true;
}

inline bool parse_dtypes(const char* arg, std::vector<DType>* out) {
  const char* prefix = "--dtypes=";
  if (std::strncmp(arg, prefix, std::strlen(prefix)) != 0) return false;
  out->clear();
  std::string s(arg + std::strlen(prefix));
  size_t pos = 0;
  while (pos <= s.size()) {
    size_t end = s.find(',', pos);
    std::string t = s.substr(pos, end == std::string::npos ? std::string::npos : end - pos);
    if (t == "f32") out->push_back(DType::Float32);
    else if (t == "bf16") out->push_back(DType::BFloat16);
    else if (t == "f16") out->push_back(DType::Float16);
    else if (!t.empty()) std::fprintf(stderr, "ignoring unknown dtype '%s'\n", t.c_str());
    if (end == std::string::npos) break;
    pos = end + 1;
  }
  return true;
}

// The sizes to benchmark; the binaries' own flags (--rows=, --vocab=, --ks=, --dtypes=).
struct Config {
  std::vector<int64_t> rows;
  std::vector<int64_t> vocab{32000, 128256, 151936};
  std::vector<int64_t> ks{1, 4, 16, 64, 256};
  std::vector<DType> dtypes{DType::Float32, DType::BFloat16};
  int64_t k_default = 16;

  // Consumes our flags from argv (google-benchmark rejects unknown ones).
  void parse(int* argc, char** argv) {
    int w = 1;
    for (int i = 1; i < *argc; ++i) {
      const char* a = argv[i];
      if (!(parse_list(a, "rows", &rows) || parse_list(a, "vocab", &vocab) ||
            parse_list(a, "ks", &ks) || parse_dtypes(a, &dtypes)))
        argv[w++] = argv[i];
    }
    *argc = w;
  }
};

}  // namespace tike::bench
