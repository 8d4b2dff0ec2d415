#include "loom/comm/desync.h"

#include <fmt/format.h>

#include <algorithm>
#include <atomic>
#include <mutex>
#include <sstream>

#include "loom/comm/flight_recorder.h"
#include "loom/core/error.h"

namespace loom::comm {
namespace {

std::mutex g_channel_mu;
std::shared_ptr<DesyncChannel> g_channel;
std::atomic<bool> g_explaining{false};

constexpr const char* kMagic = "loom-desync-1";

std::string plural_ranks(const std::vector<int>& ranks) {
  return fmt::format("world rank{} {}", ranks.size() == 1 ? "" : "s", rank_ranges(ranks));
}

}  // namespace

std::string PeerProgress::encode() const {
  return fmt::format("{}\t{}\t{}\t{}\t{}\t{:.3f}\t{:.3f}\t{}", kMagic, knows_comm ? 1 : 0, last_seq,
                     static_cast<int>(last_kind), last_done ? 1 : 0, since_last_s, idle_s,
                     in_flight);
}

std::optional<PeerProgress> PeerProgress::decode(const std::string& text) {
  std::vector<std::string> f;
  size_t pos = 0;
  while (f.size() < 7) {
    size_t tab = text.find('\t', pos);
    if (tab == std::string::npos) return std::nullopt;
    f.push_back(text.substr(pos, tab - pos));
    pos = tab + 1;
  }
  f.push_back(text.substr(pos));
  if (f[0] != kMagic) return std::nullopt;
  try {
    PeerProgress p;
    p.knows_comm = f[1] == "1";
    p.last_seq = std::stoll(f[2]);
    int kind = std::stoi(f[3]);
    if (kind < 0 || kind >= kNumOpKinds) return std::nullopt;
    p.last_kind = static_cast<OpKind>(kind);
    p.last_done = f[4] == "1";
    p.since_last_s = std::stod(f[5]);
    p.idle_s = std::stod(f[6]);
    p.in_flight = f[7];
    return p;
  } catch (const std::exception&) {
    return std::nullopt;
  }
}

std::string rank_ranges(std::vector<int> ranks) {
  std::sort(ranks.begin(), ranks.end());
  ranks.erase(std::unique(ranks.begin(), ranks.end()), ranks.end());
  std::string out;
  for (size_t i = 0; i < ranks.size();) {
    size_t j = i;
    while (j + 1 < ranks.size() && ranks[j + 1] == ranks[j] + 1) ++j;
    if (!out.empty()) out += ",";
    out += j == i ? std::to_string(ranks[i]) : fmt::format("{}-{}", ranks[i], ranks[j]);
    i = j + 1;
  }
  return out.empty() ? "(none)" : out;
}

std::string desync_report(const StuckOp& op, int self_world_rank,
                          const std::vector<std::optional<PeerProgress>>& answers, double wait_s) {
  LOOM_INTERNAL_CHECK(answers.size() == op.members.size(),
                      "desync report: {} answers for {} members", answers.size(),
                      op.members.size());
  const char* kind = op_kind_name(op.kind);
  std::vector<int> behind, mismatch, ahead, silent, waiting, finished;
  std::vector<std::string> lines;
  for (size_t i = 0; i < op.members.size(); ++i) {
    int r = op.members[i];
    if (r == self_world_rank) {
      waiting.push_back(r);
      continue;
    }
    const auto& a = answers[i];
    if (!a) {
      silent.push_back(r);
      continue;
    }
    std::string now = !a->in_flight.empty()
                          ? fmt::format("it is now in {}", a->in_flight)
                          : fmt::format(
                                "it has had no operation in flight for {:.1f} s (computing, "
                                "stuck or stopped outside communication)",
                                a->idle_s);
    if (!a->knows_comm || a->last_seq < op.seq) {
      behind.push_back(r);
      std::string last =
          !a->knows_comm ? fmt::format("it has not used '{}' yet", op.comm)
                         : fmt::format("its last operation on '{}' is {} seq={}, {} {:.1f} s ago",
                                       op.comm, op_kind_name(a->last_kind), a->last_seq,
                                       a->last_done ? "finished" : "started (still in flight)",
                                       a->since_last_s);
      lines.push_back(fmt::format("  world rank {} has not reached it: {}; {}", r, last, now));
    } else if (a->last_seq == op.seq && a->last_kind != op.kind) {
      mismatch.push_back(r);
      lines.push_back(fmt::format(
          "  world rank {} called {} as seq={} on '{}' where world rank {} called {}: the ranks "
          "issue different operations (rank-dependent control flow)",
          r, op_kind_name(a->last_kind), op.seq, op.comm, self_world_rank, kind));
    } else if (a->last_seq > op.seq) {
      ahead.push_back(r);
      lines.push_back(
          fmt::format("  world rank {} is past it: its last operation on '{}' is {} seq={}; {}", r,
                      op.comm, op_kind_name(a->last_kind), a->last_seq, now));
    } else if (a->last_done) {
      finished.push_back(r);
    } else {
      waiting.push_back(r);
    }
  }
  std::vector<std::string> summary;
  if (!behind.empty()) summary.push_back(fmt::format("{} did not reach it", plural_ranks(behind)));
  if (!mismatch.empty())
    summary.push_back(fmt::format("{} called a different operation", plural_ranks(mismatch)));
  if (!ahead.empty()) summary.push_back(fmt::format("{} went past it", plural_ranks(ahead)));
  if (!silent.empty())
    summary.push_back(
        fmt::format("{} did not answer within {:.1f} s (dead, stopped, or running "
                    "without the watchdog)",
                    plural_ranks(silent), wait_s));
  if (summary.empty()) {
    summary.push_back(
        finished.empty()
            ? "every member reached it and none finished it: the transport (network, NCCL) is "
              "stuck, or the members passed different sizes"
            : fmt::format("every member reached it and {} finished it, but world rank {} did not: "
                          "the transport (network, NCCL) is stuck, or the members passed different "
                          "sizes",
                          plural_ranks(finished), self_world_rank));
  }
  std::string out = fmt::format("desync report for {} seq={} on '{}' (world ranks {}): ", kind,
                                op.seq, op.comm, rank_ranges(op.members));
  for (size_t i = 0; i < summary.size(); ++i) out += (i ? "; " : "") + summary[i];
  constexpr size_t kMaxLines = 16;
  for (size_t i = 0; i < lines.size() && i < kMaxLines; ++i) out += "\n" + lines[i];
  if (lines.size() > kMaxLines) out += fmt::format("\n  ... and {} more", lines.size() - kMaxLines);
  if (!silent.empty()) out += fmt::format("\n  no answer: {}", plural_ranks(silent));
  if (!finished.empty()) out += fmt::format("\n  finished it: {}", plural_ranks(finished));
  out += fmt::format("\n  waiting in it: {}", plural_ranks(waiting));
  return out;
}

void set_desync_channel(std::shared_ptr<DesyncChannel> channel) {
  std::lock_guard<std::mutex> lock(g_channel_mu);
  g_channel = std::move(channel);
}

std::shared_ptr<DesyncChannel> desync_channel() {
  std::lock_guard<std::mutex> lock(g_channel_mu);
  return g_channel;
}

std::string explain_timeout(uint64_t recorder_id, double timeout_s) {
  auto op = FlightRecorder::instance().op_of(recorder_id);
  if (!desync_channel() || !op || op->second.kind == OpKind::kSend ||
      op->second.kind == OpKind::kRecv)
    return {};
  if (g_explaining.exchange(true)) return {};  // one report per process: the job is ending
  std::string report = desync_report_for(recorder_id, std::clamp(timeout_s / 10, 1.0, 10.0));
  return report.empty() ? report : "\n" + report;
}

std::string desync_report_for(uint64_t recorder_id, double wait_s) {
  auto channel = desync_channel();
  if (!channel) return {};
  auto op = FlightRecorder::instance().op_of(recorder_id);
  // Point-to-point operations pair two ranks and have no common order to compare: the caller
  // names the peer (the pipeline does).
  if (!op || op->second.kind == OpKind::kSend || op->second.kind == OpKind::kRecv ||
      op->second.members.empty())
    return {};
  std::vector<int> peers;
  for (int r : op->second.members) {
    if (r != process_rank()) peers.push_back(r);
  }
  auto raw = channel->ask(peers, op->first, wait_s);
  std::vector<std::optional<PeerProgress>> answers(op->second.members.size());
  size_t k = 0;
  for (size_t i = 0; i < op->second.members.size(); ++i) {
    if (op->second.members[i] == process_rank()) continue;
    if (k < raw.size() && raw[k]) answers[i] = PeerProgress::decode(*raw[k]);
    ++k;
  }
  return desync_report(op->second, process_rank(), answers, wait_s);
}

}  // namespace loom::comm
