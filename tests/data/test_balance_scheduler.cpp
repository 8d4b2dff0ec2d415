// The balance scheduler of hybrid data parallelism ([Note: hybrid data parallelism plan]): plan
// properties on thousands of random long-tailed batches, the greedy bound on the imbalance, and the
// cost-model fit against closed forms.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <random>
#include <set>

#include "loom/core/error.h"
#include "loom/data/balance_scheduler.h"

namespace {

using loom::data::CostModel;
using loom::data::HdpOptions;
using loom::data::HdpPlan;
using loom::data::SampleRef;

// A long-tailed batch: most sequences short, a few up to `max_len` tokens.
std::vector<SampleRef> long_tail(std::mt19937_64& rng, int n, int64_t max_len) {
  std::vector<SampleRef> v;
  std::uniform_real_distribution<double> u(0, 1);
  for (int i = 0; i < n; ++i) {
    // Log-uniform lengths in [2, max_len]: many short, few long.
    const double x = std::exp(u(rng) * std::log(static_cast<double>(max_len) / 2.0));
    v.push_back({1000 + i, std::clamp<int64_t>(static_cast<int64_t>(2.0 * x), 2, max_len)});
  }
  return v;
}

// Every property the plan promises, each violation reported.
void expect_valid(const std::vector<SampleRef>& samples, const HdpOptions& o, const HdpPlan& p,
                  const std::string& what) {
  ASSERT_EQ(p.ranks.size(), static_cast<size_t>(o.pool)) << what;
  ASSERT_EQ(p.rank_cost.size(), static_cast<size_t>(o.pool)) << what;
  int64_t n = 0;
  for (const auto& s : samples) n += s.length - 1;
  EXPECT_EQ(p.loss_tokens, n) << what;
  std::map<int64_t, int64_t> tokens_of;             // sample -> tokens planned, over all ranks
  std::map<int64_t, std::set<int>> ranks_of;        // sample -> ranks that hold a part of it
  std::map<int64_t, std::multiset<int>> shares_of;  // group -> ranks holding a share of it
  for (int r = 0; r < o.pool; ++r) {
    double cost = 0;
    int64_t last_group = -1;
    bool packed_seen = false;
    for (const auto& mb : p.ranks[static_cast<size_t>(r)]) {
      EXPECT_LE(mb.tokens, o.capacity) << what << ": rank " << r << " over capacity";
      EXPECT_GT(mb.tokens, 0) << what << ": an empty micro-batch on rank " << r;
      cost += mb.cost;
      if (mb.group >= 0) {
        // Group shares first, in creation order (deadlock freedom).
        EXPECT_FALSE(packed_seen) << what << ": a group share after packed micro-batches";
        EXPECT_GT(mb.group, last_group) << what << ": groups out of order on rank " << r;
        last_group = mb.group;
        shares_of[mb.group].insert(r);
        ASSERT_EQ(mb.samples.size(), 1u) << what;
        ASSERT_LT(static_cast<size_t>(mb.group), p.groups.size()) << what;
        const auto& g = p.groups[static_cast<size_t>(mb.group)];
        EXPECT_EQ(g.sample, mb.samples[0]) << what;
        EXPECT_TRUE(std::find(g.ranks.begin(), g.ranks.end(), r) != g.ranks.end()) << what;
      } else {
        packed_seen = true;
        int64_t sum = 0;
        for (const int64_t i : mb.samples) {
          const int64_t s = samples[static_cast<size_t>(i)].length - 1;
          EXPECT_LE(s, o.capacity) << what << ": a long sequence packed whole";
          sum += s;
        }
        EXPECT_EQ(sum, mb.tokens) << what;
      }
      for (const int64_t i : mb.samples) {
        tokens_of[i] += mb.group >= 0 ? mb.tokens : samples[static_cast<size_t>(i)].length - 1;
        EXPECT_TRUE(ranks_of[i].insert(r).second || mb.group < 0)
            << what << ": a group gives rank " << r << " two shares";
      }
    }
    EXPECT_NEAR(cost, p.rank_cost[static_cast<size_t>(r)], 1e-9 * std::max(cost, 1.0)) << what;
  }
  // Every token exactly once: each sample's planned tokens are its loss tokens. Group sizes: at
  // least what the length needs, at most the pool, and no larger than the balance needs: with one
  // rank fewer, a share would cost more than the mean rank (the step's total over the pool).
  EXPECT_EQ(tokens_of.size(), samples.size()) << what << ": samples missing from the plan";
  double total = 0;
  for (const auto& x : samples) total += o.cost(static_cast<double>(x.length - 1));
  // PP-balance: the share with its bubble, stages x the share, against the mean (Note: hybrid data
  // parallelism balance modes).
  const bool pp = o.balance == loom::data::HdpBalance::kPp;
  const double mean = total / o.pool / (pp ? o.stages : 1);
  for (size_t i = 0; i < samples.size(); ++i) {
    const int64_t s = samples[i].length - 1;
    EXPECT_EQ(tokens_of[static_cast<int64_t>(i)], s) << what << ": sample " << i;
    const auto need = (s + o.capacity - 1) / o.capacity;
    const auto d = static_cast<int64_t>(ranks_of[static_cast<int64_t>(i)].size());
    EXPECT_GE(d, need) << what << ": sample " << i << " of " << s << " tokens";
    EXPECT_LE(d, o.pool) << what;
    const double work = o.cost.a * s * s + o.cost.b * s;
    if (o.power_of_two_groups) {  // a power of two, or the need when none fits
      EXPECT_TRUE((d & (d - 1)) == 0 || d == need) << what << ": sample " << i << ", " << d;
      continue;
    }
    if (!o.balance_groups) {  // what memory needs, no more
      EXPECT_EQ(d, need) << what << ": sample " << i;
      continue;
    }
    // The ring cost (Note: hybrid data parallelism ring cost): no larger than max(a s, b) / ring.
    const double useful =
        o.ring > 0 ? std::max(o.cost.a * static_cast<double>(s), o.cost.b) / o.ring : 1e300;
    if (d > need) {
      EXPECT_GT(work / static_cast<double>(d - 1) + o.cost.c, mean * (1 - 1e-9))
          << what << ": sample " << i << " split over more ranks than it needs";
      EXPECT_LE(static_cast<double>(d - 1), useful)
          << what << ": sample " << i << " split past the point where transfers bound it";
    }
    if (static_cast<double>(d) < useful - 1 && d < std::min<int64_t>(o.pool, s) &&
        mean > o.cost.c) {
      EXPECT_LE(work / static_cast<double>(d) + o.cost.c, mean * (1 + 1e-9))
          << what << ": sample " << i << " costs more per rank than the mean rank";
    }
  }
  for (size_t k = 0; k < p.groups.size(); ++k) {
    const auto& g = p.groups[k];
    EXPECT_TRUE(std::is_sorted(g.ranks.begin(), g.ranks.end())) << what;
    EXPECT_EQ(std::set<int>(g.ranks.begin(), g.ranks.end()).size(), g.ranks.size()) << what;
    // Each member holds exactly one share (a member without one would leave the ring waiting).
    EXPECT_EQ(shares_of[static_cast<int64_t>(k)],
              std::multiset<int>(g.ranks.begin(), g.ranks.end()))
        << what << ": group " << k;
  }
}

TEST(BalanceScheduler, RandomBatchesKeepEveryPromise) {
  std::mt19937_64 rng(20261202);
  int cases = 0, with_groups = 0, refused = 0;
  for (int c = 0; c < 2000; ++c) {
    HdpOptions o;
    o.pool = 1 + static_cast<int>(rng() % 64);
    o.capacity = 16 + static_cast<int64_t>(rng() % 512);
    o.cost = CostModel{static_cast<double>(rng() % 3) * 1e-3, 1.0, static_cast<double>(rng() % 2)};
    o.balance_groups = c % 4 != 1;       // a quarter sized by memory alone
    o.power_of_two_groups = c % 4 == 2;  // a quarter with power-of-two groups
    // A third PP-balance over 2 to 8 stages, a fifth with a ring cost.
    if (c % 3 == 0) {
      o.balance = loom::data::HdpBalance::kPp;
      o.stages = 2 + static_cast<int>(rng() % 7);
    } else {
      o.stages = 1 + static_cast<int>(rng() % 4);  // DP-balance ignores the stages
    }
    // (a = 0 too: the knee is then b / ring.)
    if (c % 5 == 0) o.ring = std::max(o.cost.a, 1e-3) * static_cast<double>(16 + rng() % 256);
    const int n = 1 + static_cast<int>(rng() % 200);
    // Lengths up to what the whole pool can hold as one group (with power-of-two groups, the
    // largest power of two in the pool).
    int64_t usable = o.pool;
    if (o.power_of_two_groups) {
      usable = 1;
      while (usable * 2 <= o.pool) usable *= 2;
    }
    const auto samples = long_tail(rng, n, std::min<int64_t>(o.capacity * usable, 20000) + 1);
    const std::string what = "case " + std::to_string(c) + " (pool " + std::to_string(o.pool) +
                             ", capacity " + std::to_string(o.capacity) + ", " + std::to_string(n) +
                             " samples)";
    HdpPlan p;
    try {
      p = loom::data::plan_hdp(samples, o);
    } catch (const loom::Error& e) {
      ADD_FAILURE() << what << ": " << e.what();
      ++refused;
      continue;
    }
    expect_valid(samples, o, p, what);
    // Deterministic: the same plan again.
    const HdpPlan q = loom::data::plan_hdp(samples, o);
    ASSERT_EQ(q.rank_cost, p.rank_cost) << what;
    for (int r = 0; r < o.pool; ++r) {
      const auto& a = p.ranks[static_cast<size_t>(r)];
      const auto& b = q.ranks[static_cast<size_t>(r)];
      ASSERT_EQ(a.size(), b.size()) << what;
      for (size_t m = 0; m < a.size(); ++m) ASSERT_EQ(a[m].samples, b[m].samples) << what;
    }
    // Greedy list scheduling on top of the groups' loads: a short sequence goes to the least
    // loaded rank, whose load never exceeds the final least one, and raises it by at most its cost
    // (PP-balance: its cost x stages, the sum and the costliest micro-batch both growing). So the
    // busiest rank is one the packing left alone (at most the busiest after the groups) or within
    // one sequence of the least loaded. The load: the sum, or PP-balance's pipeline estimate.
    const bool pp = o.balance == loom::data::HdpBalance::kPp;
    const double bubble = pp ? o.stages - 1 : 0;
    double after_groups = 0, biggest = 0, least = 1e300, most = 0;
    {
      for (int r = 0; r < o.pool; ++r) {
        double sum = 0, top = 0;
        for (const auto& mb : p.ranks[static_cast<size_t>(r)]) {
          if (mb.group < 0) continue;
          sum += mb.cost;
          top = std::max(top, mb.cost);
        }
        after_groups = std::max(after_groups, sum + bubble * top);
        const double load = pp ? p.pipeline_cost(r) : p.rank_cost[static_cast<size_t>(r)];
        least = std::min(least, load);
        most = std::max(most, load);
      }
      for (const auto& s : samples) {
        if (s.length - 1 <= o.capacity) biggest = std::max(biggest, o.cost(s.length - 1.0));
      }
    }
    EXPECT_LE(most, std::max(after_groups, least + (1 + bubble) * biggest) * (1 + 1e-12) + 1e-12)
        << what;
    // The plan as the Trainer runs it (slots, 1F1B over the stages) never deadlocks, and its step
    // is at least every pipeline's work over the stages and every micro-batch's time.
    const int stages = 1 + c % 5;
    const auto finish = loom::data::simulate_hdp_step(
        p, stages, [](int, const loom::data::HdpMicroBatch& mb) { return mb.cost; });
    ASSERT_EQ(finish.size(), static_cast<size_t>(o.pool)) << what;
    for (int r = 0; r < o.pool; ++r) {
      double top = 0;
      for (const auto& mb : p.ranks[static_cast<size_t>(r)]) top = std::max(top, mb.cost);
      EXPECT_GE(finish[static_cast<size_t>(r)] * (1 + 1e-9),
                std::max(p.rank_cost[static_cast<size_t>(r)] / stages, top))
          << what << ": rank " << r;
    }
    ++cases;
    with_groups += p.groups.empty() ? 0 : 1;
  }
  EXPECT_EQ(cases, 2000) << refused << " refused";
  EXPECT_GT(with_groups, 500) << "too few cases exercise long sequences";
}

// [Note: hybrid data parallelism pipeline simulation] against closed forms: M equal micro-batches
// of time w through S stages under 1F1B take (M + S - 1) w / S (every stage's forward w / 3S and
// backward 2w / 3S, the first micro-batch reaching the last stage after S - 1 forwards and the last
// backward leaving the first stage S - 1 backwards after the last stage's); with one stage a
// rank's time is its sum; and a group starts when its last member is ready.
TEST(BalanceScheduler, PipelineSimulationMatchesClosedForms) {
  using loom::data::HdpMicroBatch;
  auto cost = [](int, const HdpMicroBatch& mb) { return mb.cost; };
  for (int stages = 1; stages <= 6; ++stages) {
    for (int m = 1; m <= 9; ++m) {
      HdpPlan p;
      p.ranks.resize(1);
      for (int k = 0; k < m; ++k) p.ranks[0].push_back(HdpMicroBatch{{k}, -1, 1, 3.0});
      p.rank_cost = {3.0 * m};
      const auto f = loom::data::simulate_hdp_step(p, stages, cost);
      EXPECT_NEAR(f[0], (m + stages - 1) * 3.0 / stages, 1e-12) << m << " x " << stages;
    }
  }
  // Groups: g0 on ranks {0, 1}, g1 on {1, 2}; rank 2's packed micro-batch (5) takes slot 0, so g1
  // (slot 1) waits for it: rank 1 finishes at max(1, 5) + 2, rank 0 at 1 + 4 (its packed one).
  HdpPlan p;
  p.groups = {{0, {0, 1}}, {1, {1, 2}}};
  p.ranks = {{HdpMicroBatch{{0}, 0, 1, 1.0}, HdpMicroBatch{{2}, -1, 1, 4.0}},
             {HdpMicroBatch{{0}, 0, 1, 1.0}, HdpMicroBatch{{1}, 1, 1, 2.0}},
             {HdpMicroBatch{{1}, 1, 1, 2.0}, HdpMicroBatch{{3}, -1, 1, 5.0}}};
  p.rank_cost = {5.0, 3.0, 7.0};
  const auto slots = loom::data::hdp_slots(p);
  ASSERT_EQ(slots, (std::vector<std::vector<int>>{{0, 1}, {0, 1}, {1, 0}}));
  const auto f = loom::data::simulate_hdp_step(p, 1, cost);
  EXPECT_NEAR(f[0], 5.0, 1e-12);
  EXPECT_NEAR(f[1], 7.0, 1e-12);
  EXPECT_NEAR(f[2], 7.0, 1e-12);
  // The same under 2 stages (per stage a forward takes w / 6, a backward w / 3; stage 0 runs
  // F0 F1 B0 B1, stage 1 F0 B0 F1 B1), worked by hand in sixths: rank 2's packed micro-batch
  // leaves stage 0 at 5 and stage 1 at 10, its backward there ends at 20; g1's forward starts on
  // stage 0 at 5 (ends 7) and on stage 1 after rank 2's backward, at 20 (ends 22); its backward on
  // stage 1 ends at 26. Rank 2's backward on stage 0 runs 20..30, so g1's there runs 30..34: ranks
  // 1 and 2 finish at 34/6. Rank 0: its packed micro-batch's backward on stage 1 runs 9..17, on
  // stage 0 17..25.
  const auto g = loom::data::simulate_hdp_step(p, 2, cost);
  EXPECT_NEAR(g[0], 25.0 / 6, 1e-12);
  EXPECT_NEAR(g[1], 34.0 / 6, 1e-12);
  EXPECT_NEAR(g[2], 34.0 / 6, 1e-12);
}

// The start-up fit's per-length time over the ranks (Note: hybrid data parallelism cost model):
// with one of five ranks descheduled while it timed the shortest length, the mean over ranks no
// longer grows with the length, and the fit through it would fall back; the median is the closed
// form's exactly, and so is the fit through it.
TEST(BalanceScheduler, MedianOverRanksIgnoresADisturbedRank) {
  const std::vector<double> lengths = {64, 128, 192, 256};
  const CostModel truth{2e-7, 3e-5, 0};
  std::vector<std::vector<double>> times;
  for (int r = 0; r < 5; ++r) {
    std::vector<double> row;
    for (const double s : lengths) row.push_back(truth(s) * (1 + 1e-3 * r));
    times.push_back(row);
  }
  times[3][0] += 0.5;  // descheduled for half a second
  std::vector<std::pair<double, double>> mean, median;
  const auto med = loom::data::median_over_ranks(times);
  for (size_t i = 0; i < lengths.size(); ++i) {
    double sum = 0;
    for (const auto& row : times) sum += row[i];
    mean.emplace_back(lengths[i], sum / 5);
    median.emplace_back(lengths[i], med[i]);
    EXPECT_DOUBLE_EQ(med[i], truth(lengths[i]) * 1.002) << "length " << lengths[i];
  }
  const CostModel from_mean = loom::data::fit_cost_model(mean);
  EXPECT_TRUE(from_mean.a <= 0 && from_mean.b <= 0)
      << "the outlier should defeat the mean: " << from_mean.describe();
  const CostModel fit = loom::data::fit_cost_model(median);
  EXPECT_NEAR(fit.a, truth.a * 1.002, 1e-9 * truth.a);
  EXPECT_NEAR(fit.b, truth.b * 1.002, 1e-6 * truth.b);
  // An even count: the mean of the middle two.
  EXPECT_DOUBLE_EQ(loom::data::median_over_ranks({{1.0}, {4.0}, {2.0}, {10.0}})[0], 3.0);
  EXPECT_THROW((void)loom::data::median_over_ranks({}), loom::Error);
  EXPECT_THROW((void)loom::data::median_over_ranks({{1.0, 2.0}, {1.0}}), loom::Error);
}

TEST(BalanceScheduler, BalanceModesParseAndNameBadValues) {
  using loom::data::HdpBalance;
  EXPECT_EQ(loom::data::parse_hdp_balance("", 1), HdpBalance::kDp);
  EXPECT_EQ(loom::data::parse_hdp_balance("", 4), HdpBalance::kPp);
  EXPECT_EQ(loom::data::parse_hdp_balance("dp", 4), HdpBalance::kDp);
  EXPECT_EQ(loom::data::parse_hdp_balance("pp", 1), HdpBalance::kPp);
  try {
    (void)loom::data::parse_hdp_balance("zigzag", 2);
    ADD_FAILURE() << "a bad balance mode was accepted";
  } catch (const loom::Error& e) {
    EXPECT_EQ(e.kind(), loom::ErrorKind::kConfig);
    EXPECT_NE(std::string(e.what()).find("parallel.hdp_balance 'zigzag'"), std::string::npos)
        << e.what();
  }
}

// A worked example: pool 4, capacity 10. The 25-token sequence takes 3 ranks (9, 8, 8 tokens);
// the short ones go longest first to the least-loaded rank.
TEST(BalanceScheduler, AWorkedExample) {
  HdpOptions o;
  o.pool = 4;
  o.capacity = 10;
  o.cost = CostModel{0, 1, 0};  // cost = tokens
  const std::vector<SampleRef> samples = {{0, 5}, {1, 26}, {2, 9}, {3, 3}, {4, 11}};
  const HdpPlan p = loom::data::plan_hdp(samples, o);
  ASSERT_EQ(p.groups.size(), 1u);
  EXPECT_EQ(p.groups[0].sample, 1);
  EXPECT_EQ(p.groups[0].ranks, (std::vector<int>{0, 1, 2}));
  EXPECT_EQ(p.ranks[0][0].tokens, 9);
  EXPECT_EQ(p.ranks[1][0].tokens, 8);
  EXPECT_EQ(p.ranks[2][0].tokens, 8);
  // Then 10 (sample 4) -> rank 3 (cost 0); 8 (sample 2) -> rank 0 (the group's ranks tie at 25/3:
  // the lowest first); 4 (sample 0) -> rank 1; 2 (sample 3) -> rank 2.
  ASSERT_EQ(p.ranks[3].size(), 1u);
  EXPECT_EQ(p.ranks[3][0].samples, (std::vector<int64_t>{4}));
  EXPECT_EQ(p.ranks[0].back().samples, (std::vector<int64_t>{2}));
  EXPECT_EQ(p.ranks[1].back().samples, (std::vector<int64_t>{0}));
  EXPECT_EQ(p.ranks[2].back().samples, (std::vector<int64_t>{3}));
  EXPECT_NEAR(p.max_cost(), 25.0 / 3 + 8, 1e-12);
  EXPECT_EQ(p.loss_tokens, 4 + 25 + 8 + 2 + 10);
  // Power-of-two groups: the 25 tokens need 3 ranks, the group takes 4 (7, 6, 6, 6 tokens).
  o.power_of_two_groups = true;
  const HdpPlan q = loom::data::plan_hdp(samples, o);
  ASSERT_EQ(q.groups.size(), 1u);
  EXPECT_EQ(q.groups[0].ranks, (std::vector<int>{0, 1, 2, 3}));
  EXPECT_EQ(q.ranks[0][0].tokens, 7);
  EXPECT_EQ(q.ranks[3][0].tokens, 6);
}

TEST(BalanceScheduler, BadInputsNameTheReason) {
  auto expect_error = [](const std::vector<SampleRef>& s, const HdpOptions& o,
                         const std::string& needle) {
    try {
      (void)loom::data::plan_hdp(s, o);
      ADD_FAILURE() << "expected an error containing '" << needle << "'";
    } catch (const loom::Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  HdpOptions o;
  o.pool = 2;
  o.capacity = 10;
  expect_error({{7, 31}}, o,
               "sample 0 (index 7) has 30 tokens, which needs 3 ranks of 10 tokens "
               "each; the pool has 2");
  expect_error({{7, 1}}, o, "sample 0 (index 7) has 1 tokens");
  o.capacity = 0;
  expect_error({{7, 5}}, o, "a rank capacity of 0 tokens");
  o.capacity = 10;
  o.pool = 0;
  expect_error({{7, 5}}, o, "a pool of 0 ranks");
  // Power-of-two groups: 41 tokens need 5 ranks; 8 do not fit a pool of 6.
  o.pool = 6;
  o.power_of_two_groups = true;
  expect_error({{7, 42}}, o, "needs 5 ranks, a group of 8 as a power of two; the pool has 6");
  o.power_of_two_groups = false;
  o.pool = 2;
  o.cost = CostModel{-1, 1, 0};
  expect_error({{7, 5}}, o, "needs finite, non-negative coefficients");
  o.cost = CostModel{0, std::nan(""), 0};
  expect_error({{7, 5}}, o, "needs finite, non-negative coefficients");
  o.cost = CostModel{0, 0, 3};  // every sequence would look alike: all on one rank
  expect_error({{7, 5}}, o, "does not grow with the sequence's length");
}

TEST(BalanceScheduler, CostModelFitsTheClosedForm) {
  // Exact points of 2e-6 s^2 + 3e-3 s + 0.5 over a wide range: the fit recovers them.
  std::vector<std::pair<double, double>> points;
  for (double s : {128.0, 512.0, 2048.0, 8192.0, 32768.0, 131072.0})
    points.emplace_back(s, 2e-6 * s * s + 3e-3 * s + 0.5);
  CostModel m = loom::data::fit_cost_model(points);
  EXPECT_NEAR(m.a, 2e-6, 2e-6 * 1e-6);
  EXPECT_NEAR(m.b, 3e-3, 3e-3 * 1e-5);
  EXPECT_NEAR(m.c, 0.5, 1e-3);
  // A line with a negative intercept: no coefficient may be negative, so the best non-negative
  // fit, here through the origin with a quadratic term (checked against its normal equations).
  points = {{1, 0}, {2, 1}, {3, 2}, {4, 3}};
  m = loom::data::fit_cost_model(points);
  EXPECT_GE(m.a, 0);
  EXPECT_GE(m.b, 0);
  EXPECT_GE(m.c, 0);
  double best = 0;
  for (const auto& [s, t] : points) best += std::pow(m(s) - t, 2);
  // No non-negative (a, b, c) on a fine grid does better.
  for (double a = 0; a <= 0.5; a += 0.01) {
    for (double b = 0; b <= 1.5; b += 0.01) {
      double r = 0;
      for (const auto& [s, t] : points) r += std::pow(a * s * s + b * s - t, 2);
      EXPECT_GE(r, best - 1e-9) << "a " << a << " b " << b;
    }
  }
  try {
    (void)loom::data::fit_cost_model({{1, 1}, {2, 2}, {2, 2.1}});
    ADD_FAILURE() << "two distinct lengths accepted";
  } catch (const loom::Error& e) {
    EXPECT_NE(std::string(e.what()).find("3 or more distinct lengths, got 2"), std::string::npos)
        << e.what();
  }
}

}  // namespace

namespace {

using loom::data::MicroBatchPlan;
using loom::data::PlanLayout;
using loom::data::StepPlan;

// Whether two micro-batch plans hold the same pieces in the same rows.
bool same_rows(const MicroBatchPlan& a, const MicroBatchPlan& b) {
  if (a.rows.size() != b.rows.size() || a.row_len != b.row_len) return false;
  for (size_t r = 0; r < a.rows.size(); ++r) {
    if (a.rows[r].size() != b.rows[r].size()) return false;
    for (size_t i = 0; i < a.rows[r].size(); ++i) {
      const auto &p = a.rows[r][i], &q = b.rows[r][i];
      if (p.sample != q.sample || p.begin != q.begin || p.tokens != q.tokens) return false;
    }
  }
  return true;
}

}  // namespace

// [Note: hybrid data parallelism slots]: the step plans of every pool rank for random long-tailed
// document batches (documents cut into pieces of the context, pieces longer than a rank's capacity
// on groups). Every target of every document is computed exactly once over the pool (a group's
// sequence once, by its members' shares), every rank runs the same number of micro-batches, a
// group's members all run it in the same slot with the same rows and their own place in the ring,
// rows fit the capacity (a share: its sequence over the group) and pad to the group x the pad
// multiple, N and the unit count are the whole batch's, and the plans are deterministic.
TEST(BalanceScheduler, HdpStepPlansKeepEveryPromise) {
  std::mt19937_64 rng(20261203);
  int cases = 0, grouped = 0, odd_groups = 0;
  for (int c = 0; c < 1000; ++c) {
    PlanLayout l;
    l.mode = loom::data::BatchMode::kDocuments;
    l.hdp = true;
    l.dp_size = 1 + static_cast<int>(rng() % 12);
    l.micro_batch_tokens = 4 + static_cast<int64_t>(rng() % 60);
    l.pad_multiple = 1 + static_cast<int64_t>(rng() % 2);
    l.max_piece_tokens = l.micro_batch_tokens * (1 + static_cast<int64_t>(rng() % l.dp_size));
    l.cost = CostModel{static_cast<double>(rng() % 3) * 1e-2, 1.0, 0.0};
    l.stages = 1 + static_cast<int>(rng() % 4);
    l.hdp_balance = c % 2 == 0 ? loom::data::HdpBalance::kPp : loom::data::HdpBalance::kDp;
    const int n = 1 + static_cast<int>(rng() % 40);
    auto samples = long_tail(rng, n, 3 * l.max_piece_tokens);
    if (c % 10 == 0) samples.push_back({7, 1});  // a document with no target
    const std::string what = "case " + std::to_string(c) + " (pool " + std::to_string(l.dp_size) +
                             ", capacity " + std::to_string(l.micro_batch_tokens) + ", pieces " +
                             std::to_string(l.max_piece_tokens) + ")";
    std::vector<StepPlan> plans;
    for (int r = 0; r < l.dp_size; ++r) {
      PlanLayout lr = l;
      lr.dp_rank = r;
      plans.push_back(loom::data::plan_step(samples, lr));
    }
    int64_t n_tokens = 0;
    for (const auto& s : samples) n_tokens += std::max<int64_t>(s.length - 1, 0);
    std::map<std::pair<int64_t, int64_t>, int> computed;  // (sample, target position) -> times
    int64_t units = 0;
    const size_t slots = plans[0].micro_batches.size();
    for (int r = 0; r < l.dp_size; ++r) {
      const StepPlan& p = plans[static_cast<size_t>(r)];
      EXPECT_EQ(p.loss_tokens, n_tokens) << what;
      ASSERT_EQ(p.micro_batches.size(), slots) << what << ": rank " << r << "'s slot count";
      for (size_t m = 0; m < slots; ++m) {
        const MicroBatchPlan& mb = p.micro_batches[m];
        ASSERT_EQ(mb.rows.size(), 1u) << what;
        int64_t tokens = 0;
        for (const auto& piece : mb.rows.front()) tokens += piece.tokens;
        EXPECT_EQ(tokens, mb.tokens) << what;
        const auto d = static_cast<int64_t>(std::max<size_t>(mb.group.size(), 1));
        EXPECT_EQ(mb.row_len % (d * l.pad_multiple), 0) << what;
        if (mb.tokens == 0) {
          EXPECT_EQ(mb.row_len, l.pad_multiple) << what << ": an empty slot is one pad";
        } else {
          EXPECT_GE(mb.row_len, mb.tokens) << what;
          EXPECT_LT(mb.row_len, mb.tokens + d * l.pad_multiple) << what;
        }
        if (mb.group.empty()) {
          EXPECT_LE(mb.tokens, l.micro_batch_tokens) << what << ": rank " << r << " slot " << m;
          if (mb.tokens > 0) ++units;
        } else {
          ASSERT_EQ(mb.rows.front().size(), 1u) << what << ": a group runs one sequence";
          EXPECT_LE((mb.tokens + d - 1) / d, l.micro_batch_tokens) << what << ": share too big";
          ASSERT_GE(mb.group_rank, 0) << what;
          ASSERT_LT(mb.group_rank, static_cast<int>(d)) << what;
          EXPECT_EQ(mb.group[static_cast<size_t>(mb.group_rank)], r) << what;
          // Every member runs it in this slot, with the same rows and its own place.
          for (size_t i = 0; i < mb.group.size(); ++i) {
            const MicroBatchPlan& other = plans[static_cast<size_t>(mb.group[i])].micro_batches[m];
            EXPECT_TRUE(same_rows(mb, other) && other.group == mb.group &&
                        other.group_rank == static_cast<int>(i))
                << what << ": group member " << mb.group[i] << " in slot " << m;
          }
          if (mb.group_rank != 0) continue;  // count the sequence once
          ++units;
          ++grouped;
          if ((d & (d - 1)) != 0) ++odd_groups;
        }
        for (const auto& piece : mb.rows.front()) {
          for (int64_t t = 0; t < piece.tokens; ++t) ++computed[{piece.sample, piece.begin + t}];
        }
      }
      // Deterministic.
      PlanLayout lr = l;
      lr.dp_rank = r;
      const StepPlan again = loom::data::plan_step(samples, lr);
      ASSERT_EQ(again.micro_batches.size(), slots) << what;
      for (size_t m = 0; m < slots; ++m)
        EXPECT_TRUE(same_rows(again.micro_batches[m], p.micro_batches[m])) << what;
    }
    int64_t once = 0;
    for (const auto& [key, times] : computed) {
      EXPECT_EQ(times, 1) << what << ": target " << key.second << " of sample " << key.first;
      once += times == 1;
    }
    EXPECT_EQ(once, n_tokens) << what << ": targets computed";
    EXPECT_EQ(plans[0].global_micro_batches, std::max<int64_t>(units, 1)) << what;
    ++cases;
  }
  EXPECT_EQ(cases, 1000);
  EXPECT_GT(grouped, 1000) << "too few groups";
  EXPECT_GT(odd_groups, 100) << "too few groups of a size that is not a power of two";
}

TEST(BalanceScheduler, HdpStepPlanRefusesWhatItCannotRun) {
  PlanLayout l;
  l.mode = loom::data::BatchMode::kDocuments;
  l.hdp = true;
  l.dp_size = 2;
  l.micro_batch_tokens = 4;
  l.max_piece_tokens = 16;
  // A 16-token piece needs 4 ranks of 4 tokens; the pool has 2.
  try {
    (void)loom::data::plan_step({{3, 17}}, l);
    ADD_FAILURE() << "expected a refusal";
  } catch (const loom::Error& e) {
    EXPECT_EQ(e.kind(), loom::ErrorKind::kConfig) << e.what();
  }
  l.mode = loom::data::BatchMode::kWindows;
  try {
    (void)loom::data::plan_step({{3, 5}, {4, 5}}, l);
    ADD_FAILURE() << "expected a refusal";
  } catch (const loom::Error& e) {
    EXPECT_NE(std::string(e.what()).find("DOCUMENTS"), std::string::npos) << e.what();
  }
}

TEST(OffloadRule, ClosedFormGrowsWithLengthAndIgnoresTheGroupSize) {
  using loom::data::offload_ratio;
  // 1 s of forward over 10 layers; a layer's 1000 tokens x 1 MB at 1 GB/s copy in 1 s: a tenth of
  // the layers hides behind the forward.
  EXPECT_DOUBLE_EQ(offload_ratio(1.0, 1000, 10, 1e6, 1e9, 1.0), 0.1);
  EXPECT_DOUBLE_EQ(offload_ratio(1.99, 1000, 10, 1e6, 1e9, 1.0), 0.1);     // whole layers, down
  EXPECT_DOUBLE_EQ(offload_ratio(100.0, 1000, 10, 1e6, 1e9, 1.0), 1.0);    // capped at all
  EXPECT_DOUBLE_EQ(offload_ratio(100.0, 1000, 10, 1e6, 1e9, 0.25), 0.25);  // at the configured
  EXPECT_EQ(offload_ratio(0.0, 0, 10, 1e6, 1e9, 1.0), 0.0);                // an empty slot
  EXPECT_THROW(offload_ratio(1.0, 1000, 10, 1e6, 0.0, 1.0), loom::Error);
  EXPECT_THROW(offload_ratio(1.0, 1000, 10, 1e6, 1e9, 1.5), loom::Error);

  // Per micro-batch, from the plan and the cost model: T(s) = a s^2 + b s with a third of it the
  // forward, so r(s) = (a s + b) * bandwidth / (3 * layers * bytes), growing with the sequence, in
  // whole layers (of 100 here).
  const CostModel cost{1e-6, 1e-3, 0};
  loom::data::OffloadRule rule;
  rule.max_ratio = 1;
  rule.bandwidth = 1e8;
  rule.layers = 100;
  rule.bytes_per_token_layer = 2e4;
  auto one = [](int64_t s) {
    MicroBatchPlan mb;
    mb.rows = {{{0, 0, s}}};
    mb.row_len = s;
    mb.tokens = s;
    return mb;
  };
  auto share = [&](const MicroBatchPlan& mb) { return loom::data::offload_share(mb, cost, rule); };
  for (const int64_t s : {500, 1000, 4000}) {
    const double r = (1e-6 * static_cast<double>(s) + 1e-3) * 1e8 / (3 * 100 * 2e4);
    EXPECT_NEAR(share(one(s)), std::floor(r * 100 + 1e-9) / 100, 1e-12) << s;
    EXPECT_GT(share(one(s)), 0) << s;
  }
  EXPECT_LT(share(one(1000)), share(one(4000)));
  // A group member's share: 1 / D of the time and of the tokens, the same share of layers.
  MicroBatchPlan g = one(4000);
  g.group = {0, 2, 3, 5};
  EXPECT_NEAR(share(g), share(one(4000)), 1e-12);
  EXPECT_EQ(loom::data::longest_sequence(g), 4000);
  // Under full recomputation a quarter of the time is the first forward: less hides.
  const double third = share(one(4000));
  rule.forward_share = 0.25;
  EXPECT_LT(share(one(4000)), third);
  rule.forward_share = 1.0 / 3;
  // Only sequences of at least min_tokens; without a bandwidth, the configured share.
  rule.min_tokens = 2000;
  EXPECT_EQ(share(one(1000)), 0.0);
  EXPECT_GT(share(one(4000)), 0.0);
  EXPECT_EQ(share(g), share(one(4000)));  // a group's whole sequence counts
  rule.bandwidth = 0;
  rule.max_ratio = 0.5;
  EXPECT_EQ(share(one(4000)), 0.5);
  EXPECT_EQ(share(one(1000)), 0.0);
  EXPECT_EQ(share(MicroBatchPlan{}), 0.0);  // an empty slot
  // Packed documents: their costs add, the longest one names the micro-batch.
  MicroBatchPlan packed;
  packed.rows = {{{0, 0, 300}, {1, 0, 700}}};
  packed.tokens = 1000;
  EXPECT_DOUBLE_EQ(loom::data::micro_batch_cost(packed, cost), cost(300) + cost(700));
  EXPECT_EQ(loom::data::longest_sequence(packed), 700);
}
