#include "loom/parallel/pipeline_schedule.h"

#include <fmt/format.h>

#include <algorithm>
#include <limits>
#include <map>

#include "loom/core/error.h"

namespace loom::parallel::pipeline {

const char* pass_name(Pass p) {
  switch (p) {
    case Pass::kForward:
      return "F";
    case Pass::kBackward:
      return "B";
    case Pass::kWeight:
      return "W";
  }
  return "?";
}

std::string Action::str() const {
  return chunk == 0 ? fmt::format("{}{}", pass_name(pass), microbatch)
                    : fmt::format("{}{}.{}", pass_name(pass), microbatch, chunk);
}

const char* schedule_name(ScheduleKind k) {
  switch (k) {
    case ScheduleKind::kAllForwardAllBackward:
      return "afab";
    case ScheduleKind::k1F1B:
      return "1f1b";
    case ScheduleKind::kInterleaved1F1B:
      return "interleaved";
    case ScheduleKind::kZeroBubbleH1:
      return "zb-h1";
  }
  return "?";
}

ScheduleKind parse_schedule(const std::string& name) {
  for (auto k : {ScheduleKind::kAllForwardAllBackward, ScheduleKind::k1F1B,
                 ScheduleKind::kInterleaved1F1B, ScheduleKind::kZeroBubbleH1}) {
    if (name == schedule_name(k)) return k;
  }
  LOOM_THROW(ErrorKind::kConfig,
             "parallel.pp_schedule = '{}' is not a schedule; use afab, 1f1b, interleaved or zb-h1",
             name);
}

ScheduleOptions schedule_from_config(const config::ParallelConfig& par, int stages) {
  const int vp = par.virtual_pp();
  LOOM_CHECK_CONFIG(vp >= 1, "field 'parallel.virtual_pp' must be >= 1, got {}", vp);
  LOOM_CHECK_CONFIG(
      vp == 1 || stages > 1,
      "field 'parallel.virtual_pp' = {} interleaves model chunks over pipeline ranks and needs "
      "parallel.pp > 1 (got pp = {})",
      vp, stages);
  ScheduleOptions o;
  o.kind = !par.pp_schedule().empty()
               ? parse_schedule(par.pp_schedule())
               : (vp > 1 ? ScheduleKind::kInterleaved1F1B : ScheduleKind::k1F1B);
  o.stages = stages;
  o.chunks = vp;
  o.group = par.pp_microbatch_group();
  return o;
}

void check_options(const ScheduleOptions& o) {
  LOOM_CHECK_CONFIG(o.stages >= 1, "parallel.pp = {}: the pipeline needs at least one stage",
                    o.stages);
  LOOM_CHECK_CONFIG(o.microbatches >= 1,
                    "the pipeline needs at least one micro-batch per step, got {}", o.microbatches);
  LOOM_CHECK_CONFIG(o.chunks >= 1, "parallel.virtual_pp = {}: at least one model chunk per rank",
                    o.chunks);
  if (o.kind != ScheduleKind::kInterleaved1F1B) {
    LOOM_CHECK_CONFIG(
        o.chunks == 1,
        "parallel.virtual_pp = {} model chunks per rank need parallel.pp_schedule = interleaved "
        "(the {} schedule runs one chunk per rank)",
        o.chunks, schedule_name(o.kind));
    return;
  }
  const int g = o.group > 0 ? o.group : o.stages;
  LOOM_CHECK_CONFIG(
      o.microbatches >= o.stages,
      "the interleaved schedule needs at least parallel.pp = {} micro-batches per step, got {} "
      "(raise the global batch or lower the micro-batch size)",
      o.stages, o.microbatches);
  LOOM_CHECK_CONFIG(
      g >= o.stages && g <= o.microbatches,
      "parallel.pp_microbatch_group = {} must lie in [parallel.pp, micro-batches] = [{}, {}]: a "
      "chunk runs that many micro-batches in a row",
      g, o.stages, o.microbatches);
  // Megatron-Core's rule, and the simulator finds the same: a last group of fewer than p
  // micro-batches leaves a chunk waiting on work that is ordered after it (e.g. p 4, v 3, m 5, g 4
  // deadlocks).
  const int last = o.microbatches % g;
  LOOM_CHECK_CONFIG(
      last == 0 || last >= o.stages,
      "the interleaved schedule's last group would hold {} micro-batches ({} % "
      "parallel.pp_microbatch_group {}), fewer than parallel.pp = {}: use a number of "
      "micro-batches whose remainder is 0 or at least {}",
      last, o.microbatches, g, o.stages, o.stages);
}

namespace {

Action F(int mb, int chunk = 0) { return {Pass::kForward, mb, chunk}; }
Action B(int mb, int chunk = 0) { return {Pass::kBackward, mb, chunk}; }
Action W(int mb, int chunk = 0) { return {Pass::kWeight, mb, chunk}; }

Table afab(const ScheduleOptions& o) {
  Table t;
  for (int i = 0; i < o.microbatches; ++i) t.push_back(F(i));
  for (int i = 0; i < o.microbatches; ++i) t.push_back(B(i));
  return t;
}

Table one_f_one_b(const ScheduleOptions& o, int rank) {
  const int m = o.microbatches;
  const int warm = std::min(o.stages - rank - 1, m);
  Table t;
  for (int i = 0; i < warm; ++i) t.push_back(F(i));
  for (int i = 0; i < m - warm; ++i) {
    t.push_back(F(warm + i));
    t.push_back(B(i));
  }
  for (int i = m - warm; i < m; ++i) t.push_back(B(i));
  return t;
}

// Megatron-Core's get_schedule_table: (micro-batch, chunk) of the k-th forward.
std::vector<std::pair<int, int>> interleaved_order(int m, int v, int g) {
  std::vector<std::pair<int, int>> order;
  for (int lo = 0; lo < m; lo += g) {
    const int hi = lo + g >= m ? m : lo + g;  // the last group takes whatever is left
    for (int c = 0; c < v; ++c) {
      for (int mb = lo; mb < hi; ++mb) order.emplace_back(mb, c);
    }
    if (hi == m) break;
  }
  return order;
}

Table interleaved(const ScheduleOptions& o, int rank) {
  const int m = o.microbatches, v = o.chunks, p = o.stages;
  const int g = o.group > 0 ? o.group : p;
  const auto order = interleaved_order(m, v, g);
  const int total = m * v;
  const int warm = std::min((p - rank - 1) * 2 + (v - 1) * g, total);
  auto fwd = [&](int k) { return F(order[k].first, order[k].second); };
  auto bwd = [&](int k) { return B(order[k].first, v - 1 - order[k].second); };
  Table t;
  for (int k = 0; k < warm; ++k) t.push_back(fwd(k));
  for (int k = 0; k < total - warm; ++k) {
    t.push_back(fwd(warm + k));
    t.push_back(bwd(k));
  }
  for (int k = total - warm; k < total; ++k) t.push_back(bwd(k));
  return t;
}

// 1F1B's order of F and B with a W after each B, except that the first min(r, m - w) steady-state
// B passes of rank r leave theirs for the end.
Table zb_h1(const ScheduleOptions& o, int rank) {
  const int m = o.microbatches;
  const int steady = m - std::min(o.stages - rank - 1, m);
  Table t;
  int next_w = 0, backwards = 0;
  for (const Action& a : one_f_one_b(o, rank)) {
    t.push_back(a);
    if (a.pass != Pass::kBackward) continue;
    const int i = backwards++;
    if (i >= steady || i >= rank) t.push_back(W(next_w++));
  }
  while (next_w < m) t.push_back(W(next_w++));
  return t;
}

}  // namespace

Table build_table(const ScheduleOptions& o, int rank) {
  check_options(o);
  LOOM_CHECK(rank >= 0 && rank < o.stages, "pipeline rank {} outside [0, {})", rank, o.stages);
  switch (o.kind) {
    case ScheduleKind::kAllForwardAllBackward:
      return afab(o);
    case ScheduleKind::k1F1B:
      return one_f_one_b(o, rank);
    case ScheduleKind::kInterleaved1F1B:
      return interleaved(o, rank);
    case ScheduleKind::kZeroBubbleH1:
      return zb_h1(o, rank);
  }
  LOOM_THROW(ErrorKind::kInternal, "unknown schedule kind {}", static_cast<int>(o.kind));
}

std::vector<Table> build_tables(const ScheduleOptions& o) {
  std::vector<Table> tables;
  for (int r = 0; r < o.stages; ++r) tables.push_back(build_table(o, r));
  return tables;
}

void check_table(const ScheduleOptions& o, int rank, const Table& t) {
  // Position of each pass of each (micro-batch, chunk); -1 = not seen.
  const int m = o.microbatches, v = o.chunks;
  std::vector<int> pos(static_cast<size_t>(3 * m * v), -1);
  auto slot = [&](const Action& a) {
    return (static_cast<int>(a.pass) * m + a.microbatch) * v + a.chunk;
  };
  for (size_t i = 0; i < t.size(); ++i) {
    const Action& a = t[i];
    LOOM_CHECK_KIND(
        ErrorKind::kInternal, a.microbatch >= 0 && a.microbatch < m && a.chunk >= 0 && a.chunk < v,
        "{} schedule, rank {}: action {} at {} names a micro-batch or chunk outside {} x {}",
        schedule_name(o.kind), rank, a.str(), i, m, v);
    LOOM_CHECK_KIND(
        ErrorKind::kInternal, a.pass != Pass::kWeight || o.split_backward(),
        "{} schedule, rank {}: W pass {} in a schedule that does not split the backward",
        schedule_name(o.kind), rank, a.str());
    int& p = pos[static_cast<size_t>(slot(a))];
    LOOM_CHECK_KIND(ErrorKind::kInternal, p < 0,
                    "{} schedule, rank {}: {} appears twice (positions {} and {})",
                    schedule_name(o.kind), rank, a.str(), p, i);
    p = static_cast<int>(i);
  }
  for (int mb = 0; mb < m; ++mb) {
    for (int c = 0; c < v; ++c) {
      const int f = pos[static_cast<size_t>(slot(F(mb, c)))];
      const int b = pos[static_cast<size_t>(slot(B(mb, c)))];
      const int w = pos[static_cast<size_t>(slot(W(mb, c)))];
      LOOM_CHECK_KIND(ErrorKind::kInternal, f >= 0 && b >= 0,
                      "{} schedule, rank {}: {} or {} is missing", schedule_name(o.kind), rank,
                      F(mb, c).str(), B(mb, c).str());
      LOOM_CHECK_KIND(ErrorKind::kInternal, f < b,
                      "{} schedule, rank {}: {} at {} before its forward at {}",
                      schedule_name(o.kind), rank, B(mb, c).str(), b, f);
      if (o.split_backward()) {
        LOOM_CHECK_KIND(ErrorKind::kInternal, w > b,
                        "{} schedule, rank {}: {} at {} is not after its B at {}",
                        schedule_name(o.kind), rank, W(mb, c).str(), w, b);
      }
    }
  }
}

int warmup_forwards(const Table& t) {
  int n = 0;
  for (const Action& a : t) {
    if (a.pass != Pass::kForward) break;
    ++n;
  }
  return n;
}

double Simulation::bubble_fraction() const {
  if (makespan <= 0 || busy.empty()) return 0;
  double sum = 0;
  for (double b : busy) sum += b;
  return 1.0 - sum / (static_cast<double>(busy.size()) * makespan);
}

Simulation simulate(const ScheduleOptions& o, const std::vector<Table>& tables,
                    const PassCosts& c) {
  const int p = o.stages, v = o.chunks, m = o.microbatches;
  const int S = p * v;
  LOOM_CHECK(static_cast<int>(tables.size()) == p, "simulate: {} tables for {} stages",
             tables.size(), p);
  constexpr double kNotYet = std::numeric_limits<double>::infinity();
  // End time of each pass of each (micro-batch, virtual stage).
  std::vector<double> done(static_cast<size_t>(3 * m * S), kNotYet);
  auto at = [&](Pass pass, int mb, int s) -> double& {
    return done[static_cast<size_t>((static_cast<int>(pass) * m + mb) * S + s)];
  };
  Simulation sim;
  sim.busy.assign(p, 0.0);
  sim.peak_in_flight.assign(p, 0);
  sim.spans.assign(p, {});
  std::vector<size_t> next(p, 0);
  std::vector<double> free_at(p, 0.0);
  std::vector<int> in_flight(p, 0);
  size_t remaining = 0;
  for (const auto& t : tables) remaining += t.size();
  while (remaining > 0) {
    // Start, among the ranks whose next pass is ready, the one that can start earliest (ties:
    // lowest rank). Each start only depends on earlier ends, so the order of starts is consistent.
    int best = -1;
    double best_start = kNotYet;
    for (int r = 0; r < p; ++r) {
      if (next[r] >= tables[r].size()) continue;
      const Action& a = tables[r][next[r]];
      const int s = a.chunk * p + r;
      double ready = 0;
      if (a.pass == Pass::kForward) {
        ready = s > 0 ? at(Pass::kForward, a.microbatch, s - 1) + c.p2p : 0.0;
      } else if (a.pass == Pass::kBackward) {
        ready = at(Pass::kForward, a.microbatch, s);
        if (s < S - 1) ready = std::max(ready, at(Pass::kBackward, a.microbatch, s + 1) + c.p2p);
      } else {
        ready = at(Pass::kBackward, a.microbatch, s);
      }
      if (ready == kNotYet) continue;
      const double start = std::max(ready, free_at[r]);
      if (start < best_start) {
        best_start = start;
        best = r;
      }
    }
    if (best < 0) {
      std::string stuck;
      for (int r = 0; r < p; ++r) {
        if (next[r] < tables[r].size())
          stuck += fmt::format(" rank {} waits at {};", r, tables[r][next[r]].str());
      }
      LOOM_THROW(ErrorKind::kInternal, "{} schedule (p {}, v {}, m {}) deadlocks:{}",
                 schedule_name(o.kind), p, v, m, stuck);
    }
    const Action& a = tables[best][next[best]++];
    const double cost = a.pass == Pass::kForward    ? c.forward
                        : a.pass == Pass::kBackward ? c.backward
                                                    : c.weight;
    const double end = best_start + cost;
    at(a.pass, a.microbatch, a.chunk * p + best) = end;
    free_at[best] = end;
    sim.busy[best] += cost;
    sim.spans[best].emplace_back(best_start, end);
    const Pass last = o.split_backward() ? Pass::kWeight : Pass::kBackward;
    if (a.pass == Pass::kForward)
      sim.peak_in_flight[best] = std::max(sim.peak_in_flight[best], ++in_flight[best]);
    if (a.pass == last) --in_flight[best];
    sim.makespan = std::max(sim.makespan, end);
    --remaining;
  }
  return sim;
}

double theoretical_bubble(const ScheduleOptions& o, const PassCosts& c) {
  const double p = o.stages, m = o.microbatches, v = o.chunks;
  switch (o.kind) {
    case ScheduleKind::kAllForwardAllBackward:
    case ScheduleKind::k1F1B:
      return (p - 1) / (m + p - 1);
    case ScheduleKind::kInterleaved1F1B:
      return (p - 1) / (v * m + p - 1);
    case ScheduleKind::kZeroBubbleH1: {
      const double step = c.forward + c.backward + c.weight;
      const double bubble = (p - 1) * (c.forward + c.backward - c.weight);
      return bubble / (m * step + bubble);
    }
  }
  return 0;
}

std::string format_tables(const std::vector<Table>& tables) {
  std::string out;
  for (size_t r = 0; r < tables.size(); ++r) {
    out += fmt::format("rank {}:", r);
    for (const Action& a : tables[r]) out += " " + a.str();
    if (r + 1 < tables.size()) out += "\n";
  }
  return out;
}

}  // namespace loom::parallel::pipeline
