// Built when LibTorch has no CUDA (Debian's libtorch-dev): the NCCL backend links, but there can be
// no CUDA tensors to hand it, so asking for a stream is a clear error.
#include "loom/comm/cuda_stream_glue.h"

#include "loom/core/error.h"

namespace loom::comm::glue {

bool torch_has_cuda() { return false; }

cudaStream_t current_stream(int) {
  LOOM_THROW(ErrorKind::kUnsupported,
             "backend nccl needs a CUDA LibTorch; this build links a CPU-only LibTorch");
}

void record_stream(const at::Tensor&, cudaStream_t) {
  LOOM_THROW(ErrorKind::kUnsupported,
             "backend nccl needs a CUDA LibTorch; this build links a CPU-only LibTorch");
}

}  // namespace loom::comm::glue
