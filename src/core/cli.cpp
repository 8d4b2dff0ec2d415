#include "loom/core/cli.h"

#include <cstdio>

#include <cerrno>
#include <cstdlib>
#include <sstream>

#include "loom/core/error.h"

namespace loom::cli {

CommandLine::CommandLine(int argc, const char* const* argv, std::vector<Flag> flags,
                         std::string description)
    : program_(argc > 0 ? argv[0] : "loom"),
      description_(std::move(description)),
      flags_(std::move(flags)) {
  for (const auto& f : flags_) values_[f.name] = f.default_value;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    LOOM_CHECK_CONFIG(arg.rfind("--", 0) == 0,
                      "unexpected argument '{}' (flags start with --; see --help)", arg);
    std::string name = arg.substr(2);
    std::string value;
    bool has_inline = false;
    if (auto eq = name.find('='); eq != std::string::npos && name.rfind("set", 0) != 0) {
      value = name.substr(eq + 1);
      name = name.substr(0, eq);
      has_inline = true;
    }
    if (name == "help" || name == "h") {
      help_ = true;
      continue;
    }
    auto next_value = [&](const std::string& flag) {
      if (has_inline) return value;
      LOOM_CHECK_CONFIG(i + 1 < argc, "flag --{} needs a value", flag);
      return std::string(argv[++i]);
    };
    if (name == "config") {
      config_path_ = next_value("config");
    } else if (name == "set") {
      overrides_.push_back(next_value("set"));
    } else if (name.rfind("set=", 0) == 0) {
      overrides_.push_back(name.substr(4));
    } else {
      const Flag& f = find(name);
      values_[name] = f.is_switch && !has_inline ? "true" : next_value(name);
    }
  }
}

const Flag& CommandLine::find(const std::string& name) const {
  for (const auto& f : flags_) {
    if (f.name == name) return f;
  }
  std::string known = "--config, --set, --help";
  for (const auto& f : flags_) known += ", --" + f.name;
  LOOM_THROW(ErrorKind::kConfig, "unknown flag --{} (known: {})", name, known);
}

std::string CommandLine::usage() const {
  std::ostringstream os;
  os << "usage: " << program_ << " [--config FILE.pbtxt] [--set a.b.c=value ...]";
  for (const auto& f : flags_) os << " [--" << f.name << (f.is_switch ? "" : " V") << "]";
  os << "\n\n" << description_ << "\n\n";
  os << "  --config FILE     job config in protobuf text format\n";
  os << "  --set a.b.c=V     override one config field (repeatable)\n";
  for (const auto& f : flags_) {
    os << "  --" << f.name << std::string(f.name.size() < 16 ? 16 - f.name.size() : 1, ' ')
       << f.help << (f.default_value.empty() ? "" : " (default " + f.default_value + ")") << "\n";
  }
  return os.str();
}

std::string CommandLine::get(const std::string& name) const {
  find(name);
  return values_.at(name);
}

int64_t CommandLine::get_int(const std::string& name) const {
  std::string v = get(name);
  errno = 0;
  char* end = nullptr;
  long long x = std::strtoll(v.c_str(), &end, 10);
  LOOM_CHECK_CONFIG(!v.empty() && errno == 0 && *end == '\0', "flag --{} expects an integer, got '{}'",
                    name, v);
  return x;
}

double CommandLine::get_double(const std::string& name) const {
  std::string v = get(name);
  errno = 0;
  char* end = nullptr;
  double x = std::strtod(v.c_str(), &end);
  LOOM_CHECK_CONFIG(!v.empty() && errno == 0 && *end == '\0', "flag --{} expects a number, got '{}'",
                    name, v);
  return x;
}

bool CommandLine::get_bool(const std::string& name) const {
  std::string v = get(name);
  if (v == "true" || v == "1") return true;
  if (v == "false" || v == "0" || v.empty()) return false;
  LOOM_THROW(ErrorKind::kConfig, "flag --{} expects true or false, got '{}'", name, v);
}

int64_t CommandLine::get_bytes(const std::string& name) const {
  std::string v = get(name);
  LOOM_CHECK_CONFIG(!v.empty(), "flag --{} expects a size, got ''", name);
  int64_t mult = 1;
  char suffix = v.back();
  if (suffix == 'K' || suffix == 'k') mult = 1LL << 10;
  if (suffix == 'M' || suffix == 'm') mult = 1LL << 20;
  if (suffix == 'G' || suffix == 'g') mult = 1LL << 30;
  std::string digits = mult == 1 ? v : v.substr(0, v.size() - 1);
  errno = 0;
  char* end = nullptr;
  long long x = std::strtoll(digits.c_str(), &end, 10);
  LOOM_CHECK_CONFIG(!digits.empty() && errno == 0 && *end == '\0' && x >= 0,
                    "flag --{} expects a size such as 8, 64K or 64M, got '{}'", name, v);
  return x * mult;
}

std::vector<std::string> CommandLine::get_list(const std::string& name) const {
  std::vector<std::string> out;
  std::stringstream ss(get(name));
  std::string item;
  while (std::getline(ss, item, ',')) {
    if (!item.empty()) out.push_back(item);
  }
  return out;
}

int guarded_main(const char* program, const std::function<int()>& body, int error_status) {
  try {
    return body();
  } catch (const Error& e) {
    std::fprintf(stderr, "%s: %s\n", program, e.what());
    return error_status;
  }
}

bool CommandLine::handled_help() const {
  if (help_) std::printf("%s", usage().c_str());
  return help_;
}

}  // namespace loom::cli
