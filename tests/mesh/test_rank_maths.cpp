// Rank maths checked exhaustively against an independent brute-force definition: for every world
// size 1..64, every factorisation into (tp, cp, dp, pp), every expert folding (expert_tp, ep) that
// divides, and several order strings, every group of every kind must equal the brute-force one.
//
// Brute force: walk all coordinate tuples with the first dim of the order varying fastest and
// number them 0, 1, 2, ... in that walk; a group for a set S of dims is the ranks that agree on
// every dim outside S, in walk order. No strides, no decomposition formulas.
#include <gtest/gtest.h>

#include <map>
#include <set>

#include "loom/core/error.h"
#include "loom/mesh/parallel_dims.h"
#include "loom/mesh/process_groups.h"

using loom::mesh::Group;
using loom::mesh::ParallelDims;

namespace {

struct BruteForce {
  std::vector<std::string> dims;         // order, fastest first
  std::vector<std::vector<int>> coords;  // rank -> coordinates (indexed like dims)

  BruteForce(const std::map<std::string, int>& sizes, const std::vector<std::string>& order)
      : dims(order) {
    std::vector<int> c(dims.size(), 0);
    std::vector<int> s;
    for (const auto& d : dims) s.push_back(sizes.at(d));
    while (true) {
      coords.push_back(c);
      size_t k = 0;
      while (k < c.size() && ++c[k] == s[k]) c[k++] = 0;  // odometer, first digit fastest
      if (k == c.size()) break;
    }
  }

  std::vector<std::vector<int>> groups(const std::set<std::string>& in) const {
    std::map<std::vector<int>, std::vector<int>> by_key;
    std::vector<std::vector<int>> key_order;
    for (size_t r = 0; r < coords.size(); ++r) {
      std::vector<int> key;
      for (size_t i = 0; i < dims.size(); ++i) {
        if (!in.count(dims[i])) key.push_back(coords[r][i]);
      }
      if (!by_key.count(key)) key_order.push_back(key);
      by_key[key].push_back(static_cast<int>(r));
    }
    std::vector<std::vector<int>> out;
    for (const auto& k : key_order) out.push_back(by_key[k]);
    return out;
  }
};

std::vector<std::vector<int>> sorted_groups(std::vector<std::vector<int>> g) {
  std::sort(g.begin(), g.end());
  return g;
}

std::vector<std::string> parse(const std::string& order) { return loom::mesh::split_token(order); }

}  // namespace

TEST(RankMaths, EveryFactorisationMatchesBruteForce) {
  const std::vector<std::string> orders = {"tp-cp-ep-dp-pp", "tp-cp-ep-pp-dp", "tp-pp-dp-cp-ep",
                                           "dp-tp-cp-ep-pp", "pp-ep-dp-cp-tp"};
  int64_t layouts = 0, groups_checked = 0, refused = 0;
  for (int world = 1; world <= 64; ++world) {
    for (int tp = 1; tp <= world; ++tp) {
      if (world % tp) continue;
      for (int cp = 1; cp * tp <= world; ++cp) {
        if (world % (tp * cp)) continue;
        for (int pp = 1; pp * tp * cp <= world; ++pp) {
          if (world % (tp * cp * pp)) continue;
          int dp = world / (tp * cp * pp);
          for (int ep = 1; ep * pp <= world; ++ep) {
            for (int etp = 1; etp * ep * pp <= world; ++etp) {
              if (world % (etp * ep * pp)) continue;
              // Keep the sweep affordable: all orders for small worlds, two for large ones.
              size_t n_orders = world <= 24 ? orders.size() : 2;
              for (size_t oi = 0; oi < n_orders; ++oi) {
                const auto& order = orders[oi];
                BruteForce dense({{"tp", tp}, {"cp", cp}, {"ep", 1}, {"dp", dp}, {"pp", pp}},
                                 parse(order));
                BruteForce expert({{"tp", etp},
                                   {"cp", 1},
                                   {"ep", ep},
                                   {"dp", world / (etp * ep * pp)},
                                   {"pp", pp}},
                                  parse(order));
                // Dense and expert pipeline groups must coincide; layouts where they do not are
                // refused (Megatron-Core asserts the same).
                if (sorted_groups(dense.groups({"pp"})) != sorted_groups(expert.groups({"pp"}))) {
                  EXPECT_THROW(ParallelDims::create(world, tp, cp, ep, dp, pp, etp, order),
                               loom::Error);
                  ++refused;
                  continue;
                }
                ParallelDims d = ParallelDims::create(world, tp, cp, ep, dp, pp, etp, order);
                ++layouts;
                const std::vector<std::pair<Group, std::set<std::string>>> dense_kinds = {
                    {Group::kTp, {"tp"}},         {Group::kCp, {"cp"}},
                    {Group::kDp, {"dp"}},         {Group::kDpCp, {"dp", "cp"}},
                    {Group::kPp, {"pp"}},         {Group::kTpPp, {"tp", "pp"}},
                    {Group::kTpCp, {"tp", "cp"}}, {Group::kTpDpCp, {"tp", "dp", "cp"}}};
                for (const auto& [g, dims] : dense_kinds) {
                  ASSERT_EQ(sorted_groups(loom::mesh::group_partition(d, g)),
                            sorted_groups(dense.groups(dims)))
                      << loom::mesh::group_name(g) << " " << d.to_string();
                  ++groups_checked;
                }
                const std::vector<std::pair<Group, std::set<std::string>>> expert_kinds = {
                    {Group::kEp, {"ep"}},
                    {Group::kExpertTp, {"tp"}},
                    {Group::kExpertDp, {"dp"}},
                    {Group::kTpEp, {"tp", "ep"}}};
                for (const auto& [g, dims] : expert_kinds) {
                  ASSERT_EQ(sorted_groups(loom::mesh::group_partition(d, g)),
                            sorted_groups(expert.groups(dims)))
                      << loom::mesh::group_name(g) << " " << d.to_string();
                  ++groups_checked;
                }
                // Embedding: first and last stage of each pipeline.
                for (const auto& e : loom::mesh::group_partition(d, Group::kEmbedding)) {
                  ASSERT_EQ(e.size(), pp == 1 ? 1u : 2u);
                }
                // Coordinates and rank_of round-trip against the brute-force walk.
                auto gen = d.dense();
                for (int r = 0; r < world; ++r) {
                  ASSERT_EQ(gen.coords(r), dense.coords[r]) << "rank " << r << " " << d.to_string();
                  ASSERT_EQ(gen.rank_of(dense.coords[r]), r);
                }
              }
            }
          }
        }
      }
    }
  }
  // Printed so a reader sees the sweep really ran.
  std::printf("checked %lld layouts, %lld group partitions; %lld layouts refused\n",
              (long long)layouts, (long long)groups_checked, (long long)refused);
  EXPECT_GT(layouts, 10000);
  EXPECT_GT(refused, 0);
}

