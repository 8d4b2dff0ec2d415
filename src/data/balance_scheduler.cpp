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
  const auto pool = static_cast<size_t>(o.pool);
  HdpPlan plan;
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
  // (the step's total cost over the pool: splitting moves a s^2 + b s, it adds only c per share).
  double total = 0;
  for (const auto& x : samples) total += o.cost(static_cast<double>(x.length - 1));
  const double mean = total / static_cast<double>(o.pool);
  auto balance_ranks = [&](double s) -> int64_t {
    if (!o.balance_groups || mean <= o.cost.c) return 1;
    const double d = std::ceil((o.cost.a * s * s + o.cost.b * s) / (mean - o.cost.c) * (1 - 1e-12));
    return static_cast<int64_t>(std::clamp(d, 1.0, static_cast<double>(o.pool)));
  };
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
    const double share_cost = o.cost.share(static_cast<double>(s), static_cast<double>(d));
    for (int64_t j = 0; j < d; ++j) {
      const auto r = static_cast<size_t>(group.ranks[static_cast<size_t>(j)]);
      HdpMicroBatch mb;
      mb.samples = {i};
      mb.group = static_cast<int64_t>(plan.groups.size());
      mb.tokens = s / d + (j < s % d ? 1 : 0);
      mb.cost = share_cost;
      plan.ranks[r].push_back(mb);
      plan.rank_cost[r] += share_cost;
      least.emplace(plan.rank_cost[r], static_cast<int>(r));
    }
    plan.groups.push_back(std::move(group));
  }
  // 2. Short sequences: to the least-loaded rank (LPT), first fit into its packed micro-batches.
  std::vector<size_t> first_packed(pool);  // where each rank's packed micro-batches start
  for (size_t r = 0; r < pool; ++r) first_packed[r] = plan.ranks[r].size();
  for (const int64_t i : order) {
    const int64_t s = samples[static_cast<size_t>(i)].length - 1;
    if (grouped[static_cast<size_t>(i)]) continue;
    const auto [cost, rank] = least.top();
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
    least.emplace(plan.rank_cost[r], rank);
  }
  return plan;
}

}  // namespace loom::data
