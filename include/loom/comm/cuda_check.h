// LOOM_CHECK_CUDA / LOOM_CHECK_NCCL: throw loom::Error with file:line, rank and the library's text.
#pragma once

#include <cuda_runtime.h>
#include <nccl.h>

#include <string>

#include "loom/core/error.h"

#define LOOM_CHECK_CUDA(call)                                                              \
  do {                                                                                    \
    cudaError_t loom_cuda_rc_ = (call);                                                   \
    if (loom_cuda_rc_ != cudaSuccess) {                                                   \
      ::loom::detail::throw_error(::loom::ErrorKind::kCuda, __FILE__, __LINE__,          \
                                  std::string(#call " failed: ") +                        \
                                      cudaGetErrorString(loom_cuda_rc_));                 \
    }                                                                                     \
  } while (0)

#define LOOM_CHECK_NCCL(call)                                                              \
  do {                                                                                    \
    ncclResult_t loom_nccl_rc_ = (call);                                                  \
    if (loom_nccl_rc_ != ncclSuccess && loom_nccl_rc_ != ncclInProgress) {                \
      ::loom::detail::throw_error(::loom::ErrorKind::kComm, __FILE__, __LINE__,          \
                                  std::string(#call " failed: ") +                        \
                                      ncclGetErrorString(loom_nccl_rc_));                 \
    }                                                                                     \
  } while (0)
