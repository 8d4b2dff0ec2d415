// Command-line parsing shared by Loom's programs:
//   prog [--config FILE.pbtxt] [--set a.b.c=value ...] [--<flag> value ...] [--help]
// Unknown flags, missing values and values that do not parse are errors that name the flag.
#pragma once

#include <functional>
#include <map>
#include <string>
#include <vector>

namespace loom::cli {

struct Flag {
  std::string name;           // without the leading "--"
  std::string default_value;  // as text
  std::string help;
  bool is_switch = false;     // takes no value; "true" when given
};

class CommandLine {
 public:
  // Parses argv; `flags` are the program's own flags besides --config, --set and --help.
  CommandLine(int argc, const char* const* argv, std::vector<Flag> flags, std::string description);

  bool help_requested() const { return help_; }
  // Prints usage() to stdout and returns true when --help was given: `if (cl.handled_help()) return 0;`
  bool handled_help() const;
  std::string usage() const;
  const std::string& config_path() const { return config_path_; }
  const std::vector<std::string>& overrides() const { return overrides_; }

  std::string get(const std::string& name) const;
  int64_t get_int(const std::string& name) const;
  double get_double(const std::string& name) const;
  bool get_bool(const std::string& name) const;
  // Byte sizes with an optional K/M/G suffix (powers of 1024): "8", "64K", "64M".
  int64_t get_bytes(const std::string& name) const;
  // A comma list: "a,b,c".
  std::vector<std::string> get_list(const std::string& name) const;

 private:
  const Flag& find(const std::string& name) const;
  std::string program_;
  std::string description_;
  std::vector<Flag> flags_;
  std::map<std::string, std::string> values_;
  std::string config_path_;
  std::vector<std::string> overrides_;
  bool help_ = false;
};

// The body of a program's main(): runs `body` and turns a loom::Error into "<program>: <message>"
// on stderr and `error_status`.
int guarded_main(const char* program, const std::function<int()>& body, int error_status = 1);

}  // namespace loom::cli
