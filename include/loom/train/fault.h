// Fault injection, for tests of how a job ends when one rank fails (LOOM_FAULT_INJECT).
//
//   LOOM_FAULT_INJECT="rank=R,step=S,kind=K"
// makes world rank R fail during training step S (1-based) just before its first backward of the
// step; with pipeline parallelism that is mid-schedule: the other stages have sent activations and
// are waiting for gradients. K is
//   exit   the process ends at once with status 17, without MPI_Finalize (as a crash would);
//   hang   the process stops responding (sleeps until killed), as a stuck kernel or NIC would;
//   stop   the whole process is stopped (SIGSTOP: every thread, the watchdog too), as a node that
//          stalls would;
//   slow   the rank sleeps 0.2 s before its first backward of step S and of every later step, as
//          a slow node would (straggler detection);
//   error  a loom::Error is thrown on that rank only, which the launcher turns into an abort.
// Unset: no fault. A malformed value is a kConfig error naming the variable and the bad part.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

namespace loom::train {

struct FaultInjection {
  enum class Kind { kExit, kHang, kStop, kSlow, kError };
  int rank = 0;
  int64_t step = 1;
  Kind kind = Kind::kError;

  static FaultInjection parse(const std::string& spec);
  static std::optional<FaultInjection> from_env();  // LOOM_FAULT_INJECT

  // Fails as configured if `rank` and `step` are the ones named; returns otherwise.
  void maybe_trigger(int world_rank, int64_t current_step) const;
};

}  // namespace loom::train
