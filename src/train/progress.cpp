#include "loom/train/progress.h"

#include <fmt/format.h>
#include <unistd.h>

#include <cstdio>

#include "loom/core/error.h"
#include "loom/train/system.h"

namespace loom::train {

Progress::Progress(const std::string& mode, int64_t first_step, int64_t total_steps, bool enabled)
    : first_(first_step), total_(total_steps) {
  LOOM_CHECK_CONFIG(mode == "auto" || mode == "bar" || mode == "lines" || mode == "off",
                    "field 'train.progress' must be auto, bar, lines or off, got '{}'", mode);
  active_ = enabled && (mode == "bar" || (mode == "auto" && isatty(fileno(stderr)) == 1));
}

double Progress::eta(int64_t step) const {
  const int64_t done = step - first_;
  if (done <= 0) return -1;
  return clock_.seconds() / static_cast<double>(done) * static_cast<double>(total_ - step);
}

void Progress::update(int64_t step, const std::string& text) {
  if (!active_) return;
  constexpr int kWidth = 30;
  const double frac = total_ > 0 ? static_cast<double>(step) / static_cast<double>(total_) : 1.0;
  const int filled = static_cast<int>(frac * kWidth);
  std::string bar(static_cast<size_t>(filled), '#');
  bar.resize(kWidth, '.');
  std::fprintf(stderr, "\r\033[K[%s] %lld/%lld %3.0f%% ETA %s | %s", bar.c_str(),
               static_cast<long long>(step), static_cast<long long>(total_), frac * 100.0,
               format_duration(eta(step)).c_str(), text.c_str());
  std::fflush(stderr);
  drawn_ = true;
}

void Progress::clear() {
  if (active_ && drawn_) {
    std::fprintf(stderr, "\r\033[K");
    std::fflush(stderr);
    drawn_ = false;
  }
}

void Progress::finish() {
  if (active_ && drawn_) {
    std::fprintf(stderr, "\n");
    drawn_ = false;
  }
}

}  // namespace loom::train
