#include "loom/core/env.h"

#include <cerrno>
#include <cstdlib>

#include "loom/core/error.h"

namespace loom::env {

std::optional<std::string> get(const char* name) {
  const char* v = std::getenv(name);
  if (!v) return std::nullopt;
  return std::string(v);
}

std::string get_string(const char* name, const std::string& fallback) {
  auto v = get(name);
  return v ? *v : fallback;
}

int64_t get_int(const char* name, int64_t fallback) {
  auto v = get(name);
  if (!v || v->empty()) return fallback;
  errno = 0;
  char* end = nullptr;
  long long x = std::strtoll(v->c_str(), &end, 10);
  LOOM_CHECK_CONFIG(errno == 0 && *end == '\0',
                    "environment variable {}='{}' is not an integer", name, *v);
  return x;
}

double get_double(const char* name, double fallback) {
  auto v = get(name);
  if (!v || v->empty()) return fallback;
  errno = 0;
  char* end = nullptr;
  double x = std::strtod(v->c_str(), &end);
  LOOM_CHECK_CONFIG(errno == 0 && *end == '\0', "environment variable {}='{}' is not a number",
                    name, *v);
  return x;
}

bool get_bool(const char* name, bool fallback) {
  auto v = get(name);
  if (!v || v->empty()) return fallback;
  for (const char* t : {"1", "true", "yes", "on", "TRUE", "True"}) {
    if (*v == t) return true;
  }
  for (const char* f : {"0", "false", "no", "off", "FALSE", "False"}) {
    if (*v == f) return false;
  }
  LOOM_THROW(ErrorKind::kConfig, "environment variable {}='{}' is not a boolean (1/0, true/false)",
             name, *v);
}

std::optional<int64_t> first_int(std::initializer_list<const char*> names) {
  for (const char* n : names) {
    if (get(n)) return get_int(n, 0);
  }
  return std::nullopt;
}

}  // namespace loom::env
