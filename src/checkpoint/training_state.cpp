#include "loom/checkpoint/training_state.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/grad_mode.h>

#include <exception>
#include <mutex>

#include "loom/core/config.h"
#include "loom/core/error.h"
#include "loom/core/logging.h"

namespace loom::checkpoint {

namespace {
// The loader's named state from a checkpoint's metadata ("consumed_samples" is the position's name
// in checkpoints written before the loader had one of its own).
std::map<std::string, int64_t> loader_state(const std::map<std::string, std::string>& metadata) {
  std::map<std::string, int64_t> state;
  for (const auto& [name, value] : metadata) {
    const bool position = name == "consumed_samples";
    if (!position && name.rfind("data.", 0) != 0) continue;
    const bool digits =
        !value.empty() && value.find_first_not_of("0123456789") == std::string::npos;
    LOOM_CHECK_KIND(ErrorKind::kIO, digits, "metadata '{}' is '{}', not a count", name, value);
    state[position ? "data.consumed_samples" : name] = std::stoll(value);
  }
  return state;
}
}  // namespace

TrainingState::TrainingState(StateParts parts) : parts_(std::move(parts)) {
  LOOM_INTERNAL_CHECK(parts_.params && parts_.optimizer && parts_.loader && parts_.world,
                      "training state: parameters, optimizer, loader and world are required");
}

CheckpointData TrainingState::gather(int64_t step,
                                     const std::map<std::string, std::string>& metadata) const {
  CheckpointData data;
  const std::vector<optim::NamedTensor> optim_state =
      parts_.optimizer->state();  // collective with ZeRO-1
  comm::Communicator* tp = parts_.tp ? parts_.tp.get() : nullptr;
  std::map<std::string, const parallel::Parameter*> by_name;
  for (const auto& p : *parts_.params) {
    if (!p.pipeline_copy) by_name[p.name] = &p;  // a pipeline copy is saved by its owner
  }
  auto owner_of = [&](const std::string& state_name) -> const parallel::Parameter* {
    auto it = by_name.find(state_name.substr(0, state_name.rfind('.')));
    return it == by_name.end() ? nullptr : it->second;
  };
  // Expert shards: every expert group gathers its own (a collective of the group, which spans DP
  // replicas); only the saving replica keeps them (on the host, as the checkpoint holds them).
  std::map<std::string, at::Tensor> experts;
  if (parts_.experts.enabled()) {
    auto keep = [&](const std::string& key, const at::Tensor& full) {
      if (parts_.dp_rank == 0) experts[key] = full.to(at::kCPU);
    };
    for (const auto& p : *parts_.params) {
      if (p.ep_sharded()) keep(p.name, parallel::expert_full_tensor(p, p.tensor, parts_.experts));
    }
    for (const auto& s : optim_state) {
      const parallel::Parameter* owner = owner_of(s.name);
      if (owner && owner->ep_sharded())
        keep("optim." + s.name, parallel::expert_full_tensor(*owner, s.tensor, parts_.experts));
    }
  }
  auto full = [&](const parallel::Parameter& p, const at::Tensor& local, const std::string& key) {
    auto it = experts.find(key);
    return it != experts.end() ? it->second : parallel::full_tensor(p, local, tp);
  };
  if (parts_.dp_rank == 0) {
    for (const auto& p : *parts_.params) {
      if (!p.pipeline_copy) data.model[p.name] = full(p, p.tensor, p.name);
    }
    for (const auto& s : optim_state) {
      const parallel::Parameter* owner = owner_of(s.name);
      if (owner == nullptr) continue;  // a pipeline copy's state
      data.state["optim." + s.name] = full(*owner, s.tensor, "optim." + s.name);
    }
    for (const auto& [name, t] : parts_.buffers) data.state["buffer." + name] = t.to(at::kCPU);
    // Each stage's (tp 0, dp 0) rank sends its tensors to world rank 0 over the pipeline group.
    if (parts_.pp && parts_.pp->size() > 1 && parts_.tp_rank == 0)
      gather_checkpoint_data(data, *parts_.pp, 0);
  }
  if (parts_.world->rank() != 0) return {};
  {
    at::Generator gen = at::detail::getDefaultCPUGenerator();
    std::lock_guard<std::mutex> lock(gen.mutex());
    data.state["rng.cpu"] = gen.get_state();
  }
  data.metadata = metadata;
  if (parts_.config) data.metadata["config"] = config::to_text(*parts_.config);
  data.metadata["format"] = kSingleProcessFormat;
  data.metadata["step"] = std::to_string(step);
  for (const auto& [name, value] : parts_.loader->state()) {
    // The loader's position under the name checkpoints have always used.
    data.metadata[name == "data.consumed_samples" ? "consumed_samples" : name] =
        std::to_string(value);
  }
  data.metadata["optimizer_step"] = std::to_string(parts_.optimizer->step_count());
  data.metadata["global_batch"] = std::to_string(parts_.loader->options().global_batch);
  data.metadata["world_size"] = std::to_string(parts_.world->size());
  return data;
}

RestoredState TrainingState::load(const std::string& dir) {
  // Everything is checked before anything is changed, and every rank learns whether any rank's
  // check failed: a pipeline stage whose parameters are missing must not leave the other stages
  // waiting in a collective (and a failed load leaves the model as it was).
  CheckpointData data;
  std::vector<optim::NamedTensor> state;
  std::exception_ptr failure;
  auto& params = *parts_.params;
  try {
    data = load_checkpoint(dir);
    auto meta = [&](const char* key) -> std::string {
      auto it = data.metadata.find(key);
      LOOM_CHECK_KIND(ErrorKind::kIO, it != data.metadata.end(),
                      "checkpoint '{}': metadata '{}' is missing", dir, key);
      return it->second;
    };
    LOOM_CHECK_KIND(ErrorKind::kIO, meta("format") == kSingleProcessFormat,
                    "checkpoint '{}' has format '{}', this build reads '{}'", dir, meta("format"),
                    kSingleProcessFormat);
    for (const char* key : {"step", "consumed_samples", "optimizer_step"}) {
      const std::string v = meta(key);
      LOOM_CHECK_KIND(ErrorKind::kIO,
                      !v.empty() && v.find_first_not_of("0123456789") == std::string::npos,
                      "checkpoint '{}': metadata '{}' is '{}', not a count", dir, key, v);
    }
    LOOM_CHECK_KIND(ErrorKind::kIO, data.state.count("rng.cpu") == 1,
                    "checkpoint '{}': 'rng.cpu' is missing", dir);
    if (parts_.config) {  // Note: resume config check
      auto saved = data.metadata.find("config");
      auto source = data.metadata.find("source");
      if (source != data.metadata.end()) {
        // An import (tools/convert_hf --to-loom) holds a config derived from another format, not
        // a training run's: its tensors are checked by name and shape below, its config is not.
        LOOM_LOG_INFO("checkpoint '{}' was imported ({}): its config is not compared", dir,
                      source->second);
      } else if (saved == data.metadata.end()) {
        LOOM_LOG_WARN("checkpoint '{}' stores no config: resuming without the config check", dir);
      } else {
        config::check_resume_config(stored_config(data, dir), *parts_.config, dir);
      }
      // The effective global batch (train.global_batch_size 0 derives it from the layout).
      auto gb = data.metadata.find("global_batch");
      const int64_t now = parts_.loader->options().global_batch;
      const bool allow = config::change_allowed(*parts_.config, "train.global_batch_size");
      LOOM_CHECK_CONFIG(
          gb == data.metadata.end() || allow || gb->second == std::to_string(now),
          "checkpoint '{}' was written with a global batch of {} sequences per step, "
          "this run has {} (train.global_batch_size, or micro_batch_size x dp when it "
          "is 0); set train.global_batch_size, or list train.global_batch_size in "
          "train.allow_config_changes to change it on purpose",
          dir, gb == data.metadata.end() ? "" : gb->second, now);
    }
    try {
      parts_.loader->check_state(loader_state(data.metadata));
    } catch (const Error& e) {
      LOOM_THROW(ErrorKind::kIO, "checkpoint '{}': {}", dir, e.message());
    }
    std::map<std::string, const parallel::Parameter*> by_name;
    for (const auto& p : params) {
      auto it = data.model.find(p.name);
      LOOM_CHECK_KIND(
          ErrorKind::kIO, it != data.model.end(),
          "checkpoint '{}' has no parameter '{}': was it written for a different model config?",
          dir, p.name);
      LOOM_CHECK_KIND(ErrorKind::kIO, it->second.sizes() == at::IntArrayRef(p.global_shape),
                      "checkpoint '{}': parameter '{}' has shape {}, the model needs {}", dir,
                      p.name, it->second.sizes(), at::IntArrayRef(p.global_shape));
      by_name[p.name] = &p;
    }
    for (const auto& [name, t] : data.state) {
      if (name.rfind("optim.", 0) != 0) continue;
      const std::string key = name.substr(6);
      auto owner = by_name.find(key.substr(0, key.rfind('.')));
      if (owner == by_name.end()) continue;  // another pipeline stage's
      LOOM_CHECK_KIND(ErrorKind::kIO, t.sizes() == at::IntArrayRef(owner->second->global_shape),
                      "checkpoint '{}': optimizer state '{}' has shape {}, the parameter needs {}",
                      dir, key, t.sizes(), at::IntArrayRef(owner->second->global_shape));
      state.push_back({key, parallel::local_of(t, *owner->second)});
    }
    for (const auto& [name, t] : parts_.buffers) {
      auto it = data.state.find("buffer." + name);
      if (it == data.state.end() && data.metadata.count("source") == 1) {
        // An import (tools/convert_hf --to-loom) has no training buffers: they start as at
        // initialisation (zero expert biases).
        LOOM_LOG_WARN("checkpoint '{}' was imported and has no '{}': it starts from zeros", dir,
                      name);
        continue;
      }
      LOOM_CHECK_KIND(ErrorKind::kIO, it != data.state.end(),
                      "checkpoint '{}' has no '{}' (state 'buffer.{}'): was it written before "
                      "model.moe.bias_update_rate was set, or for a different model config?",
                      dir, name, name);
      LOOM_CHECK_KIND(ErrorKind::kIO, it->second.sizes() == t.sizes(),
                      "checkpoint '{}': '{}' has shape {}, the model needs {}", dir, name,
                      it->second.sizes(), t.sizes());
    }
    // The optimizer's own names (none for SGD): all present, or nothing is loaded.
    std::map<std::string, bool> have;
    for (const auto& s : state) have[s.name] = true;
    for (const auto& name : parts_.optimizer->state_names()) {
      LOOM_CHECK_KIND(ErrorKind::kIO, have.count(name) == 1,
                      "checkpoint '{}' has no optimizer state '{}': was it written with another "
                      "optim.optimizer?",
                      dir, name);
    }
  } catch (const Error&) {
    failure = std::current_exception();
  }
  // Parameters this rank saves (not pipeline copies), summed over the stages; and whether any rank
  // failed.
  int64_t owned = 0;
  for (const auto& p : params) owned += p.pipeline_copy ? 0 : 1;
  const double failed =
      comm::all_reduce_scalar(failure ? 1.0 : 0.0, parts_.world.get(), comm::ReduceOp::kMax);
  if (failure) std::rethrow_exception(failure);
  LOOM_CHECK_KIND(ErrorKind::kIO, failed == 0,
                  "checkpoint '{}' does not fit this model on another rank (see that rank's "
                  "error): was it written "
                  "for a different model config?",
                  dir);
  if (parts_.pp && parts_.pp->size() > 1) {
    owned =
        static_cast<int64_t>(comm::all_reduce_scalar(static_cast<double>(owned), parts_.pp.get()));
  }
  LOOM_CHECK_KIND(
      ErrorKind::kIO, static_cast<int64_t>(data.model.size()) == owned,
      "checkpoint '{}' holds {} parameters, the model has {}: was it written for a different "
      "model config?",
      dir, data.model.size(), owned);
  // Restore: nothing below can fail on a checked checkpoint.
  auto meta = [&](const char* key) { return std::stoll(data.metadata.at(key)); };
  at::NoGradGuard no_grad;
  for (auto& p : params) p.tensor.copy_(parallel::local_of(data.model.at(p.name), p));
  for (auto& [name, t] : parts_.buffers) {
    auto it = data.state.find("buffer." + name);
    if (it != data.state.end()) t.copy_(it->second);
  }
  parts_.optimizer->load_state(state, meta("optimizer_step"));
  {
    at::Generator gen = at::detail::getDefaultCPUGenerator();
    std::lock_guard<std::mutex> lock(gen.mutex());
    gen.set_state(data.state.at("rng.cpu"));
  }
  parts_.loader->load_state(loader_state(data.metadata));
  RestoredState r;
  r.step = meta("step");
  r.consumed_samples = parts_.loader->position();
  return r;
}

std::string TrainingState::save(const std::string& root, int64_t step,
                                const std::map<std::string, std::string>& metadata, int keep) {
  LOOM_CHECK_CONFIG(!root.empty(), "cannot save a checkpoint: the checkpoint directory is empty");
  const CheckpointData data = gather(step, metadata);
  std::string dir, failure;
  if (parts_.world->rank() == 0) {
    try {
      dir = save_checkpoint(root, step, data, keep);
    } catch (const Error& e) {
      failure = e.what();
    }
  }
  // Every rank learns whether the write succeeded (a full disk must not leave the others waiting).
  const double failed = comm::all_reduce_scalar(failure.empty() ? 0.0 : 1.0, parts_.world.get(),
                                                comm::ReduceOp::kMax);
  LOOM_CHECK_KIND(ErrorKind::kIO, failed == 0,
                  "writing the checkpoint of step {} under '{}' failed{}", step, root,
                  failure.empty() ? " on world rank 0 (see its error)" : ": " + failure);
  return dir.empty() ? checkpoint_path(root, step) : dir;
}

}  // namespace loom::checkpoint
