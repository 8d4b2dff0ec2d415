// Desync report: when a collective times out, name the rank(s) that did not reach it.
//
// [Note: desync report] A timed-out collective on rank A only says that *some* member did not do
// its part. Like c10d's desync debug, the rank that times out asks every member of the
// communicator, over a side channel that does not need their main thread (a duplicate of the MPI
// world served by each process's watchdog thread), for its progress on that communicator: the
// sequence number and kind of the last operation it started there, whether that finished, and what
// the rank is doing now (an operation in flight on some communicator, or nothing: computing, stuck
// or stopped outside communication). Compared with the timed-out operation this names
//   - the ranks that have not reached it (the culprits; with what they are doing instead),
//   - the ranks that called a different operation at that sequence number (a desync proper),
//   - the ranks that did not answer within a few seconds (dead, stopped, or without a watchdog),
//   - or, when every member reached it and none finished, the transport.
// The report is appended to the watchdog's abort message and to Work::wait's timeout error; it is
// made once per process (the job is ending). Without a channel (no MPI) it is empty.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "loom/comm/types.h"

namespace loom::comm {

// What one rank reports about one communicator (and itself) to a peer that timed out.
struct PeerProgress {
  bool knows_comm = false;  // has started at least one operation on the communicator
  int64_t last_seq = -1;    // sequence number of the last operation started on it
  OpKind last_kind = OpKind::kBarrier;
  bool last_done = false;   // whether that operation has finished on this rank
  double since_last_s = 0;  // seconds since it started (in flight) or finished (done)
  std::string in_flight;    // the oldest operation in flight on this rank, any communicator
  double idle_s = -1;       // no operation in flight: seconds since the last one ended

  std::string encode() const;
  // nullopt for a malformed message (a peer of another version): treated as no answer.
  static std::optional<PeerProgress> decode(const std::string& text);
};

// The operation that timed out on this rank.
struct StuckOp {
  std::string comm;          // communicator name
  std::vector<int> members;  // its world ranks
  int64_t seq = 0;
  OpKind kind = OpKind::kBarrier;
};

// The report text (several lines, the first a summary naming the culprits). `answers` is indexed
// like op.members; nullopt: that rank did not answer within `wait_s`; this rank's own entry is
// ignored. Pure: unit-tested with made-up answers.
std::string desync_report(const StuckOp& op, int self_world_rank,
                          const std::vector<std::optional<PeerProgress>>& answers, double wait_s);

// "0-3,6,8-9": sorted world ranks as ranges, for groups of thousands of ranks.
std::string rank_ranges(std::vector<int> ranks);

// The side channel (MPI: a duplicate of the world communicator).
class DesyncChannel {
 public:
  virtual ~DesyncChannel() = default;
  // Answers pending questions from peers; called by the watchdog thread about ten times a second,
  // and while this rank waits for its own answers. Never blocks.
  virtual void serve() = 0;
  // Asks each world rank in `peers` for its progress on communicator `key`; waits at most `wait_s`
  // (less once every peer answered). Entries are the raw answers, nullopt for no answer.
  virtual std::vector<std::optional<std::string>> ask(const std::vector<int>& peers,
                                                      const std::string& key, double wait_s) = 0;
  // Frees the channel's resources before the runtime ends (MPI_Finalize); serve/ask do nothing
  // afterwards.
  virtual void close() = 0;
};

// The process's channel (set by Bootstrap under MPI; null otherwise).
void set_desync_channel(std::shared_ptr<DesyncChannel> channel);
std::shared_ptr<DesyncChannel> desync_channel();

// For the operation recorded as FlightRecorder entry `recorder_id`, which timed out: asks the
// members and returns the report, prefixed with a newline. Empty when there is no channel, the
// entry is gone, or another report of this process is already being made. `timeout_s` (the op's
// timeout) scales how long to wait for answers: clamp(timeout_s / 10, 1, 10) seconds.
std::string explain_timeout(uint64_t recorder_id, double timeout_s);
// The same without the once-per-process guard and prefix, waiting `wait_s` for answers (tests).
std::string desync_report_for(uint64_t recorder_id, double wait_s);

}  // namespace loom::comm
