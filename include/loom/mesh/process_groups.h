// ProcessGroups: this rank's coordinates in the layout and a communicator for every group a
// parallel feature needs, all carved out of one world communicator by split (cached by member
// list).
//
// Dense groups:  tp, cp, dp, dp_cp, pp, tp_pp (model parallel), tp_cp, tp_dp_cp (MoE global
//                load-balancing counts), embedding (first and last pipeline stage of each
//                pipeline).
// Expert groups: ep, expert_tp, expert_dp, tp_ep (expert_tp x ep: the token dispatcher); the expert
//                pipeline groups are identical to the dense ones (checked).
// Groups that are the same partition of the ranks (e.g. dp and dp_cp when cp = 1) share one
// communicator. A rank outside every embedding group (a middle pipeline stage) has none.
#pragma once

#include <string>
#include <utility>
#include <vector>

#include "loom/comm/communicator.h"
#include "loom/mesh/parallel_dims.h"

namespace loom::mesh {

enum class Group {
  kTp,
  kCp,
  kDp,
  kDpCp,
  kPp,
  kTpPp,
  kTpCp,
  kTpDpCp,
  kEmbedding,
  kEp,
  kExpertTp,
  kExpertDp,
  kTpEp,
};
constexpr int kNumGroups = 13;
const char* group_name(Group g);

// The member lists (world ranks) of every group of kind `g`: a partition of the ranks, except for
// kEmbedding which covers only first and last pipeline stages. Pure maths, no communicator.
std::vector<std::vector<int>> group_partition(const ParallelDims& dims, Group g);

class ProcessGroups {
 public:
  // Collective over `world`: every rank must call it with the same dims.
  ProcessGroups(const ParallelDims& dims, comm::CommunicatorPtr world);

  const ParallelDims& dims() const { return dims_; }
  int rank() const { return rank_; }  // world rank
  comm::CommunicatorPtr world() const { return world_; }
  // Sets the timeout of the world and of every group (Communicator::set_timeout_s).
  void set_timeout_s(double seconds) const;

  // The communicator of group `g` (nullptr for kEmbedding on a middle pipeline stage).
  comm::CommunicatorPtr group(Group g) const { return groups_[static_cast<int>(g)]; }
  // World ranks of this rank's group `g` (empty when it has none).
  const std::vector<int>& ranks(Group g) const { return ranks_[static_cast<int>(g)]; }
  // A second communicator over group `g`'s ranks (collective over the group; the same object when
  // asked again; the group itself when it has one rank; nullptr where the rank has no such group).
  // Its collectives are ordered apart from the group's own: for non-blocking traffic whose start
  // differs between ranks relative to the group's blocking collectives (DP gradient buckets
  // launched from backward hooks, while the MoE dispatcher's all-to-alls run on the same ranks).
  // Named "<group>-<purpose>"; set_timeout_s covers it.
  comm::CommunicatorPtr side_channel(Group g, const std::string& purpose);

  comm::CommunicatorPtr tp_group() const { return group(Group::kTp); }
  comm::CommunicatorPtr cp_group() const { return group(Group::kCp); }
  comm::CommunicatorPtr dp_group() const { return group(Group::kDp); }
  comm::CommunicatorPtr dp_cp_group() const { return group(Group::kDpCp); }
  comm::CommunicatorPtr pp_group() const { return group(Group::kPp); }
  comm::CommunicatorPtr ep_group() const { return group(Group::kEp); }
  comm::CommunicatorPtr expert_tp_group() const { return group(Group::kExpertTp); }
  comm::CommunicatorPtr expert_dp_group() const { return group(Group::kExpertDp); }
  comm::CommunicatorPtr embedding_group() const { return group(Group::kEmbedding); }

  int tp_rank() const { return tp_rank_; }
  int cp_rank() const { return cp_rank_; }
  int dp_rank() const { return dp_rank_; }
  int pp_rank() const { return pp_rank_; }
  int ep_rank() const { return ep_rank_; }
  int expert_tp_rank() const { return expert_tp_rank_; }
  int expert_dp_rank() const { return expert_dp_rank_; }
  int tp_size() const { return dims_.tp; }
  int cp_size() const { return dims_.cp; }
  int dp_size() const { return dims_.dp; }
  int pp_size() const { return dims_.pp; }
  int ep_size() const { return dims_.ep; }
  int expert_tp_size() const { return dims_.expert_tp; }
  int expert_dp_size() const { return dims_.expert_dp(); }

  bool pp_is_first_stage() const { return pp_rank_ == 0; }
  bool pp_is_last_stage() const { return pp_rank_ == dims_.pp - 1; }
  // World ranks of the neighbouring pipeline stages (wrapping around, as interleaving needs).
  int pp_next_rank() const;
  int pp_prev_rank() const;

  // "tp1 cp0 dp1 pp0" (+ " ep1" when ep > 1), for log prefixes.
  std::string coords_string() const;

 private:
  ParallelDims dims_;
  comm::CommunicatorPtr world_;
  int rank_;
  std::vector<comm::CommunicatorPtr> groups_;
  std::vector<std::pair<std::string, comm::CommunicatorPtr>> side_channels_;
  std::vector<std::vector<int>> ranks_;
  int tp_rank_ = 0, cp_rank_ = 0, dp_rank_ = 0, pp_rank_ = 0;
  int ep_rank_ = 0, expert_tp_rank_ = 0, expert_dp_rank_ = 0;
};

}  // namespace loom::mesh
