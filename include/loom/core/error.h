// Errors and check macros.
//
// Every failure Loom detects is thrown as a loom::Error (or a subclass naming its kind) whose message
// carries file:line, the rank of the process and, for library failures, the library's own error text.
// Library code never calls exit(); destructors never throw.
#pragma once

#include <c10/util/ArrayRef.h>
#include <fmt/format.h>

#include <stdexcept>
#include <string>

// Shapes (IntArrayRef, tensor.sizes()) print as [2, 3] in messages.
template <typename T>
struct fmt::formatter<c10::ArrayRef<T>> : fmt::formatter<std::string_view> {
  template <typename Ctx>
  auto format(const c10::ArrayRef<T>& a, Ctx& ctx) const {
    std::string s = "[";
    for (size_t i = 0; i < a.size(); ++i) s += (i ? ", " : "") + fmt::to_string(a[i]);
    s += "]";
    return fmt::formatter<std::string_view>::format(s, ctx);
  }
};

namespace loom {

// What went wrong, coarsely, so callers can catch one kind without parsing messages.
enum class ErrorKind {
  kInternal,   // a broken invariant inside Loom
  kValue,      // a bad argument or input value
  kConfig,     // a configuration field is unknown, mistyped or invalid
  kIO,         // a file is missing, unreadable or malformed
  kComm,       // a communicator or collective failed
  kTimeout,    // an operation did not finish in time
  kCuda,       // a CUDA runtime error
  kNumerics,   // a non-finite loss or gradient
  kUnsupported // a valid request this build or backend cannot serve
};

const char* error_kind_name(ErrorKind kind);

class Error : public std::runtime_error {
 public:
  Error(ErrorKind kind, const char* file, int line, const std::string& message);

  ErrorKind kind() const { return kind_; }
  const std::string& message() const { return message_; }  // without the location prefix
  const char* file() const { return file_; }
  int line() const { return line_; }
  int rank() const { return rank_; }

 private:
  ErrorKind kind_;
  std::string message_;
  const char* file_;
  int line_;
  int rank_;
};

// The rank printed in error messages and logs; -1 until bootstrap knows it. Process-wide because an
// error can be raised anywhere; it is set once, by comm::bootstrap, and read only for messages.
void set_process_rank(int rank);
int process_rank();

namespace detail {
[[noreturn]] void throw_error(ErrorKind kind, const char* file, int line, const std::string& message);

inline std::string format_message() { return "check failed"; }
template <typename... Args>
std::string format_message(fmt::format_string<Args...> f, Args&&... args) {
  return fmt::format(f, std::forward<Args>(args)...);
}
}  // namespace detail

}  // namespace loom

// LOOM_CHECK(cond, "fmt {}", args...): throws loom::Error (kValue) naming the condition.
#define LOOM_CHECK_KIND(kind, cond, ...)                                                      \
  do {                                                                                       \
    if (!(cond)) {                                                                           \
      ::loom::detail::throw_error(kind, __FILE__, __LINE__,                                 \
                                  ::loom::detail::format_message(__VA_ARGS__) +             \
                                      " [" #cond "]");                                       \
    }                                                                                        \
  } while (0)

#define LOOM_CHECK(cond, ...) LOOM_CHECK_KIND(::loom::ErrorKind::kValue, cond, __VA_ARGS__)
#define LOOM_CHECK_CONFIG(cond, ...) LOOM_CHECK_KIND(::loom::ErrorKind::kConfig, cond, __VA_ARGS__)
#define LOOM_INTERNAL_CHECK(cond, ...) \
  LOOM_CHECK_KIND(::loom::ErrorKind::kInternal, cond, __VA_ARGS__)

// LOOM_THROW(kind, "fmt {}", args...): unconditional.
#define LOOM_THROW(kind, ...) \
  ::loom::detail::throw_error(kind, __FILE__, __LINE__, ::loom::detail::format_message(__VA_ARGS__))

// LOOM_CHECK_MPI(MPI_Xxx(...)): on failure, throws kComm with the MPI error string.
#define LOOM_CHECK_MPI(call)                                                          \
  do {                                                                               \
    int loom_mpi_rc_ = (call);                                                       \
    if (loom_mpi_rc_ != 0 /* MPI_SUCCESS */) {                                       \
      ::loom::detail::throw_error(::loom::ErrorKind::kComm, __FILE__, __LINE__,     \
                                  std::string(#call " failed: ") +                   \
                                      ::loom::detail::mpi_error_string(loom_mpi_rc_)); \
    }                                                                                \
  } while (0)

// LOOM_CHECK_CUDA(cudaXxx(...)) and LOOM_CHECK_NCCL(ncclXxx(...)) live in comm/cuda_check.h, which
// needs the CUDA headers.

namespace loom::detail {
// Implemented in the MPI backend; "MPI error <code>" when built without MPI.
std::string mpi_error_string(int code);
}  // namespace loom::detail
