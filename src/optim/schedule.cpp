#include "loom/optim/schedule.h"

#include <algorithm>
#include <cmath>

#include "loom/core/error.h"

namespace loom::optim {

LrSchedule::LrSchedule(const config::OptimConfig& c, int64_t total_steps)
    : kind_(c.schedule()),
      wsd_decay_(c.wsd_decay()),
      lr_(c.lr()),
      min_lr_(c.min_lr()),
      wsd_fraction_(c.wsd_decay_fraction()),
      warmup_(c.warmup_steps()) {
  LOOM_CHECK_CONFIG(c.lr() > 0, "field 'optim.lr' must be > 0, got {}", c.lr());
  LOOM_CHECK_CONFIG(c.min_lr() >= 0 && c.min_lr() <= c.lr(),
                    "field 'optim.min_lr' must be in [0, optim.lr = {}], got {}", c.lr(), c.min_lr());
  LOOM_CHECK_CONFIG(c.warmup_steps() >= 0, "field 'optim.warmup_steps' must be >= 0, got {}",
                    c.warmup_steps());
  LOOM_CHECK_CONFIG(c.decay_steps() >= 0, "field 'optim.decay_steps' must be >= 0 (0 = the rest), got {}",
                    c.decay_steps());
  LOOM_CHECK_CONFIG(c.wsd_decay_fraction() > 0 && c.wsd_decay_fraction() <= 1,
                    "field 'optim.wsd_decay_fraction' must be in (0, 1], got {}",
                    c.wsd_decay_fraction());
  decay_ = c.decay_steps() > 0 ? c.decay_steps() : std::max<int64_t>(1, total_steps - warmup_);
}

double LrSchedule::lr_at(int64_t step) const {
  constexpr double kPi = 3.14159265358979323846;
  if (step < warmup_) return lr_ * static_cast<double>(step + 1) / static_cast<double>(warmup_);
  const double t = static_cast<double>(std::min(step - warmup_, decay_));
  const double d = static_cast<double>(decay_);
  switch (kind_) {
    case config::OptimConfig::COSINE:
      return min_lr_ + (lr_ - min_lr_) * 0.5 * (1.0 + std::cos(kPi * t / d));
    case config::OptimConfig::LINEAR:
      return lr_ - (lr_ - min_lr_) * t / d;
    case config::OptimConfig::CONSTANT:
      return lr_;
    case config::OptimConfig::WSD: {
      const double phase = std::max(1.0, std::round(wsd_fraction_ * d));
      const double start = d - phase;
      if (t < start) return lr_;
      const double progress = std::min(1.0, (t - start) / phase);
      double factor = 1.0 - progress;  // WSD_LINEAR
      if (wsd_decay_ == config::OptimConfig::WSD_SQRT) factor = 1.0 - std::sqrt(progress);
      if (wsd_decay_ == config::OptimConfig::WSD_COSINE) factor = 0.5 * (1.0 + std::cos(kPi * progress));
      return min_lr_ + (lr_ - min_lr_) * factor;
    }
  }
  LOOM_THROW(ErrorKind::kInternal, "unknown LR schedule {}", static_cast<int>(kind_));
}

}  // namespace loom::optim
