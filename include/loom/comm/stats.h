// Per-communicator counters: calls, bytes and seconds per operation kind, so later features can
// report their communication volume and compare it with analytical formulas.
//
// bytes: the operation's message size as nccl-tests counts it ("size"): all-reduce and broadcast the
// tensor; all-gather the gathered output; reduce-scatter the full input; all-to-all the input; send
// and recv the tensor; barrier 0.
// seconds: wall time from issue until the host observed completion (a blocking call's duration, or
// until wait() returned / is_completed() first said yes for an async one).
#pragma once

#include <array>
#include <mutex>
#include <string>

#include "loom/comm/types.h"

namespace loom::comm {

struct OpStats {
  int64_t calls = 0;
  int64_t bytes = 0;
  double seconds = 0;
};

class CommStats {
 public:
  void record(OpKind kind, int64_t bytes, double seconds);
  OpStats get(OpKind kind) const;
  OpStats total() const;
  void reset();
  // One line per kind that was used: "all_reduce calls=12 bytes=4.0MiB seconds=0.0123".
  std::string summary() const;

 private:
  mutable std::mutex mu_;
  std::array<OpStats, kNumOpKinds> stats_{};
};

}  // namespace loom::comm
