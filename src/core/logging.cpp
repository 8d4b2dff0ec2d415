#include "loom/core/logging.h"

#include <spdlog/sinks/basic_file_sink.h>
#include <spdlog/sinks/stdout_color_sinks.h>

#include <cstdlib>
#include <filesystem>
#include <mutex>

#include "loom/core/error.h"

namespace loom::log {
namespace {

struct State {
  std::mutex mu;
  std::shared_ptr<spdlog::logger> logger;
  // Replaced loggers stay alive: logger() hands out references that another thread may still hold.
  std::vector<std::shared_ptr<spdlog::logger>> retired;
  LogOptions options;
  std::string coords;
  std::string file;
};

State& state() {
  static State* s = new State();  // never destroyed: loggers may be used from static destructors
  return *s;
}

std::string make_pattern(int rank, const std::string& coords) {
  std::string prefix = rank >= 0 ? fmt::format("r{}", rank) : std::string("r?");
  if (!coords.empty()) prefix += " " + coords;
  // [time] [level] [r3 tp1 cp0 dp1 pp0] message
  return "[%Y-%m-%d %H:%M:%S.%e] [%^%l%$] [" + prefix + "] %v";
}

std::shared_ptr<spdlog::logger> build(const LogOptions& o, const std::string& coords,
                                      std::string* file_out) {
  std::vector<spdlog::sink_ptr> sinks;
  auto console = std::make_shared<spdlog::sinks::stderr_color_sink_mt>();
  // Rank 0 (or every rank, if asked) prints everything; the other ranks print only warnings and
  // errors, so that a watchdog report or a failure on rank 37 reaches the console too.
  if (o.rank > 0 && !o.all_ranks_to_console) console->set_level(spdlog::level::warn);
  sinks.push_back(console);
  std::string dir = o.dir;
  if (const char* env = std::getenv("LOOM_LOG_DIR"); env && *env) dir = env;
  file_out->clear();
  if (!dir.empty()) {
    std::error_code ec;
    std::filesystem::create_directories(dir, ec);
    LOOM_CHECK_KIND(ErrorKind::kIO, !ec, "cannot create log directory '{}': {}", dir, ec.message());
    *file_out = (std::filesystem::path(dir) / fmt::format("rank-{}.log", std::max(o.rank, 0))).string();
    sinks.push_back(std::make_shared<spdlog::sinks::basic_file_sink_mt>(*file_out, /*truncate=*/true));
  }
  auto lg = std::make_shared<spdlog::logger>("loom", sinks.begin(), sinks.end());
  lg->set_pattern(make_pattern(o.rank, coords));
  lg->set_level(parse_level(o.level));
  lg->flush_on(spdlog::level::warn);
  return lg;
}

}  // namespace

spdlog::level::level_enum parse_level(const std::string& name) {
  static const std::pair<const char*, spdlog::level::level_enum> kLevels[] = {
      {"trace", spdlog::level::trace}, {"debug", spdlog::level::debug},
      {"info", spdlog::level::info},   {"warn", spdlog::level::warn},
      {"warning", spdlog::level::warn}, {"error", spdlog::level::err},
      {"critical", spdlog::level::critical}, {"off", spdlog::level::off}};
  for (const auto& [n, l] : kLevels) {
    if (name == n) return l;
  }
  LOOM_THROW(ErrorKind::kConfig,
             "unknown log level '{}' (expected trace, debug, info, warn, error, critical or off)",
             name);
}

void init(const LogOptions& options) {
  auto& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  auto lg = build(options, s.coords, &s.file);
  if (s.logger) {
    s.logger->flush();
    s.retired.push_back(s.logger);
  }
  s.options = options;
  s.logger = std::move(lg);
}

void set_rank(int rank) {
  auto& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  s.options.rank = rank;
  if (s.logger) s.logger->set_pattern(make_pattern(rank, s.coords));
}

void set_coordinates(const std::string& coords) {
  auto& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  s.coords = coords;
  if (s.logger) s.logger->set_pattern(make_pattern(s.options.rank, coords));
}

spdlog::logger& logger() {
  auto& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  if (!s.logger) s.logger = build(s.options, s.coords, &s.file);
  return *s.logger;
}

std::string log_file() {
  auto& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  return s.file;
}

}  // namespace loom::log
