#include "loom/comm/work.h"

#include <fmt/format.h>

#include <atomic>
#include <thread>

#include "loom/comm/desync.h"
#include "loom/comm/flight_recorder.h"
#include "loom/core/error.h"
#include "loom/core/trace.h"

namespace loom::comm {

namespace {
std::atomic<bool> g_timed_out{false};
}  // namespace

bool Work::process_timed_out() { return g_timed_out.load(); }

Work::Work(Info info, std::shared_ptr<CommStats> stats)
    : info_(std::move(info)), stats_(std::move(stats)) {}

Work::~Work() = default;

std::string Work::describe() const {
  return fmt::format("{} #{} on communicator '{}' ({} bytes)", op_kind_name(info_.kind), info_.seq,
                     info_.comm, info_.bytes);
}

bool Work::block(std::chrono::steady_clock::time_point deadline) {
  // Spin briefly (latency), then yield (an oversubscribed rank must let its peers run).
  for (int i = 0; i < 1000; ++i) {
    if (test()) return true;
  }
  while (std::chrono::steady_clock::now() < deadline) {
    if (test()) return true;
    std::this_thread::yield();
  }
  return test();
}

void Work::wait(Milliseconds timeout) {
  if (completed_) return;
  double timeout_s = timeout == kDefaultTimeout ? info_.default_timeout_s : timeout.count() / 1e3;
  auto deadline = std::chrono::steady_clock::now() +
                  std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                      std::chrono::duration<double>(timeout_s));
  if (!test() && !block(deadline)) {
    g_timed_out = true;
    LOOM_THROW(ErrorKind::kTimeout, "{} did not complete within {:.3f} s; recent operations:\n{}{}",
               describe(), timeout_s, FlightRecorder::instance().dump(16),
               explain_timeout(info_.recorder_id, timeout_s));
  }
  on_complete_wait();
  complete();
}

bool Work::is_completed() {
  if (completed_) return true;
  if (!test()) return false;
  complete();
  return true;
}

void Work::complete() {
  completed_ = true;
  for (auto& fn : finalizers_) fn();
  finalizers_.clear();
  const auto now = std::chrono::steady_clock::now();
  double seconds = std::chrono::duration<double>(now - info_.start).count();
  if (trace::on()) {  // Note: traces
    trace::async_slice("comm", info_.comm, op_kind_name(info_.kind), info_.start, now,
                       fmt::format("{{\"seq\":{},\"bytes\":{}}}", info_.seq, info_.bytes));
  }
  if (stats_) stats_->record(info_.kind, info_.bytes, seconds);
  if (info_.recorder_id && ends_record_on_wait())
    FlightRecorder::instance().finish(info_.recorder_id);
}

namespace {
// The parts keep their own stats and recorder entries; the combination only forwards.
Work::Info combined_info(const std::vector<WorkPtr>& works) {
  Work::Info info = works.empty() ? Work::Info{} : works.front()->info();
  info.recorder_id = 0;
  return info;
}

class CombinedWork final : public Work {
 public:
  explicit CombinedWork(std::vector<WorkPtr> works)
      : Work(combined_info(works), nullptr), works_(std::move(works)) {}

 protected:
  bool test() override {
    bool all = true;
    for (auto& w : works_) all = w->is_completed() && all;
    return all;
  }
  bool block(std::chrono::steady_clock::time_point deadline) override {
    for (auto& w : works_) {
      auto left =
          std::chrono::duration_cast<Milliseconds>(deadline - std::chrono::steady_clock::now());
      w->wait(std::max(left, Milliseconds(0)));
    }
    return true;
  }

 private:
  std::vector<WorkPtr> works_;
};
}  // namespace

WorkPtr combine_work(std::vector<WorkPtr> works) {
  return std::make_shared<CombinedWork>(std::move(works));
}

}  // namespace loom::comm
