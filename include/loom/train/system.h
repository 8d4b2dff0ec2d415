// What the trainer measures about the machine: the GEMM ceiling (for MFU when no peak is given),
// memory, the BLAS in use, and host-allocator tuning.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <string>

namespace loom::train {

// Achieved FLOP/s of an n x n x n matmul in `dtype` on `device`: median of `reps` timed runs after
// a warm-up. This is the ceiling MFU is measured against when train.peak_tflops is not given.
double probe_matmul_flops(at::Device device, at::ScalarType dtype, int64_t n = 1024, int reps = 5);

struct MemoryStats {
  int64_t rss = 0;          // resident set size now (bytes)
  int64_t peak_rss = 0;     // high-water mark of the RSS
  int64_t device_peak = 0;  // GPU allocator peak (CUDA LibTorch only; 0 otherwise)
};
// `device`: a CUDA device also reports its caching allocator's peak (since the last reset).
MemoryStats memory_stats(at::Device device = at::kCPU);
void reset_device_peak(at::Device device);

// "OpenBLAS 0.3.21 (core Haswell, OPENBLAS_CORETYPE unset), 2 threads" or what is known.
// Warns separately (warn_if_blas_forced) when OPENBLAS_CORETYPE is set, which can halve GEMM speed.
std::string blas_description();
bool blas_core_forced();

// [Note: host allocator]
// First touch of fresh memory costs ~10 us per 4 KiB page here, and glibc hands every block above
// its mmap threshold (at most 32 MiB) back to the kernel on free, so a tensor allocated anew each
// step pays the page faults every step. This turns glibc's mmap path off and its trimming down, so
// freed blocks stay in the heap and are reused. Process-wide; the trainer calls it when
// train.tune_host_allocator is true (the default). Returns false if glibc refused.
bool tune_host_allocator();

// The device `train.device` names ("cpu", "cuda", "cuda:N"); "cuda" is the GPU whose index is the
// process's local rank under mpirun/srun/torchrun. kConfig / kUnsupported errors name the field.
at::Device resolve_device(const std::string& name);

std::string format_bytes(double bytes);
std::string format_duration(double seconds);

}  // namespace loom::train
