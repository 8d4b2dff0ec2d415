// Built with a CUDA LibTorch only.
#include "loom/comm/cuda_stream_glue.h"

#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAStream.h>

namespace loom::comm::glue {

bool torch_has_cuda() { return true; }

cudaStream_t current_stream(int device) {
  return c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device)).stream();
}

void record_stream(const at::Tensor& tensor, cudaStream_t stream) {
  if (!tensor.defined() || !tensor.is_cuda()) return;
  auto s = c10::cuda::getStreamFromExternal(stream, tensor.device().index());
  c10::cuda::CUDACachingAllocator::recordStream(tensor.storage().data_ptr(), s);
}

}  // namespace loom::comm::glue
