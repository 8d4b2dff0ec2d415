#include "loom/comm/flight_recorder.h"

#include <fmt/format.h>

#include <cstdlib>

#include "loom/core/error.h"
#include "loom/core/logging.h"

namespace loom::comm {

FlightRecorder& FlightRecorder::instance() {
  static FlightRecorder recorder;
  return recorder;
}

FlightRecorder::FlightRecorder() : ring_(kCapacity), last_end_(std::chrono::steady_clock::now()) {
  abort_handler_ = [](const std::string& report) {
    LOOM_LOG_ERROR("{}", report);
    log::logger().flush();
    std::fflush(stderr);
    // The communicator layer installs MPI_Abort here once MPI is up (bootstrap), so that mpirun
    // ends every rank; without MPI the process aborts alone.
    std::abort();
  };
}

FlightRecorder::~FlightRecorder() {
  stop_.store(true);
  cv_.notify_all();
  if (watchdog_.joinable()) watchdog_.join();
}

uint64_t FlightRecorder::start(const std::string& comm, const std::string& key,
                               const std::vector<int>& members, int64_t seq, OpKind kind,
                               int64_t bytes, std::string detail, double timeout_s,
                               std::function<bool()> is_done) {
  std::lock_guard<std::mutex> lock(mu_);
  uint64_t id = next_id_++;
  Entry& e = ring_[id % kCapacity];
  e.id = id;
  e.comm = comm;
  e.key = key;
  e.seq = seq;
  e.kind = kind;
  e.bytes = bytes;
  e.detail = std::move(detail);
  e.start = std::chrono::steady_clock::now();
  e.seconds = -1;
  e.timeout_s = timeout_s;
  e.is_done = std::move(is_done);
  if (kind == OpKind::kSend || kind == OpKind::kRecv) return id;  // collectives only
  auto [it, inserted] = progress_.try_emplace(key);
  CommProgress& p = it->second;
  if (inserted) p.members = members;
  p.last_seq = seq;
  p.last_kind = kind;
  p.last_id = id;
  p.last_done = false;
  p.last_time = e.start;
  StuckOp op;  // members: from progress_ when asked (not copied for every operation)
  op.comm = comm;
  op.seq = seq;
  op.kind = kind;
  in_flight_ops_[id] = std::make_pair(key, std::move(op));
  if (in_flight_ops_.size() > 16 * kCapacity) {
    // Abandoned or unobserved operations: keep the newest (their reports are the ones asked for).
    for (auto i = in_flight_ops_.begin(); i != in_flight_ops_.end();) {
      i = i->first + 8 * kCapacity < id ? in_flight_ops_.erase(i) : std::next(i);
    }
  }
  return id;
}

void FlightRecorder::forget(const std::string& key) {
  std::lock_guard<std::mutex> lock(mu_);
  progress_.erase(key);
}

void FlightRecorder::mark_progress_done(uint64_t id, std::chrono::steady_clock::time_point now) {
  auto op = in_flight_ops_.find(id);
  if (op == in_flight_ops_.end()) return;
  auto it = progress_.find(op->second.first);
  if (it != progress_.end() && it->second.last_id == id) {
    it->second.last_done = true;
    it->second.last_time = now;
  }
  in_flight_ops_.erase(op);
}

void FlightRecorder::mark_done(Entry& e, std::chrono::steady_clock::time_point now) {
  e.seconds = std::chrono::duration<double>(now - e.start).count();
  e.is_done = nullptr;
  last_end_ = now;
  mark_progress_done(e.id, now);
}

void FlightRecorder::finish(uint64_t id) {
  std::lock_guard<std::mutex> lock(mu_);
  Entry& e = ring_[id % kCapacity];
  const auto now = std::chrono::steady_clock::now();
  if (e.id != id) {  // the ring slot was reused: the communicator's progress still ends here
    last_end_ = now;
    mark_progress_done(id, now);
    return;
  }
  if (e.seconds >= 0) return;  // already marked by the watchdog
  mark_done(e, now);
}

void FlightRecorder::set_is_done(uint64_t id, std::function<bool()> is_done) {
  std::lock_guard<std::mutex> lock(mu_);
  Entry& e = ring_[id % kCapacity];
  if (e.id == id && e.seconds < 0) e.is_done = std::move(is_done);
}

namespace {
std::string format_entry(const FlightRecorder::Entry& e,
                         std::chrono::steady_clock::time_point now) {
  double age = std::chrono::duration<double>(now - e.start).count();
  std::string state = e.seconds < 0 ? fmt::format("IN FLIGHT for {:.3f} s", age)
                                    : fmt::format("done in {:.6f} s", e.seconds);
  return fmt::format("  #{} {} seq={} on '{}' bytes={} {} [{}]", e.id, op_kind_name(e.kind), e.seq,
                     e.comm, e.bytes, e.detail, state);
}
}  // namespace

std::string FlightRecorder::dump(size_t n) const {
  std::lock_guard<std::mutex> lock(mu_);
  auto now = std::chrono::steady_clock::now();
  std::string out;
  uint64_t last = next_id_ - 1;
  uint64_t first = last >= n ? last - n + 1 : 1;
  if (last + 1 > kCapacity && first < last + 1 - kCapacity) first = last + 1 - kCapacity;
  for (uint64_t id = first; id <= last && id > 0; ++id) {
    const Entry& e = ring_[id % kCapacity];
    if (e.id != id) continue;
    if (!out.empty()) out += "\n";
    out += format_entry(e, now);
  }
  return out.empty() ? "  (none)" : out;
}

PeerProgress FlightRecorder::progress(const std::string& key) const {
  std::lock_guard<std::mutex> lock(mu_);
  auto now = std::chrono::steady_clock::now();
  auto seconds = [&](std::chrono::steady_clock::time_point t) {
    return std::chrono::duration<double>(now - t).count();
  };
  PeerProgress out;
  auto it = progress_.find(key);
  if (it != progress_.end()) {
    const CommProgress& p = it->second;
    out.knows_comm = true;
    out.last_seq = p.last_seq;
    out.last_kind = p.last_kind;
    out.last_done = p.last_done;
    out.since_last_s = seconds(p.last_time);
  }
  const Entry* oldest = nullptr;
  for (const auto& e : ring_) {
    if (e.id != 0 && e.seconds < 0 && (!oldest || e.id < oldest->id)) oldest = &e;
  }
  if (oldest) {
    out.in_flight = fmt::format("{} seq={} on '{}' for {:.1f} s", op_kind_name(oldest->kind),
                                oldest->seq, oldest->comm, seconds(oldest->start));
  } else {
    out.idle_s = seconds(last_end_);
  }
  return out;
}

std::optional<std::pair<std::string, StuckOp>> FlightRecorder::op_of(uint64_t id) const {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = in_flight_ops_.find(id);
  if (it != in_flight_ops_.end()) {
    auto result = it->second;
    auto p = progress_.find(result.first);
    if (p != progress_.end()) result.second.members = p->second.members;
    return result;
  }
  const Entry& e = ring_[id % kCapacity];  // a point-to-point operation (or a finished one)
  if (id == 0 || e.id != id) return std::nullopt;
  StuckOp op;
  op.comm = e.comm;
  op.seq = e.seq;
  op.kind = e.kind;
  return std::make_pair(e.key, std::move(op));
}

std::vector<FlightRecorder::Entry> FlightRecorder::in_flight() const {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<Entry> out;
  for (const auto& e : ring_) {
    if (e.id != 0 && e.seconds < 0) out.push_back(e);
  }
  return out;
}

void FlightRecorder::set_abort_handler(std::function<void(const std::string&)> handler) {
  std::lock_guard<std::mutex> lock(mu_);
  abort_handler_ = std::move(handler);
}

void FlightRecorder::ensure_watchdog() {
  std::lock_guard<std::mutex> lock(mu_);
  if (watchdog_.joinable()) return;
  watchdog_ = std::thread([this] { watchdog_loop(); });
}

void FlightRecorder::watchdog_loop() {
  std::unique_lock<std::mutex> lock(mu_);
  while (!stop_.load()) {
    cv_.wait_for(lock, std::chrono::milliseconds(100));
    if (stop_.load()) continue;
    // Answer the peers' desync questions (Note: desync report), also after this rank fired: its
    // peers may be making their own reports.
    if (auto channel = desync_channel()) {
      lock.unlock();
      channel->serve();
      lock.lock();
    }
    if (fired_) continue;
    auto now = std::chrono::steady_clock::now();
    for (auto& e : ring_) {
      if (e.id == 0 || e.seconds >= 0 || e.timeout_s <= 0) continue;
      double age = std::chrono::duration<double>(now - e.start).count();
      if (e.is_done) {
        bool done = false;
        try {
          done = e.is_done();
        } catch (...) {
        }
        if (done) {
          // Device work (NCCL) ends on the device, not in Work::wait: mark it here (the time is
          // known to within one watchdog period).
          mark_done(e, now);
          continue;
        }
      }
      if (age <= e.timeout_s) continue;
      fired_ = true;
      std::string report = fmt::format(
          "[rank {}] watchdog: {} seq={} on communicator '{}' ({} bytes, {}) has not completed "
          "after {:.1f} s (timeout {:.1f} s). A peer may have died, hung, or called a different "
          "collective. Recent operations of this rank:\n",
          process_rank(), op_kind_name(e.kind), e.seq, e.comm, e.bytes, e.detail, age, e.timeout_s);
      auto handler = abort_handler_;
      uint64_t id = e.id;
      double timeout_s = e.timeout_s;
      lock.unlock();
      report += dump(32);
      report += explain_timeout(id, timeout_s);
      handler(report);
      lock.lock();
      break;
    }
  }
}

}  // namespace loom::comm
