// Learning-rate schedules. `lr_at(step)` is the rate for optimizer step `step` (0-based: the first
// update uses lr_at(0)). With W warm-up steps, D decay steps after warm-up, peak L, floor m:
//   warm-up (step < W):   L * (step + 1) / W
//   COSINE:   m + (L - m) * (1 + cos(pi * min(t, D) / D)) / 2,       t = step - W
//   LINEAR:   L - (L - m) * min(t, D) / D
//   CONSTANT: L
//   WSD:      L until the last f * D steps of the decay span, then from L to m over f * D steps
//             (linear, 1 - sqrt, or cosine in the progress of that phase); m afterwards.
#pragma once

#include <cstdint>

#include "loom/config.pb.h"

namespace loom::optim {

class LrSchedule {
 public:
  // `total_steps` is train.steps (decay_steps defaults to total_steps - warmup_steps).
  LrSchedule(const config::OptimConfig& c, int64_t total_steps);
  double lr_at(int64_t step) const;

 private:
  config::OptimConfig::Schedule kind_;
  config::OptimConfig::WsdDecay wsd_decay_;
  double lr_, min_lr_, wsd_fraction_;
  int64_t warmup_, decay_;
};

}  // namespace loom::optim
