// Wall-clock timers: a Stopwatch, and Timers, a set of named accumulating timers (as Megatron's
// `timers('forward').start()`), used by the trainer to split a step into data/forward/backward/...
#pragma once

#include <chrono>
#include <map>
#include <string>

namespace loom {

// The current UTC time as "20261201-130102": names of files and folders set aside.
std::string utc_stamp();

class Stopwatch {
 public:
  using Clock = std::chrono::steady_clock;
  Stopwatch() : start_(Clock::now()) {}
  void reset() { start_ = Clock::now(); }
  double seconds() const { return std::chrono::duration<double>(Clock::now() - start_).count(); }
  double micros() const { return seconds() * 1e6; }

 private:
  Clock::time_point start_;
};

class Timers {
 public:
  struct Entry {
    double total_s = 0;  // accumulated since the last reset
    int64_t count = 0;   // start/stop pairs since the last reset
    bool running = false;
    Stopwatch::Clock::time_point started;
  };

  // Starting a running timer or stopping a stopped one is a kValue error naming the timer.
  void start(const std::string& name);
  void stop(const std::string& name);
  // Seconds accumulated by `name` (0 if it never ran); includes the running interval.
  double elapsed(const std::string& name) const;
  int64_t count(const std::string& name) const;
  void reset();
  // "forward 12.3ms | backward 25.1ms" in name order.
  std::string summary() const;
  const std::map<std::string, Entry>& entries() const { return entries_; }

 private:
  std::map<std::string, Entry> entries_;
};

// Starts a named timer and stops it at scope exit.
class ScopedTimer {
 public:
  ScopedTimer(Timers& timers, std::string name) : timers_(timers), name_(std::move(name)) {
    timers_.start(name_);
  }
  ~ScopedTimer() {
    try {
      timers_.stop(name_);
    } catch (...) {
      // destructors never throw; a stray stop was already reported by whoever caused it
    }
  }
  ScopedTimer(const ScopedTimer&) = delete;
  ScopedTimer& operator=(const ScopedTimer&) = delete;

 private:
  Timers& timers_;
  std::string name_;
};

}  // namespace loom
