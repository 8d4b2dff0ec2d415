#include "loom/core/error.h"

#include <atomic>

namespace loom {
namespace {
std::atomic<int> g_process_rank{-1};

std::string location_prefix(int rank, const char* file, int line) {
  // Keep only the path from the project's top folder on, so messages are short but unambiguous.
  std::string f = file ? file : "?";
  for (const char* top : {"/src/", "/include/", "/tests/", "/benchmarks/", "/examples/"}) {
    auto pos = f.rfind(top);
    if (pos != std::string::npos) {
      f = f.substr(pos + 1);
      break;
    }
  }
  if (rank >= 0) return fmt::format("[rank {}] {}:{}: ", rank, f, line);
  return fmt::format("{}:{}: ", f, line);
}
}  // namespace

const char* error_kind_name(ErrorKind kind) {
  switch (kind) {
    case ErrorKind::kInternal: return "internal error";
    case ErrorKind::kValue: return "value error";
    case ErrorKind::kConfig: return "config error";
    case ErrorKind::kIO: return "I/O error";
    case ErrorKind::kComm: return "communication error";
    case ErrorKind::kTimeout: return "timeout";
    case ErrorKind::kCuda: return "CUDA error";
    case ErrorKind::kNumerics: return "numerical error";
    case ErrorKind::kUnsupported: return "unsupported";
  }
  return "error";
}

Error::Error(ErrorKind kind, const char* file, int line, const std::string& message)
    : std::runtime_error(location_prefix(process_rank(), file, line) + error_kind_name(kind) +
                         ": " + message),
      kind_(kind),
      message_(message),
      file_(file),
      line_(line),
      rank_(process_rank()) {}

void set_process_rank(int rank) { g_process_rank.store(rank); }
int process_rank() { return g_process_rank.load(); }

namespace detail {
void throw_error(ErrorKind kind, const char* file, int line, const std::string& message) {
  throw Error(kind, file, line, message);
}
}  // namespace detail
}  // namespace loom
