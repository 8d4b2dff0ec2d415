#include "loom/train/system.h"

#include <ATen/Parallel.h>
#include <dlfcn.h>
#include <fmt/format.h>
#include <malloc.h>

#include <algorithm>
#include <climits>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <vector>

#include "device_memory.h"
#include "loom/core/env.h"
#include "loom/core/error.h"
#include "loom/core/timer.h"

namespace loom::train {

double probe_matmul_flops(at::Device device, at::ScalarType dtype, int64_t n, int reps) {
  auto opts = at::TensorOptions().dtype(dtype).device(device);
  at::Tensor a = at::randn({n, n}, opts.dtype(at::kFloat)).to(dtype);
  at::Tensor b = at::randn({n, n}, opts.dtype(at::kFloat)).to(dtype);
  at::Tensor c = at::empty({n, n}, opts);
  at::mm_out(c, a, b);  // warm-up (BLAS threads, pages)
  // On a GPU, several products per timing and a one-element read to wait for them: copying the
  // whole result back (as an earlier version did) timed the PCIe copy, not the product.
  const int inner = device.is_cuda() ? 20 : 1;
  auto sync = [&] {
    if (device.is_cuda()) (void)c.view(-1)[0].item<float>();
  };
  sync();
  std::vector<double> times;
  for (int i = 0; i < reps; ++i) {
    Stopwatch sw;
    for (int k = 0; k < inner; ++k) at::mm_out(c, a, b);
    sync();
    times.push_back(sw.seconds() / inner);
  }
  std::sort(times.begin(), times.end());
  const double t = times[times.size() / 2];
  return 2.0 * static_cast<double>(n) * static_cast<double>(n) * static_cast<double>(n) / t;
}

MemoryStats memory_stats(at::Device device) {
  MemoryStats m;
  if (device.is_cuda()) m.device_peak = detail::cuda_peak_allocated(device.index());
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line)) {
    auto read_kb = [&](const char* key, int64_t* out) {
      if (line.rfind(key, 0) == 0) {
        std::istringstream ss(line.substr(std::string(key).size()));
        int64_t kb = 0;
        ss >> kb;
        *out = kb * 1024;
      }
    };
    read_kb("VmRSS:", &m.rss);
    read_kb("VmHWM:", &m.peak_rss);
  }
  return m;
}

void reset_device_peak(at::Device device) {
  if (device.is_cuda()) detail::cuda_reset_peak(device.index());
}

bool blas_core_forced() { return std::getenv("OPENBLAS_CORETYPE") != nullptr; }

std::string blas_description() {
  using GetStr = char* (*)();
  using GetInt = int (*)();
  std::string s;
  if (auto config = reinterpret_cast<GetStr>(dlsym(RTLD_DEFAULT, "openblas_get_config"))) {
    s = config();
    if (auto core = reinterpret_cast<GetStr>(dlsym(RTLD_DEFAULT, "openblas_get_corename"))) {
      s += fmt::format(", core {}", core());
    }
    if (auto threads = reinterpret_cast<GetInt>(dlsym(RTLD_DEFAULT, "openblas_get_num_threads"))) {
      s += fmt::format(", {} BLAS threads", threads());
    }
  } else {
    s = "BLAS is not OpenBLAS (no openblas_get_config symbol)";
  }
  const char* forced = std::getenv("OPENBLAS_CORETYPE");
  s += fmt::format(", OPENBLAS_CORETYPE={}", forced ? forced : "unset");
  s += fmt::format(", {} intra-op threads", at::get_num_threads());
  return s;
}

bool tune_host_allocator() {
  bool ok = mallopt(M_MMAP_MAX, 0) == 1;
  ok = mallopt(M_TRIM_THRESHOLD, INT_MAX) == 1 && ok;
  ok = mallopt(M_TOP_PAD, 64 << 20) == 1 && ok;
  return ok;
}

std::string format_bytes(double bytes) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
  int u = 0;
  while (bytes >= 1024.0 && u < 6) {
    bytes /= 1024.0;
    ++u;
  }
  return fmt::format(u == 0 ? "{:.0f} {}" : "{:.2f} {}", bytes, units[u]);
}

std::string format_duration(double seconds) {
  if (seconds < 0 || seconds > 1e9) return "?";
  auto s = static_cast<int64_t>(seconds + 0.5);
  if (s < 60) return fmt::format("{}s", s);
  if (s < 3600) return fmt::format("{}m{:02d}s", s / 60, s % 60);
  return fmt::format("{}h{:02d}m", s / 3600, (s % 3600) / 60);
}

at::Device resolve_device(const std::string& name) {
  at::Device device = at::kCPU;
  try {
    device = at::Device(name);
  } catch (const std::exception&) {
    LOOM_THROW(ErrorKind::kConfig, "field 'train.device': '{}' is not a device (cpu, cuda, cuda:N)",
               name);
  }
  LOOM_CHECK_CONFIG(device.is_cpu() || device.is_cuda(),
                    "field 'train.device' must be cpu or cuda[:N], got '{}'", name);
  if (device.is_cuda()) {
    LOOM_CHECK_KIND(ErrorKind::kUnsupported, at::hasCUDA(),
                    "train.device is '{}', but this LibTorch has no CUDA (or no GPU is visible)",
                    name);
    if (!device.has_index()) {
      const auto local =
          env::first_int({"OMPI_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID", "LOCAL_RANK"});
      device = at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(local.value_or(0)));
    }
  }
  return device;
}

}  // namespace loom::train
