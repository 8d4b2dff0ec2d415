#include "loom/train/executor.h"

#include <fmt/format.h>

#include <algorithm>

#include "loom/core/error.h"

namespace loom::train {

namespace pl = parallel::pipeline;

StepExecutor::StepExecutor(std::vector<model::GptModel*> chunks, pl::ScheduleOptions schedule,
                           comm::CommunicatorPtr pp, parallel::GradSync* sync, at::Device device)
    : chunks_(std::move(chunks)),
      schedule_(schedule),
      pp_(std::move(pp)),
      sync_(sync),
      device_(device) {
  LOOM_INTERNAL_CHECK(!chunks_.empty() && static_cast<int>(chunks_.size()) == schedule_.chunks,
                      "executor: {} model chunks for a schedule of {}", chunks_.size(),
                      schedule_.chunks);
  if (schedule_.stages == 1) {
    // One stage: the degenerate schedule (Note: step executor), whatever the configured kind.
    LOOM_INTERNAL_CHECK(schedule_.chunks == 1, "executor: {} chunks on one pipeline stage",
                        schedule_.chunks);
    schedule_.kind = pl::ScheduleKind::k1F1B;
    pp_ = nullptr;
    return;
  }
  // [Note: pipeline runner] matches sends and receives by tag, with independent progress (MPI's
  // model). NCCL has no tags and matches in posting order on one stream, where 1F1B's crossing
  // transfers (activations one way, gradients the other) can block each other; that ordering is not
  // built yet, and CUDA activations are not staged through MPI.
  LOOM_INTERNAL_CHECK(pp_ && pp_->size() == schedule_.stages,
                      "executor: a schedule of {} stages over a pipeline group of {}",
                      schedule_.stages, pp_ ? pp_->size() : 0);
  LOOM_CHECK_KIND(
      ErrorKind::kUnsupported, std::string(pp_->backend()) != "nccl" && pp_->device() == device_,
      "parallel.pp = {} on train.device '{}' over the {} backend: the pipeline runner needs "
      "tag-matched point-to-point on the activations' device, which this build has only for CPU "
      "tensors over MPI (see docs/parallelism.md)",
      schedule_.stages, device_.str(), pp_->backend());
}

StepExecutor::~StepExecutor() = default;

StepExecutor::Runner& StepExecutor::runner_for(int microbatches) {
  auto it = runners_.find(microbatches);
  if (it != runners_.end()) return it->second;
  pl::ScheduleOptions o = schedule_;
  o.microbatches = microbatches;
  pl::check_options(o);
  Runner r;
  r.runner = std::make_unique<pl::PipelineRunner>(o, pp_);
  // A chunk's gradients are final after the last pass that adds to them: its last B in the table,
  // and with a split backward also its last W (the deferred weight GEMMs). The DP bucket hooks
  // count a parameter only during those passes, and only when it receives a gradient, so no bucket
  // starts its all-reduce while a pass may still add to it.
  for (const auto& a : r.runner->table()) {
    if (a.pass == pl::Pass::kForward) continue;
    auto f = std::find_if(r.final_passes.begin(), r.final_passes.end(),
                          [&](const auto& b) { return b.pass == a.pass && b.chunk == a.chunk; });
    if (f == r.final_passes.end()) {
      r.final_passes.push_back(a);
    } else {
      *f = a;
    }
  }
  return runners_.emplace(microbatches, std::move(r)).first->second;
}

std::string StepExecutor::describe(const std::string& microbatches) const {
  std::string layers;
  for (const auto* c : chunks_) {
    const auto& st = c->stage();
    layers += fmt::format("{}[{}, {}){}{}", layers.empty() ? "" : " + ", st.first_layer,
                          st.first_layer + st.num_layers, st.pre_process ? " +embedding" : "",
                          st.post_process ? " +head" : "");
  }
  return fmt::format(
      "{} schedule, {} stages x {} chunk(s), {} micro-batches per step; this rank: layers {}",
      pl::schedule_name(schedule_.kind), schedule_.stages, schedule_.chunks, microbatches, layers);
}

const pl::PipelineRunner& StepExecutor::runner(int microbatches) {
  return *runner_for(microbatches).runner;
}

pl::RunnerCallbacks StepExecutor::callbacks(const std::vector<model::Batch>& batches) const {
  const model::ModelSpec& spec = chunks_.front()->spec();
  const bool sp = chunks_.front()->tensor_parallel().sp();
  const int64_t tp = chunks_.front()->tensor_parallel().size();
  pl::RunnerCallbacks cb;
  cb.activation_options =
      at::TensorOptions()
          .dtype(spec.param_dtype == at::kDouble ? at::kDouble : spec.compute_dtype)
          .device(device_);
  const int64_t hidden = spec.hidden;
  cb.shape = [&batches, sp, hidden, tp](int mb) {
    const model::Batch& b = batches[static_cast<size_t>(mb)];
    return std::vector<int64_t>{sp ? b.seq_len() / tp : b.seq_len(), b.batch_size(), hidden};
  };
  return cb;
}

StepSums StepExecutor::train(const std::vector<model::Batch>& batches, double loss_tokens,
                             double aux_scale, const std::function<void()>& before_backward) {
  LOOM_CHECK(!batches.empty(), "executor: a step needs at least one micro-batch");
  Runner& r = runner_for(static_cast<int>(batches.size()));
  const bool moe = chunks_.front()->spec().is_moe();
  StepSums sums;
  // Summed in fp64 on the host, micro-batch by micro-batch (the order of the reported loss).
  at::Tensor acc = at::zeros({2}, at::kDouble);
  pl::RunnerCallbacks cb = callbacks(batches);
  cb.forward = [&](int c, int mb, const at::Tensor& input) {
    model::GptModel& chunk = *chunks_[static_cast<size_t>(c)];
    model::GptModel::StageOutput out = chunk.forward_stage(batches[static_cast<size_t>(mb)], input);
    pl::ChunkOutput co;
    co.hidden = out.hidden;
    at::Tensor loss;
    if (chunk.stage().post_process) {
      loss = out.loss.loss_sum / loss_tokens;
      acc[0] += out.loss.loss_sum.detach().to(at::kDouble).cpu();
    }
    if (moe && out.loss.aux_loss.defined() && out.loss.aux_loss.requires_grad()) {
      at::Tensor aux = out.loss.aux_loss * aux_scale;
      loss = loss.defined() ? loss + aux : aux;
      acc[1] += out.loss.aux_loss.detach().to(at::kDouble).cpu();
    }
    co.loss = loss;
    return co;
  };
  bool first_backward = true;
  cb.before_pass = [&](const pl::Action& a) {
    if (a.pass == pl::Pass::kForward) return;
    if (first_backward && before_backward) before_backward();
    first_backward = false;
    if (sync_)
      sync_->arm(std::find(r.final_passes.begin(), r.final_passes.end(), a) !=
                 r.final_passes.end());
  };
  sums.stats = r.runner->run(cb);
  sums.loss_sum = acc[0].item<double>();
  sums.aux_sum = acc[1].item<double>();
  return sums;
}

EvalSums StepExecutor::evaluate(const std::vector<model::Batch>& batches) {
  EvalSums e;
  if (batches.empty()) return e;
  Runner& r = runner_for(static_cast<int>(batches.size()));
  pl::RunnerCallbacks cb = callbacks(batches);
  cb.forward = [&](int c, int mb, const at::Tensor& input) {
    model::GptModel& chunk = *chunks_[static_cast<size_t>(c)];
    model::GptModel::StageOutput out = chunk.forward_stage(batches[static_cast<size_t>(mb)], input);
    if (chunk.stage().post_process) {  // only the last stage has the loss
      e.loss_sum += out.loss.loss_sum.item<double>();
      e.tokens += static_cast<double>(out.loss.num_tokens);
    }
    pl::ChunkOutput co;
    co.hidden = out.hidden;
    return co;
  };
  r.runner->forward_only(cb, static_cast<int>(batches.size()));
  return e;
}

}  // namespace loom::train
