// RMSNorm forward: y = x / sqrt(mean(x^2) + eps) * weight, one row per token.
// CUDA only: raw pointers and an explicit stream; no framework types (STYLE.md convention 2).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace loom::kernels {

enum class DType { kFloat32, kBFloat16 };

struct RmsNormArgs {
  const void* x;       // (rows, hidden), dtype
  const void* weight;  // (hidden), dtype
  void* y;             // (rows, hidden), dtype
  float* rstd;         // (rows), fp32: 1/sqrt(mean(x^2)+eps), saved for backward; may be null
  int64_t rows;
  int64_t hidden;
  float eps;
  DType dtype;
};

// Checks its preconditions (non-null pointers, sizes), launches on `stream`, and returns the
// cudaError_t of the launch (cudaErrorInvalidValue for bad arguments).
cudaError_t launch_rmsnorm_forward(const RmsNormArgs& args, cudaStream_t stream);

}  // namespace loom::kernels
