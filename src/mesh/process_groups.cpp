#include "loom/mesh/process_groups.h"

#include <fmt/format.h>

#include <algorithm>

#include "loom/core/error.h"

namespace loom::mesh {

const char* group_name(Group g) {
  switch (g) {
    case Group::kTp:
      return "tp";
    case Group::kCp:
      return "cp";
    case Group::kDp:
      return "dp";
    case Group::kDpCp:
      return "dp-cp";
    case Group::kPp:
      return "pp";
    case Group::kTpPp:
      return "tp-pp";
    case Group::kTpCp:
      return "tp-cp";
    case Group::kTpDpCp:
      return "tp-dp-cp";
    case Group::kEmbedding:
      return "embedding";
    case Group::kEp:
      return "ep";
    case Group::kExpertTp:
      return "expert-tp";
    case Group::kExpertDp:
      return "expert-dp";
    case Group::kTpEp:
      return "tp-ep";
  }
  return "?";
}

std::vector<std::vector<int>> group_partition(const ParallelDims& dims, Group g) {
  RankGenerator dense = dims.dense();
  RankGenerator expert = dims.expert();
  switch (g) {
    case Group::kTp:
      return dense.groups("tp");
    case Group::kCp:
      return dense.groups("cp");
    case Group::kDp:
      return dense.groups("dp");
    case Group::kDpCp:
      return dense.groups("dp-cp");
    case Group::kPp:
      return dense.groups("pp");
    case Group::kTpPp:
      return dense.groups("tp-pp");
    case Group::kTpCp:
      return dense.groups("tp-cp");
    case Group::kTpDpCp:
      return dense.groups("tp-dp-cp");
    case Group::kEmbedding: {
      std::vector<std::vector<int>> out;
      for (const auto& pp : dense.groups("pp")) {
        if (pp.size() == 1) {
          out.push_back(pp);
        } else {
          out.push_back({pp.front(), pp.back()});
        }
      }
      return out;
    }
    case Group::kEp:
      return expert.groups("ep");
    case Group::kExpertTp:
      return expert.groups("tp");
    case Group::kExpertDp:
      return expert.groups("dp");
    case Group::kTpEp:
      return expert.groups("tp-ep");
  }
  LOOM_THROW(ErrorKind::kInternal, "unknown group kind {}", static_cast<int>(g));
}

ProcessGroups::ProcessGroups(const ParallelDims& dims, comm::CommunicatorPtr world)
    : dims_(dims), world_(std::move(world)), rank_(world_->rank()) {
  LOOM_CHECK_CONFIG(world_->size() == dims_.world_size,
                    "parallel layout is for {} ranks ({}), but the world communicator has {}",
                    dims_.world_size, dims_.to_string(), world_->size());
  RankGenerator dense = dims_.dense();
  RankGenerator expert = dims_.expert();
  LOOM_INTERNAL_CHECK(dense.groups("pp") == expert.groups("pp"),
                      "dense and expert pipeline groups differ for {}", dims_.to_string());
  tp_rank_ = dense.coord("tp", rank_);
  cp_rank_ = dense.coord("cp", rank_);
  dp_rank_ = dense.coord("dp", rank_);
  pp_rank_ = dense.coord("pp", rank_);
  ep_rank_ = expert.coord("ep", rank_);
  expert_tp_rank_ = expert.coord("tp", rank_);
  expert_dp_rank_ = expert.coord("dp", rank_);

  groups_.resize(kNumGroups);
  ranks_.resize(kNumGroups);
  std::vector<std::vector<std::vector<int>>> partitions(kNumGroups);
  for (int k = 0; k < kNumGroups; ++k) {
    Group g = static_cast<Group>(k);
    partitions[k] = group_partition(dims_, g);
    // The partitions are the same on every rank, so every rank makes the same reuse decision and
    // the collective split calls stay matched.
    int same = -1;
    for (int j = 0; j < k && same < 0; ++j) {
      if (partitions[j] == partitions[k]) same = j;
    }
    int color = -1, key = 0;
    for (size_t gi = 0; gi < partitions[k].size(); ++gi) {
      const auto& members = partitions[k][gi];
      auto it = std::find(members.begin(), members.end(), rank_);
      if (it != members.end()) {
        color = static_cast<int>(gi);
        key = static_cast<int>(it - members.begin());
        ranks_[k] = members;
      }
    }
    if (same >= 0) {
      groups_[k] = groups_[same];
      continue;
    }
    groups_[k] = world_->split(color, key);
    if (groups_[k] && groups_[k]->name().find("/split") != std::string::npos) {
      groups_[k]->set_name(group_name(g));
    }
    LOOM_INTERNAL_CHECK(!groups_[k] || groups_[k]->world_ranks() == ranks_[k],
                        "group {} has members {}, expected {}", group_name(g),
                        fmt::join(groups_[k]->world_ranks(), ","), fmt::join(ranks_[k], ","));
  }
}

int ProcessGroups::pp_next_rank() const {
  const auto& pp = ranks(Group::kPp);
  return pp[(pp_rank_ + 1) % pp.size()];
}

int ProcessGroups::pp_prev_rank() const {
  const auto& pp = ranks(Group::kPp);
  return pp[(pp_rank_ + pp.size() - 1) % pp.size()];
}

std::string ProcessGroups::coords_string() const {
  std::string s = fmt::format("tp{} cp{} dp{} pp{}", tp_rank_, cp_rank_, dp_rank_, pp_rank_);
  if (dims_.ep > 1) s += fmt::format(" ep{}", ep_rank_);
  return s;
}

void ProcessGroups::set_timeout_s(double seconds) const {
  world_->set_timeout_s(seconds);
  for (const auto& g : groups_) {
    if (g) g->set_timeout_s(seconds);
  }
  for (const auto& [name, c] : side_channels_) c->set_timeout_s(seconds);
}

comm::CommunicatorPtr ProcessGroups::side_channel(Group g, const std::string& purpose) {
  const comm::CommunicatorPtr base = group(g);
  if (!base || base->size() == 1) return base;  // nothing to order apart
  const std::string name = fmt::format("{}-{}", group_name(g), purpose);
  for (const auto& [n, c] : side_channels_) {
    if (n == name) return c;
  }
  // A split of the group itself (not of the world, whose cache would return the group): a new
  // communicator over the same ranks in the same order.
  // Splits are cached by member list, so a second purpose over the same ranks splits the first
  // one's channel again (every rank asks for the same channels in the same order: the splits
  // match).
  comm::CommunicatorPtr c = base->split(0, base->rank());
  auto taken = [&](const comm::CommunicatorPtr& x) {
    return std::any_of(side_channels_.begin(), side_channels_.end(),
                       [&](const auto& entry) { return entry.second == x; });
  };
  while (taken(c)) c = c->split(0, c->rank());
  c->set_name(name);
  c->set_timeout_s(base->timeout_s());
  side_channels_.emplace_back(name, c);
  return c;
}

}  // namespace loom::mesh
