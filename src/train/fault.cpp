#include "loom/train/fault.h"

#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <sstream>
#include <thread>

#include "loom/core/env.h"
#include "loom/core/error.h"
#include "loom/core/logging.h"

namespace loom::train {

namespace {
constexpr const char* kVar = "LOOM_FAULT_INJECT";

int64_t parse_int(const std::string& key, const std::string& v, int64_t min) {
  size_t used = 0;
  int64_t x = 0;
  try {
    x = std::stoll(v, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  LOOM_CHECK_CONFIG(used == v.size() && !v.empty() && x >= min,
                    "{}: '{}={}' needs an integer >= {}", kVar, key, v, min);
  return x;
}
}  // namespace

FaultInjection FaultInjection::parse(const std::string& spec) {
  FaultInjection f;
  bool have_rank = false, have_step = false, have_kind = false;
  std::stringstream ss(spec);
  std::string item;
  while (std::getline(ss, item, ',')) {
    const size_t eq = item.find('=');
    LOOM_CHECK_CONFIG(eq != std::string::npos,
                      "{}='{}': '{}' is not key=value (keys: rank, step, kind)", kVar, spec, item);
    const std::string key = item.substr(0, eq), value = item.substr(eq + 1);
    if (key == "rank") {
      f.rank = static_cast<int>(parse_int(key, value, 0));
      have_rank = true;
    } else if (key == "step") {
      f.step = parse_int(key, value, 1);
      have_step = true;
    } else if (key == "kind") {
      if (value == "exit") {
        f.kind = Kind::kExit;
      } else if (value == "hang") {
        f.kind = Kind::kHang;
      } else if (value == "stop") {
        f.kind = Kind::kStop;
      } else if (value == "slow") {
        f.kind = Kind::kSlow;
      } else if (value == "error") {
        f.kind = Kind::kError;
      } else {
        LOOM_THROW(ErrorKind::kConfig, "{}: kind '{}' is not one of exit, hang, stop, slow, error",
                   kVar, value);
      }
      have_kind = true;
    } else {
      LOOM_THROW(ErrorKind::kConfig, "{}='{}': unknown key '{}' (keys: rank, step, kind)", kVar,
                 spec, key);
    }
  }
  LOOM_CHECK_CONFIG(have_rank && have_step && have_kind,
                    "{}='{}' needs rank=, step= and kind=", kVar, spec);
  return f;
}

std::optional<FaultInjection> FaultInjection::from_env() {
  auto v = env::get(kVar);
  if (!v || v->empty()) return std::nullopt;
  return parse(*v);
}

void FaultInjection::maybe_trigger(int world_rank, int64_t current_step) const {
  if (world_rank != rank) return;
  if (kind == Kind::kSlow ? current_step < step : current_step != step) return;
  switch (kind) {
    case Kind::kExit:
      LOOM_LOG_ERROR("fault injection ({}): rank {} exits at step {}", kVar, rank, step);
      log::logger().flush();
      std::fflush(nullptr);
      std::_Exit(17);
    case Kind::kHang:
      LOOM_LOG_ERROR("fault injection ({}): rank {} stops responding at step {}", kVar, rank, step);
      log::logger().flush();
      for (;;) std::this_thread::sleep_for(std::chrono::hours(1));
    case Kind::kStop:
      LOOM_LOG_ERROR("fault injection ({}): rank {} stops itself (SIGSTOP) at step {}", kVar, rank,
                     step);
      log::logger().flush();
      std::fflush(nullptr);
      std::raise(SIGSTOP);
      for (;;) std::this_thread::sleep_for(std::chrono::hours(1));  // if continued (SIGCONT)
    case Kind::kSlow:
      if (current_step == step) {
        LOOM_LOG_WARN("fault injection ({}): rank {} is 0.2 s slower per step from step {}", kVar,
                      rank, step);
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
      return;
    case Kind::kError:
      LOOM_THROW(ErrorKind::kInternal, "fault injection ({}): rank {} fails at step {}", kVar, rank,
                 step);
  }
}

}  // namespace loom::train
