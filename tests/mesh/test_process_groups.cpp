// ProcessGroups over real communicators (mpirun): for several layouts of the world, every group's
// communicator has exactly the members the rank maths says, in that order, and a sum over it of the
// members' world ranks is right.
#include <gtest/gtest.h>

#include <numeric>

#include "loom/core/error.h"
#include "loom/core/logging.h"
#include "loom/mesh/process_groups.h"
#include "test_world.h"

using loom::mesh::Group;
using loom::mesh::ParallelDims;
using loom::mesh::ProcessGroups;
using loom::testing::world;
using loom::testing::world_sum;

namespace {
// Layouts (tp, cp, ep, pp, expert_tp, order) tried when they fit the world size.
struct Layout {
  int tp, cp, ep, pp, etp;
  const char* order;
};
const Layout kLayouts[] = {
    {1, 1, 1, 1, 0, "tp-cp-ep-dp-pp"}, {2, 1, 1, 1, 0, "tp-cp-ep-dp-pp"},
    {2, 1, 1, 2, 0, "tp-cp-ep-dp-pp"}, {2, 2, 1, 2, 0, "tp-cp-ep-dp-pp"},
    {1, 2, 4, 1, 1, "tp-cp-ep-dp-pp"}, {2, 1, 2, 2, 1, "tp-cp-ep-dp-pp"},
    {2, 1, 4, 1, 2, "tp-cp-ep-dp-pp"}, {2, 1, 2, 2, 1, "tp-cp-ep-pp-dp"},
    {4, 1, 1, 2, 0, "pp-tp-cp-ep-dp"}, {1, 1, 8, 1, 1, "tp-cp-ep-dp-pp"},
};
}  // namespace

TEST(ProcessGroups, EveryGroupHasTheRightMembers) {
  auto w = world();
  int tried = 0;
  for (const auto& l : kLayouts) {
    int model = l.tp * l.cp * l.pp;
    int etp = l.etp == 0 ? l.tp : l.etp;
    if (w->size() % model || w->size() % (etp * l.ep * l.pp)) continue;
    ParallelDims d = ParallelDims::create(w->size(), l.tp, l.cp, l.ep, 0, l.pp, l.etp, l.order);
    ProcessGroups pg(d, w);
    ++tried;
    for (int k = 0; k < loom::mesh::kNumGroups; ++k) {
      Group g = static_cast<Group>(k);
      auto comm = pg.group(g);
      const auto& ranks = pg.ranks(g);
      // Which group this rank belongs to, from the pure maths.
      std::vector<int> expected;
      for (const auto& members : loom::mesh::group_partition(d, g)) {
        if (std::find(members.begin(), members.end(), w->rank()) != members.end()) expected = members;
      }
      EXPECT_EQ(ranks, expected) << loom::mesh::group_name(g) << " " << d.to_string();
      if (expected.empty()) {
        EXPECT_EQ(comm, nullptr) << loom::mesh::group_name(g);
        continue;
      }
      ASSERT_NE(comm, nullptr) << loom::mesh::group_name(g);
      EXPECT_EQ(comm->world_ranks(), expected) << loom::mesh::group_name(g) << " " << d.to_string();
      at::Tensor t = at::full({1}, int64_t(w->rank()), at::kLong);
      comm->all_reduce(t);
      EXPECT_EQ(t.item<int64_t>(), std::accumulate(expected.begin(), expected.end(), int64_t{0}))
          << loom::mesh::group_name(g) << " " << d.to_string();
    }
    // Coordinates agree with the group positions.
    EXPECT_EQ(pg.tp_rank(), pg.tp_group()->rank());
    EXPECT_EQ(pg.pp_rank(), pg.pp_group()->rank());
    EXPECT_EQ(pg.dp_rank(), pg.dp_group()->rank());
    EXPECT_EQ(pg.ep_rank(), pg.ep_group()->rank());
    EXPECT_EQ(pg.pp_is_first_stage(), pg.pp_rank() == 0);
    EXPECT_EQ(pg.ranks(Group::kPp)[(pg.pp_rank() + 1) % d.pp], pg.pp_next_rank());
    loom::log::set_coordinates(pg.coords_string());
  }
  EXPECT_GT(tried, 0);
  EXPECT_EQ(world_sum(tried), tried * w->size());
}

TEST(ProcessGroups, LayoutForAnotherWorldSizeIsRefused) {
  auto w = world();
  ParallelDims d = ParallelDims::create(w->size() * 2, 2, 1, 1, 0, 1);
  try {
    ProcessGroups pg(d, w);
    ADD_FAILURE() << "no error";
  } catch (const loom::Error& e) {
    EXPECT_NE(std::string(e.what()).find("but the world communicator has"), std::string::npos) << e.what();
  }
}
