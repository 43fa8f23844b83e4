# Optional CUDA part. Decided from whether nvcc is found, never from whether a GPU is
# present: a GPU-less machine still builds (but cannot run) the CUDA benchmark.
# The CUDA kernels are header-only launchers (csrc/kernels/*.cuh); the benchmark .cu
# instantiates them for CMAKE_CUDA_ARCHITECTURES (default 90, i.e. H100/H200).
set(TIKE_HAVE_CUDA OFF)
if(NOT TIKE_WITH_CUDA STREQUAL "OFF")
  include(CheckLanguage)
  if(NOT DEFINED CMAKE_CUDA_COMPILER AND NOT DEFINED ENV{CUDACXX}
     AND EXISTS "/usr/local/cuda/bin/nvcc")
    # The usual toolkit location is often not on PATH.
    set(CMAKE_CUDA_COMPILER "/usr/local/cuda/bin/nvcc")
  endif()
  check_language(CUDA)
  if(CMAKE_CUDA_COMPILER)
    # Must be set before enable_language, or CMake picks the compiler's default arch.
    if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES)
      set(CMAKE_CUDA_ARCHITECTURES 90 CACHE STRING "CUDA architectures to compile for")
    endif()
    enable_language(CUDA)
    set(CMAKE_CUDA_STANDARD 17)
    set(CMAKE_CUDA_STANDARD_REQUIRED ON)
    find_package(CUDAToolkit REQUIRED)
    set(TIKE_HAVE_CUDA ON)
  elseif(TIKE_WITH_CUDA STREQUAL "ON")
    message(FATAL_ERROR "TIKE_WITH_CUDA=ON but no CUDA compiler was found "
                        "(set CMAKE_CUDA_COMPILER or CUDACXX to nvcc)")
  else()
    message(STATUS "tike: no CUDA compiler found; building the CPU part only")
  endif()
endif()

if(TIKE_HAVE_CUDA)
  add_library(tike_kernels_cuda INTERFACE)
  target_include_directories(tike_kernels_cuda INTERFACE "${PROJECT_SOURCE_DIR}/csrc")
  target_link_libraries(tike_kernels_cuda INTERFACE CUDA::cudart)
  # Same code-generation flags as setup.py's nvcc line.
  target_compile_options(tike_kernels_cuda INTERFACE
    $<$<COMPILE_LANGUAGE:CUDA>:--use_fast_math -lineinfo --expt-relaxed-constexpr>)
  message(STATUS "tike: CUDA ${CMAKE_CUDA_COMPILER_VERSION}, architectures ${CMAKE_CUDA_ARCHITECTURES}")
endif()
