// [Note: stop signals]
// A scheduler pre-empts a job with SIGTERM (Kubernetes, Slurm's default) or a chosen early signal
// (Slurm's --signal=USR1@120), then kills it after a grace period. While a StopSignals object
// lives, SIGTERM and SIGUSR1 only set a flag; the Trainer asks the whole job at the end of every
// step whether any rank got one (one tiny all-reduce: a scheduler may signal some ranks only), and
// if so every rank finishes the step, writes a checkpoint (when train.checkpoint_dir is set) and
// fit() returns. The time from the signal to the end is therefore at most one step plus one
// checkpoint write; the grace period must exceed that. A second signal while stopping restores the
// default action, so it ends the process at once.
#pragma once

namespace loom::train {

inline constexpr long long kRepeatWindowNs = 10'000'000'000LL;

class StopSignals {
 public:
  StopSignals();   // installs the handlers (SIGTERM, SIGUSR1)
  ~StopSignals();  // restores the previous ones
  StopSignals(const StopSignals&) = delete;
  StopSignals& operator=(const StopSignals&) = delete;

  // The signal received since install (0: none).
  static int received();
  // For tests: behaves as if `signal` had been received.
  static void raise_for_test(int signal);
  static void reset();
};

}  // namespace loom::train
