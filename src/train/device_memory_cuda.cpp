#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <dlfcn.h>

#include <algorithm>

#include "device_memory.h"

namespace loom::train::detail {

int64_t cuda_peak_allocated(int device) {
  const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(device);
  return stats.allocated_bytes[0].peak;  // index 0: the aggregate over pool types
}

void cuda_reset_peak(int device) { c10::cuda::CUDACachingAllocator::resetPeakStats(device); }

double cuda_free_memory(int device) {
  // cudaMemGetInfo from the CUDA runtime LibTorch already loaded (looked up, not linked: a Torch
  // package need not put libcudart on the link line).
  using MemGetInfo = int (*)(size_t*, size_t*);
  static const auto mem_get_info =
      reinterpret_cast<MemGetInfo>(::dlsym(RTLD_DEFAULT, "cudaMemGetInfo"));
  if (mem_get_info == nullptr) return -1;
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  size_t free = 0, total = 0;
  if (mem_get_info(&free, &total) != 0) return -1;
  // Memory this process's caching allocator holds but does not use is free to it too.
  const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(device);
  const double cached = static_cast<double>(stats.reserved_bytes[0].current) -
                        static_cast<double>(stats.allocated_bytes[0].current);
  return static_cast<double>(free) + std::max(0.0, cached);
}

}  // namespace loom::train::detail
