// Single-process checkpoints: a directory <root>/step-<8 digits>/ holding model.safetensors
// (parameters by global name) and state.safetensors (optimizer state, RNG state and, in its
// metadata, the step, data position and the config that wrote it). A checkpoint is written into
// step-N.tmp and renamed when complete, so a crash mid-save never leaves a directory that looks
// complete; older checkpoints beyond `keep` are then removed. The sharded, resharding format of the
// parallel issues builds on the same names.
#pragma once

#include <ATen/ATen.h>

#include <map>
#include <optional>
#include <string>
#include <vector>

#include "loom/comm/communicator.h"
#include "loom/config.pb.h"

namespace loom::checkpoint {

// The "format" metadata value of a single-process checkpoint.
inline constexpr const char* kSingleProcessFormat = "loom-single-1";

struct CheckpointData {
  std::map<std::string, at::Tensor> model;
  std::map<std::string, at::Tensor> state;
  std::map<std::string, std::string> metadata;
};

// Writes `data` into directory `dir` atomically (into `<dir>.tmp`, then renamed), replacing it.
void write_checkpoint(const std::string& dir, const CheckpointData& data);

// <root>/step-<step, 8 digits>: where checkpoint `step` lives.
std::string checkpoint_path(const std::string& root, int64_t step);

// Writes <root>/step-<step>/ (files and directories fsynced; an existing copy of that step is set
// aside until the new one is in place) and returns its path. Then checkpoints newer than `step` are
// set aside (Note: checkpoint lineage), and keep > 0 removes all but the newest `keep`.
std::string save_checkpoint(const std::string& root, int64_t step, const CheckpointData& data,
                            int keep);

// The newest complete checkpoint under root, if any (a missing root is no checkpoint). Newer
// entries passed over (an interrupted or partial write) are logged with the reason. A step whose
// replacement was interrupted between its two renames is found as its surviving `.old` copy.
std::optional<std::string> latest_checkpoint(const std::string& root);

// [Note: checkpoint lineage]
// Steps only grow along one run, so a checkpoint under root that is newer than the step a run
// starts from (a rollback to an earlier step, or a fresh start into a used directory) belongs to
// another branch. Left in place it would be "latest" for the next resume, and pruning (which keeps
// the newest) would delete the new branch's checkpoints as they are written. They are moved, with
// any interrupted writes of those steps, into <root>/abandoned-<UTC time>-after-step-<step>/ and
// named in a warning: never deleted. Returns the names moved. The Trainer calls this on world rank
// 0 when a run starts, and save_checkpoint() before it prunes.
std::vector<std::string> set_aside_newer(const std::string& root, int64_t step);

// The checkpoint a job resumes from: train.resume `resume` is empty (none), a directory, or
// "latest" (the newest complete one under `root`, train.checkpoint_dir; none yet is logged and
// starts from step 0, an empty `root` is a kConfig error).
std::optional<std::string> resume_target(const std::string& resume, const std::string& root);

// The job config a checkpoint stores (metadata "config"); `dir` names it in errors (kIO when it
// has none).
config::JobConfig stored_config(const CheckpointData& data, const std::string& dir);

// Loads a checkpoint directory; a missing directory or file is a kIO error naming it.
CheckpointData load_checkpoint(const std::string& dir);

// Collective over `comm`: rank `root` receives every other rank's model and state tensors (as
// safetensors bytes) and merges them into its `data` (e.g. the pipeline stages' parameters into the
// writer's). A name held by two ranks is a kInternal error naming it and both ranks. Other ranks'
// `data` is left as it was; metadata is not sent.
void gather_checkpoint_data(CheckpointData& data, comm::Communicator& comm, int root = 0);

}  // namespace loom::checkpoint
