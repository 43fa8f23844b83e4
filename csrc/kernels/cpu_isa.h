// Which vector instruction set the CPU kernels run with: chosen once per process.
//
// Every hot kernel is compiled once per path (csrc/kernels/cpu_simd.h,
// TIKE_CPU_KERNEL): AVX-512 (16 float lanes), AVX2 + FMA (8 lanes) and a baseline of
// 4 lanes (SSE2 on x86-64, NEON on aarch64, plain C++ elsewhere). The first kernel call
// (or the extension's import, which asks for it) picks the path: the environment
// variable TIKE_CPU_ISA = avx512 | avx2 | sse2 (or baseline) | auto, else the best one
// this CPU runs. A path the CPU cannot run, or an unknown name, is an error, never a
// silent fallback, so that a test that forces a path really runs it.
#pragma once
#include <string>

namespace tike::cpu {

enum class Isa : int { Baseline = 0, Avx2 = 1, Avx512 = 2 };

// "avx512", "avx2", or the baseline's name on this architecture ("sse2", "neon", "generic").
const char* isa_name(Isa isa);
// Whether this binary has the path and this CPU (and OS) can run it.
bool isa_supported(Isa isa);
// The paths this CPU can run, best first, as a comma-separated list of names.
std::string supported_isa_names();
// The path the kernels use; the first call reads TIKE_CPU_ISA and throws
// std::runtime_error (the same one on every later call) when it names a path that is
// unknown or that this CPU cannot run.
Isa active_isa();

}  // namespace tike::cpu
