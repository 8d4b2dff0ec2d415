// The training state as one named module: model parameters, optimizer state, the loader's
// position, the RNG and the step (DESIGN.md decision 6), gathered into a checkpoint and restored
// from one under any layout.
//
// [Note: training state]
// Saving: every parameter and optimizer-state tensor is written full and unpadded under its global
// name, whatever the layout: each pipeline stage's first DP replica gathers its TP shards (the
// distributed optimizer first gathers its moments over DP; expert shards are gathered over each
// expert group, which spans DP replicas), and the stages send theirs to world rank 0, which adds
// the RNG, the step, the loader state and the config. A tied embedding's pipeline copy is saved
// once, by its owner. Loading: every rank reads the checkpoint and checks it against its own
// parameters and optimizer (names, shapes, formats) before anything is changed; the ranks then
// agree (one all-reduce) whether any check failed, so they fail together, each with its reason or a
// pointer to the rank that had one, and a failed load leaves every rank as it was. Only then are
// parameters, optimizer state, loader position and RNG restored, each rank taking its own shards.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "loom/checkpoint/checkpoint.h"
#include "loom/comm/communicator.h"
#include "loom/config.pb.h"
#include "loom/data/loader.h"
#include "loom/optim/adamw.h"
#include "loom/parallel/expert_parallel.h"
#include "loom/parallel/sharding.h"

namespace loom::checkpoint {

struct StateParts {
  std::vector<parallel::Parameter>* params = nullptr;  // this rank's (every chunk's)
  // Non-trained model state (the MoE expert biases), replicated over TP and DP, by global name:
  // saved as state "buffer.<name>", restored in place.
  std::vector<std::pair<std::string, at::Tensor>> buffers;
  optim::Optimizer* optimizer = nullptr;
  data::MicroBatchLoader* loader = nullptr;
  comm::CommunicatorPtr world;  // the job
  comm::CommunicatorPtr tp;     // TP group (may be null: no TP)
  comm::CommunicatorPtr pp;     // pipeline group (may be null: one stage)
  int dp_rank = 0, tp_rank = 0;
  // The expert group (disabled: no expert parallelism), over which expert shards
  // (Parameter::ep_sharded) and their optimizer state are gathered.
  parallel::ExpertParallel experts;
  // The job's config (may be null): saved with the state, and on load compared with the stored one
  // before anything changes (Note: resume config check in core/config.h).
  const config::JobConfig* config = nullptr;
};

// What a checkpoint restored.
struct RestoredState {
  int64_t step = 0;
  int64_t consumed_samples = 0;
};

class TrainingState {
 public:
  explicit TrainingState(StateParts parts);

  // Collective over the world: the job's named state on world rank 0 (an empty CheckpointData on
  // the other ranks). `metadata` is added to the checkpoint's (e.g. the config text).
  CheckpointData gather(int64_t step, const std::map<std::string, std::string>& metadata) const;

  // Collective over the world: loads checkpoint directory `dir`, checks it on every rank, then
  // restores everything (Note: training state). Throws a kIO error naming the checkpoint and the
  // reason on every rank when any rank's check fails.
  RestoredState load(const std::string& dir);

  // Collective over the world: gathers the state and writes it as checkpoint `step` under `root`
  // (world rank 0 writes, keeping the newest `keep`; 0 keeps all). Every rank learns whether the
  // write succeeded: a failure is a kIO error naming the step and the reason on every rank.
  // Returns the checkpoint's directory.
  std::string save(const std::string& root, int64_t step,
                   const std::map<std::string, std::string>& metadata, int keep);

 private:
  StateParts parts_;
};

}  // namespace loom::checkpoint
