// Rank-aware logging over spdlog.
//
// Every line carries the rank and, once the mesh is built, the parallel coordinates
// ("[r3 tp1 cp0 dp1 pp0]"). Rank 0 (or every rank, if asked) logs to the console, the other ranks
// only their warnings and errors; every rank logs to its own file <dir>/rank-<r>.log, so a failure
// on rank 37 can be read without interleaving.
#pragma once

#include <spdlog/spdlog.h>

#include <memory>
#include <string>

#include "loom/config.pb.h"

namespace loom::log {

struct LogOptions {
  std::string level = "info";        // trace, debug, info, warn, error, critical, off
  std::string dir;                   // empty: no files ($LOOM_LOG_DIR overrides when set)
  bool all_ranks_to_console = false;
  int rank = -1;  // -1: not known yet (printed as r?)
  int world_size = 1;

  static LogOptions from_config(const config::LoggingConfig& c, int rank, int world_size) {
    LogOptions o;
    o.level = c.level();
    o.dir = c.dir();
    o.all_ranks_to_console = c.all_ranks_to_console();
    o.rank = rank;
    o.world_size = world_size;
    return o;
  }
};

// (Re)initialises the process logger. Safe to call again, e.g. once the rank is known.
void init(const LogOptions& options);

// Sets the rank printed in every line (bootstrap calls this once the rank is known).
void set_rank(int rank);

// Sets the coordinates printed after the rank, e.g. "tp1 cp0 dp1 pp0" (mesh calls this).
void set_coordinates(const std::string& coords);

// The logger; usable before init() (console, info level, rank unknown).
spdlog::logger& logger();

// Parses a level name; throws a config error naming the bad value.
spdlog::level::level_enum parse_level(const std::string& name);

// The path of this rank's log file, empty when there is none.
std::string log_file();

}  // namespace loom::log

#define LOOM_LOG_TRACE(...) ::loom::log::logger().trace(__VA_ARGS__)
#define LOOM_LOG_DEBUG(...) ::loom::log::logger().debug(__VA_ARGS__)
#define LOOM_LOG_INFO(...) ::loom::log::logger().info(__VA_ARGS__)
#define LOOM_LOG_WARN(...) ::loom::log::logger().warn(__VA_ARGS__)
#define LOOM_LOG_ERROR(...) ::loom::log::logger().error(__VA_ARGS__)
