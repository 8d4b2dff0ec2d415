#include "loom/comm/stats.h"

#include <fmt/format.h>

namespace loom::comm {

void CommStats::record(OpKind kind, int64_t bytes, double seconds) {
  std::lock_guard<std::mutex> lock(mu_);
  OpStats& s = stats_[static_cast<int>(kind)];
  s.calls += 1;
  s.bytes += bytes;
  s.seconds += seconds;
}

OpStats CommStats::get(OpKind kind) const {
  std::lock_guard<std::mutex> lock(mu_);
  return stats_[static_cast<int>(kind)];
}

OpStats CommStats::total() const {
  std::lock_guard<std::mutex> lock(mu_);
  OpStats t;
  for (const auto& s : stats_) {
    t.calls += s.calls;
    t.bytes += s.bytes;
    t.seconds += s.seconds;
  }
  return t;
}

void CommStats::reset() {
  std::lock_guard<std::mutex> lock(mu_);
  stats_.fill(OpStats{});
}

std::string CommStats::summary() const {
  std::lock_guard<std::mutex> lock(mu_);
  std::string out;
  for (int k = 0; k < kNumOpKinds; ++k) {
    const OpStats& s = stats_[k];
    if (s.calls == 0) continue;
    if (!out.empty()) out += "\n";
    out += fmt::format("{:<15} calls={:<8} bytes={:<14} seconds={:.6f}",
                       op_kind_name(static_cast<OpKind>(k)), s.calls, s.bytes, s.seconds);
  }
  return out;
}

}  // namespace loom::comm
