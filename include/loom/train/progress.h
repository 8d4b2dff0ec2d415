// A step counter with ETA: a redrawn bar on a terminal, nothing (the log lines carry the numbers)
// when stderr is not a TTY. Mode "auto" picks by isatty(stderr); "bar" forces it; "lines"/"off"
// disable it.
#pragma once

#include <cstdint>
#include <string>

#include "loom/core/timer.h"

namespace loom::train {

class Progress {
 public:
  Progress(const std::string& mode, int64_t first_step, int64_t total_steps, bool enabled);
  // Called after each step: redraws the bar (when active).
  void update(int64_t step, const std::string& text);
  // Clears the bar's line before something else prints to the terminal; update() redraws it.
  void clear();
  void finish();
  // Starts counting again from `first_step` (a run that resumed: the ETA covers the steps left).
  void restart(int64_t first_step) {
    first_ = first_step;
    clock_.reset();
  }
  bool active() const { return active_; }
  // Estimated seconds left after `step`, from the mean step time so far.
  double eta(int64_t step) const;

 private:
  bool active_ = false;
  bool drawn_ = false;
  int64_t first_, total_;
  Stopwatch clock_;
};

}  // namespace loom::train
