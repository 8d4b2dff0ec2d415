#include "loom/data/balance_scheduler.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <numeric>
#include <queue>
#include <set>

#include "loom/core/error.h"

namespace loom::data {

std::string CostModel::describe() const {
  return fmt::format("T(s) = {:.4g} s^2 + {:.4g} s + {:.4g}", a, b, c);
}

namespace {

// Least squares over the basis functions in `use` (of s^2, s, 1), s scaled by `scale`; returns
// the coefficients (0 for unused ones) and the residual sum of squares, or nullopt-like {false}
// when the normal equations are singular.
struct Fit {
  bool ok = false;
  double coef[3] = {0, 0, 0};
  double residual = 0;
};

Fit least_squares(const std::vector<std::pair<double, double>>& points, const bool use[3],
                  double scale) {
  std::vector<int> cols;
  for (int j = 0; j < 3; ++j) {
    if (use[j]) cols.push_back(j);
  }
  const auto n = static_cast<int>(cols.size());
  auto basis = [&](double x, int j) { return j == 0 ? x * x : (j == 1 ? x : 1.0); };
  // Normal equations A^T A w = A^T t, solved by Gaussian elimination with partial pivoting.
  double m[3][4] = {};
  for (const auto& [s, t] : points) {
    const double x = s / scale;
    for (int r = 0; r < n; ++r) {
      for (int q = 0; q < n; ++q) m[r][q] += basis(x, cols[r]) * basis(x, cols[q]);
      m[r][n] += basis(x, cols[r]) * t;
    }
  }
  for (int k = 0; k < n; ++k) {
    int pivot = k;
    for (int r = k + 1; r < n; ++r) {
      if (std::abs(m[r][k]) > std::abs(m[pivot][k])) pivot = r;
    }
    if (std::abs(m[pivot][k]) < 1e-300) return {};
    for (int q = 0; q <= n; ++q) std::swap(m[k][q], m[pivot][q]);
    for (int r = 0; r < n; ++r) {
      if (r == k) continue;
      const double f = m[r][k] / m[k][k];
      for (int q = k; q <= n; ++q) m[r][q] -= f * m[k][q];
    }
  }
  Fit fit;
  fit.ok = true;
  for (int r = 0; r < n; ++r) fit.coef[cols[r]] = m[r][n] / m[r][r];
  for (const auto& [s, t] : points) {
    const double x = s / scale;
    const double e = (fit.coef[0] * x + fit.coef[1]) * x + fit.coef[2] - t;
    fit.residual += e * e;
  }
  // Back to unscaled s: a x^2 = (a / scale^2) s^2, b x = (b / scale) s.
  fit.coef[0] /= scale * scale;
  fit.coef[1] /= scale;
  return fit;
}

}  // namespace

CostModel fit_cost_model(const std::vector<std::pair<double, double>>& points) {
  std::set<double> lengths;
  double scale = 0;
  for (const auto& [s, t] : points) {
    LOOM_CHECK_CONFIG(std::isfinite(s) && s > 0 && std::isfinite(t) && t >= 0,
                      "cost model: a measurement of {} s at {} tokens (tokens must be > 0, times "
                      "finite and >= 0)",
                      t, s);
    lengths.insert(s);
    scale = std::max(scale, s);
  }
  LOOM_CHECK_CONFIG(lengths.size() >= 3,
                    "cost model: fitting T(s) = a s^2 + b s + c needs measurements at 3 or more "
                    "distinct lengths, got {}",
                    lengths.size());
  // Non-negative least squares over three coefficients: the best of the subsets whose
  // unconstrained fit is non-negative (the constrained optimum is one of them).
  Fit best;
  for (int mask = 1; mask < 8; ++mask) {
    const bool use[3] = {(mask & 1) != 0, (mask & 2) != 0, (mask & 4) != 0};
    const Fit f = least_squares(points, use, scale);
    if (!f.ok || f.coef[0] < 0 || f.coef[1] < 0 || f.coef[2] < 0) continue;
    if (!best.ok || f.residual < best.residual * (1 - 1e-12)) best = f;
  }
  LOOM_CHECK_CONFIG(best.ok, "cost model: no non-negative fit through {} measurements",
                    points.size());
  return {best.coef[0], best.coef[1], best.coef[2]};
}

HdpBalance parse_hdp_balance(const std::string& name, int stages) {
  if (name.empty()) return stages > 1 ? HdpBalance::kPp : HdpBalance::kDp;
  if (name == "dp") return HdpBalance::kDp;
  if (name == "pp") return HdpBalance::kPp;
  LOOM_THROW(
      ErrorKind::kConfig,
      "parallel.hdp_balance '{}' is not a balance mode: \"dp\" (equal sums of micro-batch "
      "costs), \"pp\" (equal pipeline times) or \"\" (pp under pipeline parallelism, else dp)",
      name);
}

std::string hdp_balance_name(HdpBalance balance) {
  return balance == HdpBalance::kPp ? "pp" : "dp";
}

double HdpPlan::pipeline_cost(int rank) const {
  const auto r = static_cast<size_t>(rank);
  double most = 0;
  for (const auto& mb : ranks[r]) most = std::max(most, mb.cost);
  return rank_cost[r] + static_cast<double>(stages - 1) * most;
}

std::vector<double> median_over_ranks(const std::vector<std::vector<double>>& times) {
  LOOM_CHECK(!times.empty(), "median_over_ranks: no ranks");
  const size_t n = times.front().size();
  std::vector<double> out(n);
  std::vector<double> column(times.size());
  for (size_t i = 0; i < n; ++i) {
    for (size_t r = 0; r < times.size(); ++r) {
      LOOM_CHECK(times[r].size() == n, "median_over_ranks: rank {} has {} times, rank 0 {}", r,
                 times[r].size(), n);
      column[r] = times[r][i];
    }
    std::sort(column.begin(), column.end());
    const size_t m = column.size() / 2;
    out[i] = column.size() % 2 == 1 ? column[m] : (column[m - 1] + column[m]) / 2;
  }
  return out;
}

double HdpPlan::max_cost() const {
  return rank_cost.empty() ? 0.0 : *std::max_element(rank_cost.begin(), rank_cost.end());
}

double HdpPlan::mean_cost() const {
  return rank_cost.empty() ? 0.0
                           : std::accumulate(rank_cost.begin(), rank_cost.end(), 0.0) /
                                 static_cast<double>(rank_cost.size());
}

double HdpPlan::imbalance() const {
  const double mean = mean_cost();
  return mean > 0 ? max_cost() / mean : 1.0;
}

double ring_knee(const HdpOptions& o, double s) {
  return o.ring > 0 ? std::max(o.cost.a * s, o.cost.b) / o.ring : 1e300;
}

double ring_share(const HdpOptions& o, double s, double d) {
  if (o.ring <= 0 || d <= 1) return o.cost.share(s, d);
  return std::max(o.cost.a * s * s / d, o.ring * s) + o.cost.b * s / d + o.cost.c;
}

HdpPlan plan_hdp(const std::vector<SampleRef>& samples, const HdpOptions& o) {
  LOOM_CHECK_CONFIG(o.pool >= 1, "hybrid data parallelism: a pool of {} ranks", o.pool);
  LOOM_CHECK_CONFIG(o.capacity >= 1,
                    "hybrid data parallelism: a rank capacity of {} tokens per micro-batch (it "
                    "must be at least 1)",
                    o.capacity);
  LOOM_CHECK_CONFIG(std::isfinite(o.cost.a) && std::isfinite(o.cost.b) && std::isfinite(o.cost.c) &&
                        o.cost.a >= 0 && o.cost.b >= 0 && o.cost.c >= 0,
                    "hybrid data parallelism: the cost model {} needs finite, non-negative "
                    "coefficients",
                    o.cost.describe());
  // Costs must grow with length, or every sequence looks free and lands on one rank.
  LOOM_CHECK_CONFIG(o.cost.a > 0 || o.cost.b > 0,
                    "hybrid data parallelism: the cost model {} does not grow with the sequence's "
                    "length (a or b must be > 0)",
                    o.cost.describe());
  LOOM_CHECK_CONFIG(o.stages >= 1, "hybrid data parallelism: {} pipeline stages", o.stages);
  LOOM_CHECK_CONFIG(std::isfinite(o.ring) && o.ring >= 0,
                    "hybrid data parallelism: a ring cost of {} per token (it must be finite and "
                    ">= 0)",
                    o.ring);
  const auto pool = static_cast<size_t>(o.pool);
  const bool pp = o.balance == HdpBalance::kPp;
  const double bubble = pp ? static_cast<double>(o.stages - 1) : 0.0;
  HdpPlan plan;
  plan.stages = o.stages;
  plan.ranks.resize(pool);
  plan.rank_cost.assign(pool, 0.0);
  std::vector<int64_t> order(samples.size());
  std::iota(order.begin(), order.end(), 0);
  for (size_t i = 0; i < samples.size(); ++i) {
    LOOM_CHECK_CONFIG(samples[i].length >= 2,
                      "hybrid data parallelism: sample {} (index {}) has {} tokens; a sequence "
                      "needs at least 2",
                      i, samples[i].index, samples[i].length);
    plan.loss_tokens += samples[i].length - 1;
  }
  // Longest first; ties in batch order.
  std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) {
    return samples[static_cast<size_t>(x)].length > samples[static_cast<size_t>(y)].length;
  });
  // By balance: the ranks a sequence needs so that its share costs no more than the mean rank
  // (the step's total cost over the pool: splitting moves a s^2 + b s, it adds only c per share);
  // PP-balance: the share with the bubble it makes, stages x the share, no more than the mean.
  double total = 0;
  for (const auto& x : samples) total += o.cost(static_cast<double>(x.length - 1));
  const double mean = total / static_cast<double>(o.pool);
  const double target = pp ? mean / static_cast<double>(o.stages) : mean;
  auto balance_ranks = [&](double s) -> int64_t {
    if (!o.balance_groups || target <= o.cost.c) return 1;
    const double d =
        std::ceil((o.cost.a * s * s + o.cost.b * s) / (target - o.cost.c) * (1 - 1e-12));
    return static_cast<int64_t>(std::clamp(d, 1.0, static_cast<double>(o.pool)));
  };
  // A rank's load: its total, plus under PP-balance the bubble of its costliest micro-batch (Note:
  // hybrid data parallelism balance modes).
  std::vector<double> costliest(pool, 0.0);
  auto load = [&](size_t r) { return plan.rank_cost[r] + bubble * costliest[r]; };
  // The ranks by (cost so far, rank), the least on top (ties: the lowest rank). A binary heap,
  // not an ordered set: no allocation per update, which kept the planner's time at 12,288 ranks
  // from varying with the allocator's state.
  using Entry = std::pair<double, int>;
  std::vector<Entry> heap_storage;
  heap_storage.reserve(pool);
  std::priority_queue<Entry, std::vector<Entry>, std::greater<>> least(std::greater<>{},
                                                                       std::move(heap_storage));
  for (size_t r = 0; r < pool; ++r) least.emplace(0.0, static_cast<int>(r));
  // 1. Long sequences: a group of the D least-loaded ranks each: O(D log P) per group.
  std::vector<bool> grouped(samples.size(), false);
  for (const int64_t i : order) {
    const int64_t s = samples[static_cast<size_t>(i)].length - 1;
    if (s <= o.capacity && balance_ranks(static_cast<double>(s)) <= 1) break;  // the rest: short
    grouped[static_cast<size_t>(i)] = true;
    const int64_t need = (s - 1) / o.capacity + 1;  // by memory
    LOOM_CHECK_CONFIG(need <= o.pool,
                      "hybrid data parallelism: sample {} (index {}) has {} tokens, which needs {} "
                      "ranks of {} tokens each; the pool has {} (raise the capacity, enlarge the "
                      "pool, or cut such documents)",
                      i, samples[static_cast<size_t>(i)].index, s, need, o.capacity, o.pool);
    // At least one token per share.
    int64_t d = std::min(s, std::max(need, balance_ranks(static_cast<double>(s))));
    // Past D = max(a s, b) / ring a member's share is at most twice its floor (the K/V stream,
    // ring s): more ranks shorten it by less than each adds in traffic (Note: hybrid data
    // parallelism ring cost).
    if (o.ring > 0) {
      const double knee = std::ceil(ring_knee(o, static_cast<double>(s)) * (1 - 1e-12));
      if (knee < static_cast<double>(d)) d = std::max(need, static_cast<int64_t>(knee));
    }
    if (o.power_of_two_groups) {
      int64_t p2 = 1;
      while (p2 < d) p2 *= 2;
      // The largest that fits the pool and the tokens, if one still covers the need; when no
      // power of two lies in [need, min(pool, s)], the need itself (tiny sequences only).
      while ((p2 > o.pool || p2 > s) && p2 / 2 >= need) p2 /= 2;
      LOOM_CHECK_CONFIG(p2 <= o.pool,
                        "hybrid data parallelism: sample {} (index {}) needs {} ranks, a group of "
                        "{} as a power of two; the pool has {}",
                        i, samples[static_cast<size_t>(i)].index, need, p2, o.pool);
      d = p2 <= s ? p2 : need;
    }
    HdpGroup group;
    group.sample = i;
    group.ranks.reserve(static_cast<size_t>(d));
    for (int64_t j = 0; j < d; ++j) {
      group.ranks.push_back(least.top().second);
      least.pop();
    }
    std::sort(group.ranks.begin(), group.ranks.end());  // ring order: by rank
    const double share_cost = ring_share(o, static_cast<double>(s), static_cast<double>(d));
    for (int64_t j = 0; j < d; ++j) {
      const auto r = static_cast<size_t>(group.ranks[static_cast<size_t>(j)]);
      HdpMicroBatch mb;
      mb.samples = {i};
      mb.group = static_cast<int64_t>(plan.groups.size());
      mb.tokens = s / d + (j < s % d ? 1 : 0);
      mb.cost = share_cost;
      plan.ranks[r].push_back(mb);
      plan.rank_cost[r] += share_cost;
      costliest[r] = std::max(costliest[r], share_cost);
      least.emplace(load(r), static_cast<int>(r));
    }
    plan.groups.push_back(std::move(group));
  }
  // 2. Short sequences: to the least-loaded rank (LPT), first fit into its packed micro-batches.
  std::vector<size_t> first_packed(pool);  // where each rank's packed micro-batches start
  for (size_t r = 0; r < pool; ++r) first_packed[r] = plan.ranks[r].size();
  for (const int64_t i : order) {
    const int64_t s = samples[static_cast<size_t>(i)].length - 1;
    if (grouped[static_cast<size_t>(i)]) continue;
    const int rank = least.top().second;
    least.pop();
    const auto r = static_cast<size_t>(rank);
    auto& mbs = plan.ranks[r];
    size_t at = first_packed[r];
    while (at < mbs.size() && mbs[at].tokens > o.capacity - s) ++at;
    if (at == mbs.size()) mbs.emplace_back();
    const double t = o.cost(static_cast<double>(s));
    mbs[at].samples.push_back(i);
    mbs[at].tokens += s;
    mbs[at].cost += t;
    plan.rank_cost[r] += t;
    costliest[r] = std::max(costliest[r], mbs[at].cost);
    least.emplace(load(r), rank);
  }
  return plan;
}

