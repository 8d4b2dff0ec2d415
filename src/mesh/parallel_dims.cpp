#include "loom/mesh/parallel_dims.h"

#include <fmt/format.h>

#include "loom/core/error.h"

namespace loom::mesh {

ParallelDims ParallelDims::create(int world_size, int tp, int cp, int ep, int dp, int pp,
                                  int expert_tp, const std::string& order) {
  LOOM_CHECK_CONFIG(world_size >= 1, "world size must be >= 1, got {}", world_size);
  auto positive = [](const char* name, int v) {
    LOOM_CHECK_CONFIG(v >= 1, "parallel layout: {} must be >= 1, got {}", name, v);
  };
  positive("tp", tp);
  positive("cp", cp);
  positive("ep", ep);
  positive("pp", pp);
  LOOM_CHECK_CONFIG(dp >= 0, "parallel layout: dp must be >= 0 (0 = derive), got {}", dp);
  LOOM_CHECK_CONFIG(expert_tp >= 0, "parallel layout: expert_tp must be >= 0 (0 = tp), got {}",
                    expert_tp);
  ParallelDims d;
  d.world_size = world_size;
  d.tp = tp;
  d.cp = cp;
  d.ep = ep;
  d.pp = pp;
  d.expert_tp = expert_tp == 0 ? tp : expert_tp;
  d.order = order;
  int model = tp * cp * pp;
  if (dp == 0) {
    LOOM_CHECK_CONFIG(world_size % model == 0,
                      "parallel layout: the world size {} is not divisible by tp*cp*pp = {}*{}*{} "
                      "= {}, so dp cannot be derived",
                      world_size, tp, cp, pp, model);
    d.dp = world_size / model;
  } else {
    LOOM_CHECK_CONFIG(model * dp == world_size,
                      "parallel layout: tp*cp*dp*pp = {}*{}*{}*{} = {}, but the world has {} ranks",
                      tp, cp, dp, pp, model * dp, world_size);
    d.dp = dp;
  }
  // The expert groups (expert_tp x ep ranks) are carved from each pipeline stage's tp*cp*dp ranks.
  const int stage = d.tp * d.cp * d.dp;
  LOOM_CHECK_CONFIG(
      stage % (d.expert_tp * ep) == 0,
      "parallel layout: expert_tp*ep = {}*{} = {} does not divide the {} ranks of a "
      "pipeline stage (tp*cp*dp = {}*{}*{}; {} % {} = {}), so the expert layers "
      "cannot be folded onto them{}",
      d.expert_tp, ep, d.expert_tp * ep, stage, d.tp, d.cp, d.dp, stage, d.expert_tp * ep,
      stage % (d.expert_tp * ep),
      d.expert_tp == d.tp
          ? fmt::format(": parallel.ep must divide dp*cp = {}*{} = {}", d.dp, d.cp, d.dp * d.cp)
          : std::string());
  // Building both generators validates the order string (unknown, repeated or omitted dims).
  RankGenerator dense = d.dense();
  RankGenerator expert = d.expert();
  // Dense and expert layers live in the same pipeline stages, so both foldings must give the same
  // pipeline groups. With dp after pp in the order they differ unless tp*cp == expert_tp*ep.
  LOOM_CHECK_CONFIG(
      dense.groups("pp") == expert.groups("pp"),
      "parallel layout: with order '{}' the pipeline groups of the dense layers "
      "(tp*cp = {}) and of the expert layers (expert_tp*ep = {}) differ; put dp after "
      "pp in the order (as the default tp-cp-ep-dp-pp does) or make tp*cp = "
      "expert_tp*ep",
      order, tp * cp, d.expert_tp * ep);
  return d;
}

ParallelDims ParallelDims::from_config(const config::ParallelConfig& c, int world_size) {
  return create(world_size, c.tp(), c.cp(), c.ep(), c.dp(), c.pp(), c.expert_tp(), c.order());
}

RankGenerator ParallelDims::dense() const {
  return RankGenerator({{"tp", tp}, {"cp", cp}, {"ep", 1}, {"dp", dp}, {"pp", pp}}, order);
}

RankGenerator ParallelDims::expert() const {
  return RankGenerator({{"tp", expert_tp}, {"cp", 1}, {"ep", ep}, {"dp", expert_dp()}, {"pp", pp}},
                       order);
}

std::string ParallelDims::to_string() const {
  return fmt::format("world={} tp={} cp={} ep={} dp={} pp={} expert_tp={} expert_dp={} order={}",
                     world_size, tp, cp, ep, dp, pp, expert_tp, expert_dp(), order);
}

}  // namespace loom::mesh
