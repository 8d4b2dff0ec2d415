// Work: the handle of an asynchronous operation (PyTorch c10d style).
//
// wait(timeout) returns once the result may be used by the caller: for MPI the buffers are complete
// on the host; for NCCL the caller's current CUDA stream is ordered after the operation (no host
// synchronisation). A timeout is a kTimeout error naming the rank, communicator, operation and its
// sequence number. Waiting twice is allowed and cheap.
#pragma once

#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "loom/comm/stats.h"
#include "loom/comm/types.h"

namespace loom::comm {

class Work {
 public:
  struct Info {
    std::string comm;  // communicator name
    int64_t seq = 0;   // per communicator; collectives and p2p count apart
    OpKind kind = OpKind::kBarrier;
    int64_t bytes = 0;
    double default_timeout_s = 600;
    uint64_t recorder_id = 0;  // FlightRecorder entry
    std::chrono::steady_clock::time_point start;
  };

  Work(Info info, std::shared_ptr<CommStats> stats);
  virtual ~Work();
  Work(const Work&) = delete;
  Work& operator=(const Work&) = delete;

  void wait(Milliseconds timeout = kDefaultTimeout);
  // Non-blocking: true once the operation has completed (and its finalisers have run).
  bool is_completed();

  // Work to run after completion, in wait(), in order (e.g. copy an fp32 accumulator back to bf16).
  void add_finalizer(std::function<void()> fn) { finalizers_.push_back(std::move(fn)); }

  const Info& info() const { return info_; }
  // "all_reduce #12 on 'tp' (4.0 MiB)" for messages.
  std::string describe() const;

  // Set once any operation of this process timed out (a peer failed or stopped responding): the
  // process is about to end, so pending operations abandoned by the unwinding are not waited for
  // again (that used to add a second timeout before the abort).
  static bool process_timed_out();

 protected:
  // Backend hooks. test(): non-blocking completion test. block(deadline): wait until complete or
  // the deadline passes; returns whether complete. on_complete_wait(): after completion, in wait()
  // (NCCL orders the current stream here).
  virtual bool test() = 0;
  virtual bool block(std::chrono::steady_clock::time_point deadline);
  virtual void on_complete_wait() {}
  // Whether completion in wait() ends the FlightRecorder entry. Device backends return false: their
  // wait() only orders streams, and the watchdog ends the entry when the device is done.
  virtual bool ends_record_on_wait() const { return true; }

 private:
  void complete();

  Info info_;
  std::shared_ptr<CommStats> stats_;
  std::vector<std::function<void()>> finalizers_;
  bool completed_ = false;
};

using WorkPtr = std::shared_ptr<Work>;

// A Work that is complete when created (what the synchronous forms return internally).
class CompletedWork final : public Work {
 public:
  using Work::Work;

 protected:
  bool test() override { return true; }
};

// Several Works seen as one: wait() waits for each in order.
WorkPtr combine_work(std::vector<WorkPtr> works);

}  // namespace loom::comm