std::vector<std::vector<int>> hdp_slots(const HdpPlan& plan) {
  const size_t pool = plan.ranks.size();
  std::vector<std::vector<int>> table(pool);
  // 1. Groups in creation order: the first slot after every member's last group slot.
  std::vector<int64_t> next(pool, 0), group_slot(plan.groups.size(), 0);
  for (size_t g = 0; g < plan.groups.size(); ++g) {
    int64_t slot = 0;
    for (const int r : plan.groups[g].ranks) slot = std::max(slot, next[static_cast<size_t>(r)]);
    group_slot[g] = slot;
    for (const int r : plan.groups[g].ranks) next[static_cast<size_t>(r)] = slot + 1;
  }
  size_t most = 0;
  for (size_t r = 0; r < pool; ++r) {
    auto& t = table[r];
    const auto& mbs = plan.ranks[r];
    for (size_t k = 0; k < mbs.size(); ++k) {
      if (mbs[k].group < 0) continue;
      const auto slot = static_cast<size_t>(group_slot[static_cast<size_t>(mbs[k].group)]);
      if (t.size() <= slot) t.resize(slot + 1, -1);
      t[slot] = static_cast<int>(k);
    }
    // 2. Packed micro-batches into the free slots in order, then after them.
    size_t free = 0;
    for (size_t k = 0; k < mbs.size(); ++k) {
      if (mbs[k].group >= 0) continue;
      while (free < t.size() && t[free] >= 0) ++free;
      if (free == t.size()) t.push_back(-1);
      t[free] = static_cast<int>(k);
    }
    most = std::max(most, t.size());
  }
  // 3. Empty slots to the longest.
  for (auto& t : table) t.resize(most, -1);
  return table;
}

