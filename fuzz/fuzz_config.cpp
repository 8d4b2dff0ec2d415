// The config parser and validator: any text is a config or a loom::Error (kConfig naming the
// field), never a crash, a hang or another exception. Each line is also tried as a --set override.
#include <sstream>

#include "loom/core/config.h"
#include "loom/core/error.h"
#include "loom/core/logging.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const bool quiet = [] {
    loom::log::logger().set_level(spdlog::level::off);
    return true;
  }();
  (void)quiet;
  const std::string text(reinterpret_cast<const char*>(data), size);
  loom::config::JobConfig job;
  try {
    loom::config::parse_text(text, "fuzz", &job);
    loom::config::validate(job);
    loom::config::JobConfig again;
    loom::config::parse_text(loom::config::to_text(job), "round trip", &again);
  } catch (const loom::Error&) {
  }
  std::istringstream lines(text);
  std::string line;
  while (std::getline(lines, line)) {
    loom::config::JobConfig j;
    try {
      loom::config::apply_override(line, &j);
      loom::config::validate(j);
    } catch (const loom::Error&) {
    }
  }
  return 0;
}