TEST(RankMaths, DefaultOrderKeepsTensorParallelAdjacent) {
  ParallelDims d = ParallelDims::create(16, 2, 1, 1, 0, 2);
  EXPECT_EQ(d.dp, 4);
  auto tp = loom::mesh::group_partition(d, Group::kTp);
  EXPECT_EQ(tp[0], (std::vector<int>{0, 1}));
  auto pp = loom::mesh::group_partition(d, Group::kPp);
  EXPECT_EQ(pp[0], (std::vector<int>{0, 8}));
  auto dp = loom::mesh::group_partition(d, Group::kDp);
  EXPECT_EQ(dp[0], (std::vector<int>{0, 2, 4, 6}));
  auto emb = loom::mesh::group_partition(d, Group::kEmbedding);
  EXPECT_EQ(emb[1], (std::vector<int>{1, 9}));
}

namespace {
void expect_config_error(std::function<void()> fn, const std::string& needle) {
  try {
    fn();
    ADD_FAILURE() << "no error; expected one mentioning '" << needle << "'";
  } catch (const loom::Error& e) {
    EXPECT_EQ(e.kind(), loom::ErrorKind::kConfig) << e.what();
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}
}  // namespace

TEST(ParallelDimsErrors, InvalidLayoutsAreRefusedWithTheReason) {
  expect_config_error([] { ParallelDims::create(8, 3, 1, 1, 0, 1); },
                      "not divisible by tp*cp*pp = 3*1*1 = 3");
  expect_config_error([] { ParallelDims::create(8, 2, 1, 1, 3, 1); },
                      "tp*cp*dp*pp = 2*1*3*1 = 6, but the world has 8 ranks");
  expect_config_error([] { ParallelDims::create(8, 1, 1, 3, 0, 1); },
                      "expert_tp*ep = 1*3 = 3 does not divide the 8 ranks of a pipeline stage "
                      "(tp*cp*dp = 1*1*8; 8 % 3 = 2), so the expert layers cannot be folded onto "
                      "them: parallel.ep must divide dp*cp = 8*1 = 8");
  expect_config_error([] { ParallelDims::create(8, 2, 1, 3, 0, 2, 1); },
                      "expert_tp*ep = 1*3 = 3 does not divide the 4 ranks");
  expect_config_error([] { ParallelDims::create(8, 0, 1, 1, 0, 1); }, "tp must be >= 1");
  expect_config_error([] { ParallelDims::create(8, 2, 1, 1, 0, 1, 0, "tp-xx-dp"); },
                      "unknown dimension 'xx'");
  expect_config_error([] { ParallelDims::create(8, 2, 1, 1, 0, 1, 0, "tp-dp-tp"); },
                      "names 'tp' twice");
  expect_config_error([] { ParallelDims::create(8, 2, 2, 1, 0, 1, 0, "tp-dp-pp"); },
                      "omits 'cp', but cp=2");
  expect_config_error([] { ParallelDims::create(8, 2, 1, 1, 0, 1, 0, "tp--dp"); },
                      "empty dimension name");
  expect_config_error([] { ParallelDims::create(4, 1, 1, 1, 0, 2, 2, "tp-cp-ep-pp-dp"); },
                      "pipeline groups of the dense layers (tp*cp = 1) and of the expert layers "
                      "(expert_tp*ep = 2) differ");
  // Omitting size-1 dims is fine.
  EXPECT_NO_THROW(ParallelDims::create(8, 2, 1, 1, 0, 2, 0, "tp-dp-pp"));
}
