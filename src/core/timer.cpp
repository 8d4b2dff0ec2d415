#include "loom/core/timer.h"

#include <fmt/format.h>

#include <ctime>

#include "loom/core/error.h"
#include "loom/core/trace.h"

namespace loom {

std::string utc_stamp() {
  std::time_t now = std::time(nullptr);
  std::tm tm{};
  gmtime_r(&now, &tm);
  char buf[32];
  std::strftime(buf, sizeof(buf), "%Y%m%d-%H%M%S", &tm);
  return buf;
}

void Timers::start(const std::string& name) {
  Entry& e = entries_[name];
  LOOM_CHECK(!e.running, "timer '{}' started twice without a stop", name);
  e.running = true;
  e.started = Stopwatch::Clock::now();
}

void Timers::stop(const std::string& name) {
  auto it = entries_.find(name);
  LOOM_CHECK(it != entries_.end() && it->second.running, "timer '{}' stopped but not running",
             name);
  Entry& e = it->second;
  const auto now = Stopwatch::Clock::now();
  e.total_s += std::chrono::duration<double>(now - e.started).count();
  if (trace::on()) trace::slice("phase", name, e.started, now);  // Note: traces
  e.count += 1;
  e.running = false;
}

double Timers::elapsed(const std::string& name) const {
  auto it = entries_.find(name);
  if (it == entries_.end()) return 0.0;
  double t = it->second.total_s;
  if (it->second.running) {
    t += std::chrono::duration<double>(Stopwatch::Clock::now() - it->second.started).count();
  }
  return t;
}

int64_t Timers::count(const std::string& name) const {
  auto it = entries_.find(name);
  return it == entries_.end() ? 0 : it->second.count;
}

void Timers::reset() {
  for (auto& [name, e] : entries_) {
    e.total_s = 0;
    e.count = 0;
    if (e.running) e.started = Stopwatch::Clock::now();
  }
}

std::string Timers::summary() const {
  std::string out;
  for (const auto& [name, e] : entries_) {
    if (!out.empty()) out += " | ";
    out += fmt::format("{} {:.1f}ms", name, elapsed(name) * 1e3);
  }
  return out;
}

}  // namespace loom
