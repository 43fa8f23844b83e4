# Static library of the torch-free CPU kernels (csrc/kernels/*_cpu.cpp), the same sources
# that setup.py compiles into the extension. Same flags as setup.py so that the benchmark
# measures the code the extension runs. No -m flags: each kernel carries its AVX-512,
# AVX2 and baseline instantiations (target attributes, csrc/kernels/cpu_simd.h) and picks
# one at run time (TIKE_CPU_ISA).
file(GLOB TIKE_CPU_KERNEL_SOURCES CONFIGURE_DEPENDS
     "${PROJECT_SOURCE_DIR}/csrc/kernels/*_cpu.cpp")
if(NOT TIKE_CPU_KERNEL_SOURCES)
  message(FATAL_ERROR "No CPU kernel sources found (csrc/kernels/*_cpu.cpp)")
endif()

add_library(tike_kernels_cpu STATIC ${TIKE_CPU_KERNEL_SOURCES})
target_include_directories(tike_kernels_cpu PUBLIC "${PROJECT_SOURCE_DIR}/csrc")
target_compile_options(tike_kernels_cpu PRIVATE
  $<$<CXX_COMPILER_ID:GNU,Clang>:-fno-math-errno -Wno-psabi -Wall -Wextra>)
set_target_properties(tike_kernels_cpu PROPERTIES POSITION_INDEPENDENT_CODE ON)
