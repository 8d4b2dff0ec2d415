// RMSNorm forward. One block per row; each thread accumulates a strided part of sum(x^2) in fp32,
// the block reduces it with warp shuffles, then every thread normalises its part of the row.
#include <cuda_bf16.h>

#include "loom_kernels/rmsnorm.h"

namespace loom::kernels {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16(v); }

__device__ float block_sum(float v) {
  __shared__ float warp_sums[kThreads / 32];
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  v = threadIdx.x < kThreads / 32 ? warp_sums[threadIdx.x] : 0.f;
  if (warp == 0) {
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    if (lane == 0) warp_sums[0] = v;
  }
  __syncthreads();
  return warp_sums[0];
}

template <typename T>
__global__ void rmsnorm_forward_kernel(const T* __restrict__ x, const T* __restrict__ w,
                                       T* __restrict__ y, float* __restrict__ rstd, int64_t hidden,
                                       float eps) {
  const int64_t row = blockIdx.x;
  const T* xr = x + row * hidden;
  T* yr = y + row * hidden;
  float ss = 0.f;
  for (int64_t i = threadIdx.x; i < hidden; i += blockDim.x) {
    float v = to_float(xr[i]);
    ss += v * v;
  }
  float r = rsqrtf(block_sum(ss) / static_cast<float>(hidden) + eps);
  if (rstd != nullptr && threadIdx.x == 0) rstd[row] = r;
  for (int64_t i = threadIdx.x; i < hidden; i += blockDim.x) {
    yr[i] = from_float<T>(to_float(xr[i]) * r * to_float(w[i]));
  }
}

}  // namespace

cudaError_t launch_rmsnorm_forward(const RmsNormArgs& a, cudaStream_t stream) {
  if (a.x == nullptr || a.weight == nullptr || a.y == nullptr || a.rows < 0 || a.hidden <= 0 ||
      a.rows > 0x7fffffffLL || !(a.eps >= 0.f)) {
    return cudaErrorInvalidValue;
  }
  if (a.rows == 0) return cudaSuccess;
  dim3 grid(static_cast<unsigned>(a.rows));
  switch (a.dtype) {
    case DType::kFloat32:
      rmsnorm_forward_kernel<float><<<grid, kThreads, 0, stream>>>(
          static_cast<const float*>(a.x), static_cast<const float*>(a.weight),
          static_cast<float*>(a.y), a.rstd, a.hidden, a.eps);
      break;
    case DType::kBFloat16:
      rmsnorm_forward_kernel<__nv_bfloat16><<<grid, kThreads, 0, stream>>>(
          static_cast<const __nv_bfloat16*>(a.x), static_cast<const __nv_bfloat16*>(a.weight),
          static_cast<__nv_bfloat16*>(a.y), a.rstd, a.hidden, a.eps);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace loom::kernels
