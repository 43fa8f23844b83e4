# google-benchmark binaries. Uses the system package (Debian/Ubuntu: libbenchmark-dev),
# which installs a CMake config; pass -Dbenchmark_DIR=... for another install.
find_package(benchmark CONFIG QUIET)
if(NOT benchmark_FOUND)
  message(FATAL_ERROR
    "google-benchmark was not found, so the bench/ binaries cannot be built.\n"
    "  Install it:  sudo apt install libbenchmark-dev\n"
    "  or point CMake at an install:  -Dbenchmark_DIR=<prefix>/lib/cmake/benchmark\n"
    "  or build only the kernel library:  -DTIKE_BUILD_BENCH=OFF")
endif()
find_package(Threads REQUIRED)

add_executable(bench_cpu_kernels "${PROJECT_SOURCE_DIR}/bench/bench_cpu_kernels.cpp")
target_link_libraries(bench_cpu_kernels PRIVATE tike_kernels_cpu benchmark::benchmark
                      Threads::Threads)

if(TIKE_HAVE_CUDA)
  add_executable(bench_cuda_kernels "${PROJECT_SOURCE_DIR}/bench/bench_cuda_kernels.cu")
  target_link_libraries(bench_cuda_kernels PRIVATE tike_kernels_cuda benchmark::benchmark)
  set_target_properties(bench_cuda_kernels PROPERTIES CUDA_ARCHITECTURES "${CMAKE_CUDA_ARCHITECTURES}")
endif()
