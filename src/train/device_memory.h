// GPU allocator statistics, from LibTorch's CUDA caching allocator. Built from
// device_memory_cuda.cpp with a CUDA LibTorch, else from device_memory_none.cpp (no CUDA device can
// exist: returns 0).
#pragma once

#include <cstdint>

namespace loom::train::detail {
int64_t cuda_peak_allocated(int device);
void cuda_reset_peak(int device);
// Free memory on the device (cudaMemGetInfo), < 0 on failure.
double cuda_free_memory(int device);
}  // namespace loom::train::detail
