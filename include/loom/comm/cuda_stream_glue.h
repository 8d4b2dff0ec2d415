// The only part of the NCCL backend that needs a CUDA LibTorch: the caller's current stream and the
// caching allocator's cross-stream bookkeeping. Built from cuda_stream_glue.cpp with a CUDA
// LibTorch, or from cuda_stream_glue_none.cpp (which throws kUnsupported) with a CPU one.
#pragma once

#include <ATen/ATen.h>
#include <cuda_runtime.h>

namespace loom::comm::glue {

// True when this build's LibTorch can hold CUDA tensors.
bool torch_has_cuda();
// The current CUDA stream of `device` as LibTorch sees it.
cudaStream_t current_stream(int device);
// Tells the caching allocator that `tensor` is used on `stream`, so its memory is not reused
// before the work queued there completes.
void record_stream(const at::Tensor& tensor, cudaStream_t stream);

}  // namespace loom::comm::glue
