// CUDA kernel throughput (GPU builds only): each Loom kernel against the ATen ops it replaces, and
// against the device's copy bandwidth measured in the same run (the ceiling of a memory-bound op).
//
//   kernel_bench [--rows 16384] [--hidden 4096] [--iters 200] [--json out.json]
//
// RMSNorm forward moves rows*hidden elements in and out (plus the weight once): bytes = 2 * n * size.
// Times are the mean over --iters launches after 20 warm-up launches, bracketed by device syncs.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <chrono>
#include <cstdio>
#include <functional>

#include "loom/core/cli.h"
#include "loom/core/error.h"
#include "loom/ops/functional.h"
#include "loom_kernels/rmsnorm.h"

namespace {

double time_it(const std::function<void()>& fn, int iters) {
  for (int i = 0; i < 20; ++i) fn();
  LOOM_CHECK(cudaDeviceSynchronize() == cudaSuccess, "CUDA error before timing");
  auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < iters; ++i) fn();
  LOOM_CHECK(cudaDeviceSynchronize() == cudaSuccess, "CUDA error while timing");
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / iters;
}

int run(int argc, char** argv) {
  loom::cli::CommandLine cl(argc, argv,
                            {{"rows", "16384", "rows (tokens)"},
                             {"hidden", "4096", "hidden size"},
                             {"iters", "200", "timed launches per variant"},
                             {"json", "", "also write the results as JSON here"}},
                            "Loom CUDA kernels vs ATen and the copy bandwidth, same run.");
  if (cl.handled_help()) return 0;
  LOOM_CHECK_KIND(loom::ErrorKind::kUnsupported, at::hasCUDA(), "kernel_bench needs a visible CUDA device");
  const int64_t rows = cl.get_int("rows"), hidden = cl.get_int("hidden");
  const int iters = static_cast<int>(cl.get_int("iters"));
  cudaDeviceProp prop{};
  cudaGetDeviceProperties(&prop, 0);
  std::printf("# kernel_bench on %s (%d SMs); rmsnorm [%ld x %ld]\n", prop.name, prop.multiProcessorCount,
              static_cast<long>(rows), static_cast<long>(hidden));
  std::printf("# %-22s %-5s %10s %10s %8s %8s\n", "op", "dtype", "us", "GB/s", "of copy", "vs ATen");
  nlohmann::json out = nlohmann::json::array();
  for (auto dtype : {at::kBFloat16, at::kFloat}) {
    auto opts = at::TensorOptions().device(at::kCUDA).dtype(dtype);
    const double bytes = 2.0 * static_cast<double>(rows * hidden) * static_cast<double>(c10::elementSize(dtype));
    at::Tensor x = at::randn({rows, hidden}, opts), w = at::rand({hidden}, opts) + 0.5;
    at::Tensor y = at::empty_like(x), copy_dst = at::empty_like(x);
    at::Tensor rstd = at::empty({rows}, opts.dtype(at::kFloat));
    const double t_copy = time_it([&] { copy_dst.copy_(x); }, iters);
    const double t_aten = time_it([&] { (void)loom::ops::rms_norm(x, w, 1e-5); }, iters);
    loom::kernels::RmsNormArgs a{x.data_ptr(), w.data_ptr(), y.data_ptr(), rstd.data_ptr<float>(), rows, hidden, 1e-5f,
                                 dtype == at::kFloat ? loom::kernels::DType::kFloat32 : loom::kernels::DType::kBFloat16};
    auto stream = c10::cuda::getCurrentCUDAStream();
    const double t_kernel = time_it([&] {
      LOOM_CHECK(loom::kernels::launch_rmsnorm_forward(a, stream) == cudaSuccess, "rmsnorm launch failed");
    }, iters);
    // The kernel's answer is ATen's (a benchmark of a wrong kernel is worthless).
    const double err = (y.to(at::kDouble) - loom::ops::rms_norm(x, w, 1e-5).to(at::kDouble)).norm().item<double>() /
                       loom::ops::rms_norm(x, w, 1e-5).to(at::kDouble).norm().item<double>();
    LOOM_CHECK(err < (dtype == at::kFloat ? 1e-5 : 1e-2), "rmsnorm kernel disagrees with ATen: rel err {}", err);
    const char* dn = dtype == at::kFloat ? "fp32" : "bf16";
    for (auto [name, t] : {std::pair<const char*, double>{"copy (ceiling)", t_copy},
                           {"rmsnorm ATen (ops::)", t_aten}, {"rmsnorm loom kernel", t_kernel}}) {
      std::printf("  %-22s %-5s %10.1f %10.1f %7.1f%% %8.2f\n", name, dn, t * 1e6, bytes / t / 1e9,
                  100 * t_copy / t, t_aten / t);
      out.push_back({{"op", name}, {"dtype", dn}, {"seconds", t}, {"gb_per_s", bytes / t / 1e9},
                     {"fraction_of_copy", t_copy / t}, {"speedup_vs_aten", t_aten / t}});
    }
  }
  if (!cl.get("json").empty()) {
    std::FILE* f = std::fopen(cl.get("json").c_str(), "w");
    LOOM_CHECK_KIND(loom::ErrorKind::kIO, f != nullptr, "cannot write '{}'", cl.get("json"));
    std::fputs(nlohmann::json{{"device", prop.name}, {"rows", rows}, {"hidden", hidden}, {"results", out}}.dump(2).c_str(), f);
    std::fclose(f);
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  return loom::cli::guarded_main("kernel_bench", [&] { return run(argc, argv); }, 2);
}
