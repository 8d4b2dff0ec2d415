// FlightRecorder: a ring buffer of the most recent communication operations of this process, and a
// watchdog thread that reports an operation that has not finished within its timeout.
//
// [Note: collective timeouts] A blocking MPI call cannot time out by itself, and a collective in
// which one rank never arrives hangs every other rank forever. So every operation is recorded here
// when it starts and marked when it ends; the watchdog wakes up a few times a second, and an
// operation in flight for longer than its timeout makes it log the rank, the communicator, the
// operation, its sequence number and bytes, plus the recent history, and then call the abort
// handler (MPI_Abort by default), so mpirun ends the whole job with that message instead of
// hanging. Async operations are checked by their own Work::wait(timeout), or by the watchdog when
// their backend gives it a thread-safe completion query (NCCL events).
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "loom/comm/desync.h"
#include "loom/comm/types.h"

namespace loom::comm {

class FlightRecorder {
 public:
  struct Entry {
    uint64_t id = 0;   // process-wide, increasing
    std::string comm;  // communicator name
    std::string key;   // name and world ranks: unique in the job (Note: desync report)
    int64_t seq = 0;   // per communicator; collectives and p2p count apart
    OpKind kind = OpKind::kBarrier;
    int64_t bytes = 0;
    std::string detail;  // dtype, peer, ...
    std::chrono::steady_clock::time_point start;
    double seconds = -1;            // < 0 while in flight
    double timeout_s = 0;           // 0: not watched
    std::function<bool()> is_done;  // optional thread-safe completion query
  };

  // The process's recorder (one per process, like the rank in error messages).
  static FlightRecorder& instance();

  // `key` identifies the communicator in the job (its name and world ranks, `members`).
  uint64_t start(const std::string& comm, const std::string& key, const std::vector<int>& members,
                 int64_t seq, OpKind kind, int64_t bytes, std::string detail, double timeout_s,
                 std::function<bool()> is_done = nullptr);
  void finish(uint64_t id);
  // Attaches a thread-safe completion query to an entry after it started (NCCL: an event query).
  // The watchdog then marks the entry done itself when the query says so, and times it out if not.
  void set_is_done(uint64_t id, std::function<bool()> is_done);

  // The last `n` entries, oldest first, one per line.
  std::string dump(size_t n = 32) const;
  std::vector<Entry> in_flight() const;

  // Drops the progress kept for `key` (a new communicator takes the key over).
  void forget(const std::string& key);
  // This process's progress on communicator `key`, for a peer's desync report.
  PeerProgress progress(const std::string& key) const;
  // The operation of entry `id` and its communicator's key; nullopt once the entry is overwritten.
  std::optional<std::pair<std::string, StuckOp>> op_of(uint64_t id) const;

  // Watchdog: started on first use by a communicator with watchdog enabled; stopped at exit.
  void ensure_watchdog();
  // What to do after the report; default: log and abort the job. Tests replace it.
  void set_abort_handler(std::function<void(const std::string& report)> handler);

  ~FlightRecorder();

 private:
  FlightRecorder();
  void watchdog_loop();
  void mark_done(Entry& e, std::chrono::steady_clock::time_point now);
  void mark_progress_done(uint64_t id, std::chrono::steady_clock::time_point now);

  struct CommProgress {
    std::vector<int> members;
    int64_t last_seq = -1;
    OpKind last_kind = OpKind::kBarrier;
    uint64_t last_id = 0;  // entry of the last operation
    bool last_done = false;
    std::chrono::steady_clock::time_point last_time;  // start, or end once done
  };

  static constexpr size_t kCapacity = 256;
  mutable std::mutex mu_;
  std::vector<Entry> ring_;  // kCapacity slots, indexed by id % kCapacity
  uint64_t next_id_ = 1;
  std::unordered_map<std::string, CommProgress> progress_;
  // Collectives in flight by entry id: their key and operation, also once the ring slot is reused.
  std::unordered_map<uint64_t, std::pair<std::string, StuckOp>> in_flight_ops_;
  std::chrono::steady_clock::time_point last_end_;  // of any operation (or the recorder's start)
  std::function<void(const std::string&)> abort_handler_;
  std::thread watchdog_;
  std::atomic<bool> stop_{false};
  std::condition_variable cv_;
  bool fired_ = false;
};

}  // namespace loom::comm