// [Note: hybrid data parallelism pipeline simulation]
// The operations (pool rank p, stage s, slot m, forward or backward) form a graph whose edges are
// each stage's 1F1B order and the pipeline's dependencies; a group's members' operations at one
// (stage, slot, direction) are one node (they run together). Start times are the longest paths:
// one pass in topological order (Kahn's algorithm); nodes left over lie on a cycle (a deadlock).
std::vector<double> simulate_hdp_step(
    const HdpPlan& plan, int stages,
    const std::function<double(int rank, const HdpMicroBatch& mb)>& time) {
  LOOM_CHECK_CONFIG(stages >= 1, "simulate_hdp_step: {} stages", stages);
  const auto slots = hdp_slots(plan);
  const size_t pool = slots.size();
  const size_t m_all = pool == 0 ? 0 : slots[0].size();
  const auto S = static_cast<size_t>(stages);
  const size_t plain = pool * S * m_all * 2;
  auto op = [&](size_t p, size_t s, size_t m, size_t backward) {
    const int k = slots[p][m];
    if (k >= 0) {
      const int64_t g = plan.ranks[p][static_cast<size_t>(k)].group;
      if (g >= 0) return plain + ((static_cast<size_t>(g) * S + s) * 2 + backward);
    }
    return ((p * S + s) * m_all + m) * 2 + backward;
  };
  const size_t nodes = plain + plan.groups.size() * S * 2;
  std::vector<double> duration(nodes, 0.0);
  std::vector<std::pair<uint32_t, uint32_t>> edges;
  edges.reserve(nodes * 2);
  auto edge = [&](size_t u, size_t v) {
    edges.emplace_back(static_cast<uint32_t>(u), static_cast<uint32_t>(v));
  };
  LOOM_CHECK_CONFIG(nodes < (size_t{1} << 30),
                    "simulate_hdp_step: {} operations (pool x stages x slots x 2) is more than it "
                    "handles (2^30)",
                    nodes);
  for (size_t p = 0; p < pool; ++p) {
    for (size_t m = 0; m < m_all; ++m) {
      const int k = slots[p][m];
      const double t =
          k >= 0 ? time(static_cast<int>(p), plan.ranks[p][static_cast<size_t>(k)]) : 0.0;
      for (size_t s = 0; s < S; ++s) {
        // A group's node takes its slowest member's time (members' shares cost the same).
        auto& f = duration[op(p, s, m, 0)];
        auto& b = duration[op(p, s, m, 1)];
        f = std::max(f, t / (3.0 * static_cast<double>(S)));
        b = std::max(b, 2.0 * t / (3.0 * static_cast<double>(S)));
        if (s + 1 < S) {
          edge(op(p, s, m, 0), op(p, s + 1, m, 0));
          edge(op(p, s + 1, m, 1), op(p, s, m, 1));
        } else {
          edge(op(p, s, m, 0), op(p, s, m, 1));
        }
      }
    }
    // Each stage's 1F1B order.
    for (size_t s = 0; s < S; ++s) {
      const size_t warm = std::min(S - 1 - s, m_all);
      std::vector<size_t> order;
      order.reserve(2 * m_all);
      for (size_t m = 0; m < warm; ++m) order.push_back(op(p, s, m, 0));
      for (size_t m = warm; m < m_all; ++m) {
        order.push_back(op(p, s, m, 0));
        order.push_back(op(p, s, m - warm, 1));
      }
      for (size_t m = m_all - warm; m < m_all; ++m) order.push_back(op(p, s, m, 1));
      for (size_t i = 1; i < order.size(); ++i) edge(order[i - 1], order[i]);
    }
  }
  LOOM_INTERNAL_CHECK(edges.size() < (size_t{1} << 32), "simulate_hdp_step: {} edges",
                      edges.size());
  // Compressed adjacency, then the longest paths in topological order.
  std::vector<uint32_t> first(nodes + 1, 0), indegree(nodes, 0), to(edges.size());
  for (const auto& [u, v] : edges) {
    ++first[u + 1];
    ++indegree[v];
  }
  std::partial_sum(first.begin(), first.end(), first.begin());
  {
    std::vector<uint32_t> at(first.begin(), first.end() - 1);
    for (const auto& [u, v] : edges) to[at[u]++] = v;
  }
  edges = {};
  std::vector<double> start(nodes, 0.0);
  std::vector<uint32_t> ready;
  for (size_t v = 0; v < nodes; ++v) {
    if (indegree[v] == 0) ready.push_back(static_cast<uint32_t>(v));
  }
  size_t done = 0;
  while (!ready.empty()) {
    const uint32_t u = ready.back();
    ready.pop_back();
    ++done;
    const double finish = start[u] + duration[u];
    for (uint32_t e = first[u]; e < first[u + 1]; ++e) {
      const uint32_t v = to[e];
      start[v] = std::max(start[v], finish);
      if (--indegree[v] == 0) ready.push_back(v);
    }
  }
  LOOM_INTERNAL_CHECK(done == nodes,
                      "simulate_hdp_step: the slot layout deadlocks under 1F1B ({} of {} "
                      "operations wait on each other)",
                      nodes - done, nodes);
  std::vector<double> finish(pool, 0.0);
  for (size_t p = 0; p < pool; ++p) {
    for (size_t s = 0; s < S; ++s) {
      for (size_t m = 0; m < m_all; ++m) {
        for (size_t d = 0; d < 2; ++d) {
          const size_t v = op(p, s, m, d);
          finish[p] = std::max(finish[p], start[v] + duration[v]);
        }
      }
    }
  }
  return finish;
}

}  // namespace loom::data
