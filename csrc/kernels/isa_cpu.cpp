// Selection of the CPU kernels' instruction-set path (cpu_isa.h).
#include <cstdlib>
#include <stdexcept>
#include <string>

#include "cpu_isa.h"
#include "cpu_simd.h"

namespace tike::cpu {
namespace {

struct Choice {
  Isa isa = Isa::Baseline;
  std::string error;  // non-empty: TIKE_CPU_ISA asked for something this process cannot do
};

std::string lower(const char* s) {
  std::string out(s);
  for (char& c : out) c = char(c >= 'A' && c <= 'Z' ? c - 'A' + 'a' : c);
  return out;
}

Isa best_isa() {
  if (isa_supported(Isa::Avx512)) return Isa::Avx512;
  if (isa_supported(Isa::Avx2)) return Isa::Avx2;
  return Isa::Baseline;
}

Choice choose() {
  Choice c;
  const char* env = std::getenv("TIKE_CPU_ISA");
  const std::string want = env ? lower(env) : std::string();
  if (want.empty() || want == "auto") {
    c.isa = best_isa();
    return c;
  }
  if (want == "avx512") {
    c.isa = Isa::Avx512;
  } else if (want == "avx2") {
    c.isa = Isa::Avx2;
  } else if (want == "baseline" || want == isa_name(Isa::Baseline) ||
             (TIKE_CPU_X86 && want == "sse")) {
    c.isa = Isa::Baseline;
  } else {
    c.error = "TIKE_CPU_ISA=" + std::string(env) + " is not a CPU path; use one of auto, " +
              std::string(isa_name(Isa::Avx512)) + ", " + isa_name(Isa::Avx2) + ", " +
              isa_name(Isa::Baseline) + " (this CPU runs: " + supported_isa_names() + ")";
    return c;
  }
  if (!isa_supported(c.isa))
    c.error = "TIKE_CPU_ISA=" + std::string(env) + ": this CPU cannot run the " +
              isa_name(c.isa) + " path (it runs: " + supported_isa_names() +
              "); unset TIKE_CPU_ISA or pick one of those";
  return c;
}

}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Avx512: return "avx512";
    case Isa::Avx2: return "avx2";
    default:
#if TIKE_CPU_X86
      return "sse2";
#elif defined(__aarch64__)
      return "neon";
#else
      return "generic";
#endif
  }
}

bool isa_supported(Isa isa) {
  if (isa == Isa::Baseline) return true;
#if TIKE_CPU_X86
  // libgcc / compiler-rt also check that the OS saves the AVX / AVX-512 registers (XCR0).
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c");
  if (isa == Isa::Avx2) return avx2;
  return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
#else
  return false;
#endif
}

std::string supported_isa_names() {
  std::string out;
  for (Isa isa : {Isa::Avx512, Isa::Avx2, Isa::Baseline})
    if (isa_supported(isa)) out += (out.empty() ? "" : ", ") + std::string(isa_name(isa));
  return out;
}

Isa active_isa() {
  static const Choice choice = choose();
  if (!choice.error.empty()) throw std::runtime_error("tike_cuda: " + choice.error);
  return choice.isa;
}

}  // namespace tike::cpu
