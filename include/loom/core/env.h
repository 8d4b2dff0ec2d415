// Environment variables, read with a default and validated: a variable set to a value that does not
// parse is an error naming the variable, never silently ignored.
#pragma once

#include <optional>
#include <string>

namespace loom::env {

std::optional<std::string> get(const char* name);
std::string get_string(const char* name, const std::string& fallback);
int64_t get_int(const char* name, int64_t fallback);
double get_double(const char* name, double fallback);
bool get_bool(const char* name, bool fallback);  // 1/0, true/false, yes/no, on/off

// The first of `names` that is set, parsed as an int (e.g. the rank under several launchers).
std::optional<int64_t> first_int(std::initializer_list<const char*> names);

}  // namespace loom::env
