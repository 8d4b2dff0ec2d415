#include "loom/core/trace.h"

#include <fmt/format.h>

#include <mutex>
#include <thread>
#include <unordered_map>
#include <vector>

#include "loom/core/error.h"
#include "loom/core/fs.h"

namespace loom::trace {
namespace {

struct Event {
  char phase;  // 'X' complete, 'b'/'e' async begin/end
  const char* category;
  std::string name;
  int64_t ts_us;
  int64_t dur_us;
  uint64_t tid;
  uint64_t id;  // async pair
  std::string args;
};

struct Recorder {
  std::atomic<bool> on{false};
  std::mutex mu;
  std::vector<Event> events;
  std::unordered_map<std::thread::id, uint64_t> tids;
  uint64_t next_async = 1;
  int rank = 0;
  std::string label;
  // steady -> system clock (microseconds since the epoch): the ranks' files line up.
  int64_t offset_us = 0;

  uint64_t tid_locked() {
    auto [it, inserted] = tids.try_emplace(std::this_thread::get_id(), tids.size());
    return it->second;
  }
  int64_t us(Clock::time_point t) const {
    return std::chrono::duration_cast<std::chrono::microseconds>(t.time_since_epoch()).count() +
           offset_us;
  }
};

Recorder& recorder() {
  static Recorder r;
  return r;
}

// JSON string body (quotes and control characters escaped).
std::string escape(const std::string& s) {
  std::string out;
  out.reserve(s.size());
  for (char c : s) {
    switch (c) {
      case '"':
        out += "\\\"";
        break;
      case '\\':
        out += "\\\\";
        break;
      case '\n':
        out += "\\n";
        break;
      case '\t':
        out += "\\t";
        break;
      default:
        if (static_cast<unsigned char>(c) < 0x20) {
          out += fmt::format("\\u{:04x}", static_cast<int>(c));
        } else {
          out += c;
        }
    }
  }
  return out;
}

}  // namespace

bool on() { return recorder().on.load(std::memory_order_relaxed); }

void start(int rank, const std::string& label) {
  Recorder& r = recorder();
  std::lock_guard<std::mutex> lock(r.mu);
  r.events.clear();
  r.tids.clear();
  r.rank = rank;
  r.label = label;
  const auto sys = std::chrono::duration_cast<std::chrono::microseconds>(
                       std::chrono::system_clock::now().time_since_epoch())
                       .count();
  const auto steady =
      std::chrono::duration_cast<std::chrono::microseconds>(Clock::now().time_since_epoch())
          .count();
  r.offset_us = sys - steady;
  r.tid_locked();  // the starting (main) thread is track 0
  r.on.store(true);
}

void slice(const char* category, std::string name, Clock::time_point start, Clock::time_point end,
           std::string args_json) {
  Recorder& r = recorder();
  if (!r.on.load(std::memory_order_relaxed)) return;
  std::lock_guard<std::mutex> lock(r.mu);
  const int64_t ts = r.us(start);
  r.events.push_back(Event{'X', category, std::move(name), ts, std::max<int64_t>(0, r.us(end) - ts),
                           r.tid_locked(), 0, std::move(args_json)});
}

void async_slice(const char* category, const std::string& track, std::string name,
                 Clock::time_point start, Clock::time_point end, std::string args_json) {
  Recorder& r = recorder();
  if (!r.on.load(std::memory_order_relaxed)) return;
  std::lock_guard<std::mutex> lock(r.mu);
  // One async id per slice; the name ("dp: all_reduce", the sequence number in the arguments) keeps
  // the operations of one kind on one communicator together, overlapping ones stacked.
  const uint64_t id = r.next_async++;
  const int64_t ts = r.us(start);
  const int64_t te = std::max(ts, r.us(end));
  r.events.push_back(Event{'b', category, track + ": " + name, ts, 0, 0, id, std::move(args_json)});
  r.events.push_back(Event{'e', category, track + ": " + name, te, 0, 0, id, {}});
}

size_t stop_and_write(const std::string& path) {
  Recorder& r = recorder();
  r.on.store(false);
  std::lock_guard<std::mutex> lock(r.mu);
  std::string out = "{\"displayTimeUnit\":\"ms\",\"traceEvents\":[\n";
  out += fmt::format(
      "{{\"ph\":\"M\",\"name\":\"process_name\",\"pid\":{},\"tid\":0,\"args\":{{\"name\":\"{}\"}}}}"
      ",\n"
      "{{\"ph\":\"M\",\"name\":\"process_sort_index\",\"pid\":{},\"tid\":0,\"args\":{{\"sort_"
      "index\":{}}}}}",
      r.rank, escape(r.label), r.rank, r.rank);
  for (const auto& [id, tid] : r.tids) {
    out += fmt::format(
        ",\n{{\"ph\":\"M\",\"name\":\"thread_name\",\"pid\":{},\"tid\":{},\"args\":{{\"name\":\"{}"
        "\"}}}}",
        r.rank, tid, tid == 0 ? "main" : fmt::format("thread {}", tid));
  }
  for (const auto& e : r.events) {
    const std::string args = e.args.empty() ? "" : fmt::format(",\"args\":{}", e.args);
    if (e.phase == 'X') {
      out += fmt::format(
          ",\n{{\"ph\":\"X\",\"cat\":\"{}\",\"name\":\"{}\",\"pid\":{},\"tid\":{},\"ts\":{},"
          "\"dur\":{}{}}}",
          e.category, escape(e.name), r.rank, e.tid, e.ts_us, e.dur_us, args);
    } else {
      out += fmt::format(
          ",\n{{\"ph\":\"{}\",\"cat\":\"{}\",\"name\":\"{}\",\"pid\":{},\"tid\":0,\"id\":{},\"ts\":"
          "{}{}}}",
          e.phase, e.category, escape(e.name), r.rank, e.id, e.ts_us, args);
    }
  }
  out += "\n]}\n";
  AtomicFile file(path);
  file.write(out.data(), out.size());
  file.commit();
  const size_t n = r.events.size();
  r.events.clear();
  return n;
}

Span::~Span() {
  if (!start_) return;
  try {
    slice(category_, name_ ? std::string(name_) : std::move(owned_), *start_, Clock::now());
  } catch (...) {
    // a trace never fails the work it records
  }
}

std::optional<std::pair<int64_t, int64_t>> parse_steps(const std::string& text, const char* field) {
  if (text.empty()) return std::nullopt;
  auto number = [&](const std::string& part) -> int64_t {
    size_t used = 0;
    int64_t v = -1;
    try {
      v = std::stoll(part, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    LOOM_CHECK_CONFIG(used == part.size() && !part.empty() && v >= 1,
                      "field '{}' is '{}': expected a step (>= 1) or a range 'first-last'", field,
                      text);
    return v;
  };
  const size_t dash = text.find('-');
  const int64_t a = number(text.substr(0, dash));
  const int64_t b = dash == std::string::npos ? a : number(text.substr(dash + 1));
  LOOM_CHECK_CONFIG(b >= a, "field '{}' is '{}': the last step is before the first", field, text);
  return std::make_pair(a, b);
}

}  // namespace loom::trace
