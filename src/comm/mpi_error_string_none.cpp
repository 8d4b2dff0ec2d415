// Built when Loom has no MPI backend: LOOM_CHECK_MPI still needs a definition.
#include <fmt/format.h>

#include <string>

namespace loom::detail {
std::string mpi_error_string(int code) { return fmt::format("MPI error {}", code); }
}  // namespace loom::detail
