// ParallelDims: the sizes of the 5-D parallel layout and its rank order.
//
// Dense layers see (tp, cp, dp, pp): tp*cp*dp*pp = world. Expert layers see the same ranks folded
// differently, as Megatron-Core's "MoE parallel folding" does: (expert_tp, ep, expert_dp, pp) with
// expert_dp = world / (expert_tp*ep*pp). Both use the same order string, so the pipeline groups of
// the two are identical. Passed explicitly (STYLE.md convention 8); there is no global instance.
#pragma once

#include <string>

#include "loom/config.pb.h"
#include "loom/mesh/rank_generator.h"

namespace loom::mesh {

struct ParallelDims {
  int world_size = 1;
  int tp = 1;
  int cp = 1;
  int ep = 1;
  int dp = 1;
  int pp = 1;
  int expert_tp = 1;
  std::string order = "tp-cp-ep-dp-pp";

  // Validates and completes a layout: dp = 0 derives it from the world size; expert_tp = 0 means tp.
  // A layout whose product is not the world size, or that does not divide it, is a kConfig error
  // that shows the arithmetic.
  static ParallelDims create(int world_size, int tp, int cp, int ep, int dp, int pp,
                             int expert_tp = 0, const std::string& order = "tp-cp-ep-dp-pp");
  static ParallelDims from_config(const config::ParallelConfig& config, int world_size);

  int expert_dp() const { return world_size / (expert_tp * ep * pp); }

  // Dense layout: dims tp, cp, ep (size 1), dp, pp.
  RankGenerator dense() const;
  // Expert layout: dims tp (= expert_tp), cp (size 1), ep, dp (= expert_dp), pp.
  RankGenerator expert() const;

  // "world=8 tp=2 cp=1 ep=2 dp=2 pp=2 expert_tp=1 expert_dp=2 order=tp-cp-ep-dp-pp"
  std::string to_string() const;
};

}  // namespace loom::mesh
