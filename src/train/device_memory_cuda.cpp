#include <c10/cuda/CUDACachingAllocator.h>

#include "device_memory.h"

namespace loom::train::detail {

int64_t cuda_peak_allocated(int device) {
  const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(device);
  return stats.allocated_bytes[0].peak;  // index 0: the aggregate over pool types
}

void cuda_reset_peak(int device) { c10::cuda::CUDACachingAllocator::resetPeakStats(device); }

}  // namespace loom::train::detail
