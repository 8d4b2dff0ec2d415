// Traces: a Chrome trace-event JSON file per rank (opens in ui.perfetto.dev and chrome://tracing)
// of chosen training steps.
//
// [Note: traces] logging.trace_steps = "a-b" makes every rank record, for steps a..b, one slice per
//   - step, and its phases (the trainer's timers: data, comm, optimizer),
//   - pipeline pass: forward, backward and deferred weight-gradient work per micro-batch and chunk
//     (one stage without pipeline parallelism), and the waits for a peer stage's tensors,
//   - communication operation: each collective and p2p batch from its call to its completion as
//     seen by the host (MPI: the data is there; NCCL: wait() ordered the stream), as an async slice
//     named "<communicator>: <kind>" with its sequence number and bytes as arguments,
// and writes them to <trace_dir>/rank-<r>.steps-<a>-<b>.json when step b ends. Timestamps are
// microseconds of the system clock, so the ranks' files line up when their traceEvents are merged
// into one file (`pid` is the rank). Recording off costs one relaxed atomic
// load per would-be slice.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <utility>

namespace loom::trace {

using Clock = std::chrono::steady_clock;

// Whether slices are being recorded now.
bool on();

// Starts recording (clears what was recorded); `rank` and `label` name the process in the trace.
void start(int rank, const std::string& label);
// Stops recording and writes the JSON file (atomically, fsynced); returns the number of slices.
size_t stop_and_write(const std::string& path);

// A slice on the thread's track (they must nest, as a scope's do). `category`: "step", "phase",
// "compute", "pipeline", "data".
void slice(const char* category, std::string name, Clock::time_point start, Clock::time_point end,
           std::string args_json = {});
// A slice on a track of its own named `track` (may overlap others: async communication).
void async_slice(const char* category, const std::string& track, std::string name,
                 Clock::time_point start, Clock::time_point end, std::string args_json = {});

// Records [construction, destruction) as a slice when tracing is on.
class Span {
 public:
  Span(const char* category, const char* name) : category_(category), name_(name) {
    if (on()) start_ = Clock::now();
  }
  template <typename NameFn>
  Span(const char* category, NameFn&& make_name, int) : category_(category) {
    if (on()) {
      owned_ = make_name();
      start_ = Clock::now();
    }
  }
  ~Span();
  Span(const Span&) = delete;
  Span& operator=(const Span&) = delete;

 private:
  const char* category_;
  const char* name_ = nullptr;
  std::string owned_;
  std::optional<Clock::time_point> start_;
};

// "5" -> (5, 5), "5-7" -> (5, 7); "" -> nullopt. kConfig error naming `field` otherwise.
std::optional<std::pair<int64_t, int64_t>> parse_steps(const std::string& text, const char* field);

}  // namespace loom::trace
