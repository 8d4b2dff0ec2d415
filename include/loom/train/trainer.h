// The training loop: global batches of micro-batches, per-token loss normalisation, gradient
// accumulation, data-parallel gradient reduction, clipping, AdamW with a schedule, evaluation,
// checkpoints that resume bit-identically, and per-step metrics (log line, JSONL, progress bar).
//
// [Note: loss scaling]
// A step's global batch holds G sequences, split over DP ranks and M micro-batches per rank. The
// loss that is differentiated is
//     sum over all micro-batches and ranks of ( loss_sum_mb / N  +  aux_mb / (M * DP) )
// where N is the number of loss tokens in the whole global batch (counted before the first forward
// and all-reduced over DP). The language-model part is therefore the per-token mean over the global
// batch, whatever the split into ranks and micro-batches; the MoE auxiliary losses are averaged
// over micro-batches. Gradients are summed over DP.
//
// With pipeline parallelism the same objective is split by stage: the last virtual stage
// differentiates loss_sum_mb / N plus its own MoE layers' aux_mb / (M * DP), every other stage only
// its MoE layers' aux term (N is known on every stage: each reads the micro-batch). The sum over
// stages is the objective above. The reported loss and aux loss are summed over the pipeline group.
// A tied embedding's two copies (first stage: the lookup, last stage: the head) get the sum of both
// gradients from an all-reduce over the embedding group after the data-parallel reduction; the
// gradient norm counts the owner only (Parameter::pipeline_copy).
#pragma once

#include <array>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "loom/checkpoint/training_state.h"
#include "loom/comm/communicator.h"
#include "loom/config.pb.h"
#include "loom/core/timer.h"
#include "loom/data/loader.h"
#include "loom/data/source.h"
#include "loom/mesh/process_groups.h"
#include "loom/model/gpt.h"
#include "loom/optim/adamw.h"
#include "loom/optim/schedule.h"
#include "loom/parallel/grad_sync.h"
#include "loom/parallel/pipeline.h"
#include "loom/train/executor.h"
#include "loom/train/fault.h"
#include "loom/train/metrics.h"

namespace loom::train {

class Trainer {
 public:
  // `world`: the job's communicator (nullptr: a world of one). `source`: nullptr makes the one the
  // config names. Validates the whole config; errors name the field.
  explicit Trainer(const config::JobConfig& config, comm::CommunicatorPtr world = nullptr,
                   std::unique_ptr<data::DataSource> source = nullptr);
  ~Trainer();
  Trainer(const Trainer&) = delete;
  Trainer& operator=(const Trainer&) = delete;

  // Resumes if train.resume asks, trains to train.steps with evaluation and checkpoints as
  // configured, and returns a summary (also logged).
  TrainSummary fit();

  StepMetrics train_step();
  EvalMetrics evaluate();

  // Writes a checkpoint of the current state to train.checkpoint_dir (rank 0 writes; every rank
  // waits for it). Returns its directory.
  std::string save_checkpoint();
  // Restores model, optimizer, step, data position and RNG from a checkpoint directory.
  void load_checkpoint(const std::string& dir);

  // This rank's model: its first pipeline chunk (the whole model without pipeline parallelism).
  model::GptModel& model() { return *chunks_.front(); }
  // Every model chunk of this rank (virtual stage c * pp + pp rank for chunk c).
  const std::vector<std::unique_ptr<model::GptModel>>& chunks() const { return chunks_; }
  // This rank's parameters, every chunk's in chunk order (shared with the chunks: the same
  // tensors).
  std::vector<model::Parameter>& parameters() { return params_; }
  // The pipeline runner of the configured micro-batch count (nullptr without pipeline parallelism;
  // the executor runs a one-stage table then).
  const parallel::pipeline::PipelineRunner* pipeline() const { return pipeline_; }
  StepExecutor& executor() { return *executor_; }
  optim::Optimizer& optimizer() { return *optimizer_; }
  const optim::LrSchedule& schedule() const { return *schedule_; }
  int64_t step() const { return step_; }
  int64_t consumed_samples() const { return loader_->position(); }
  const config::JobConfig& config() const { return config_; }
  const std::vector<StepMetrics>& history() const { return history_; }
  double peak_flops() const { return peak_flops_; }

  const mesh::ProcessGroups& groups() const { return *groups_; }
  // The DP gradient buckets (nullptr when dp = 1 or with the distributed optimizer).
  const parallel::GradBuckets* grad_buckets() const { return grad_sync_->buckets(); }
  // The full (unpadded) tensor of parameter `p` whose local value (or optimizer state) is `local`:
  // gathered over TP for sharded parameters. Collective over the TP group.
  at::Tensor full_tensor(const model::Parameter& p, const at::Tensor& local) const;
  // [Note: gradient observer] `f` runs on every rank of every step after the step's gradients are
  // final (reduced over DP, TP and the embedding group) and before clipping and the update; it may
  // call full_gradients() (a collective: every rank's observer must call it the same way). Tests
  // compare each parameter's gradient with a single process's through it.
  void set_gradient_observer(std::function<void()> f) { gradient_observer_ = std::move(f); }
  // The step's final gradient of each of parameters() (full, unpadded tensors; zeros for a
  // parameter that got none). Valid in the gradient observer. Collective over TP (and DP with the
  // distributed optimizer, whose reduced gradients live in shards).
  std::vector<at::Tensor> full_gradients() const;
  int64_t global_batch_size() const { return global_batch_; }
  // Micro-batches per step on each DP rank (WINDOWS mode; 0 in DOCUMENTS mode, where it varies).
  int64_t micro_batches_per_rank() const { return num_micro_; }
  data::MicroBatchLoader& loader() { return *loader_; }

 private:
  // The pieces, in the order the constructor builds them.
  void build_data(const model::ModelSpec& spec);       // batch sizes, data source, loader
  void build_model(const model::ModelSpec& spec);      // this rank's chunks and parameters
  void build_optimizer(const model::ModelSpec& spec);  // optimizer, gradient sync, schedule, state
  void build_executor();                               // schedule and step executor
  void log_setup(const model::ModelSpec& spec);
  // Note: hybrid data parallelism cost model. Collective over the world; before build_optimizer.
  void fit_hdp_cost(const model::ModelSpec& spec);
  void set_hdp_ring(const model::ModelSpec& spec);
  void sum_over_pp_dp(at::Tensor& sums) const;  // collective over the pipeline and DP-CP groups
  // This CP rank's share of each micro-batch (Note: balanced context-parallel split).
  std::vector<model::Batch> cp_local(const std::vector<model::Batch>& batches) const;
  // Hybrid data parallelism: each micro-batch of `data` a group runs becomes this rank's share,
  // with the group (a view of the pool: Note: group views) attached; the rest stay whole.
  std::vector<model::Batch> hdp_local(const data::StepData& data) const;
  void set_offload_rule(const model::ModelSpec& spec);
  // The micro-batches this rank computes: its CP or HDP shares of the loaded ones.
  std::vector<model::Batch> local_batches(const data::StepData& data) const;
  void set_long_timeouts(bool on) const;        // Note: timeouts
  void write_trace() const;                     // Note: traces
  void check_stragglers(const StepMetrics& m);  // Note: stragglers

  config::JobConfig config_;
  comm::CommunicatorPtr world_;
  std::unique_ptr<mesh::ProcessGroups> groups_;
  std::unique_ptr<data::DataSource> source_;
  std::vector<std::unique_ptr<model::GptModel>> chunks_;
  std::vector<model::MoeLayer*> moe_layers_;  // every chunk's, in order
  parallel::ContextParallel cp_;
  parallel::ExpertParallel ep_;  // disabled without expert parallelism
  std::vector<model::Parameter> params_;
  std::unique_ptr<StepExecutor> executor_;
  const parallel::pipeline::PipelineRunner* pipeline_ = nullptr;  // pp > 1: the executor's runner
  std::unique_ptr<optim::Optimizer> optimizer_;
  std::unique_ptr<parallel::GradSync> grad_sync_;  // after optimizer_: ZeRO-1 reduces into it
  std::unique_ptr<optim::LrSchedule> schedule_;
  std::unique_ptr<checkpoint::TrainingState> state_;  // Note: training state
  std::unique_ptr<MetricsSinks> sinks_;  // rank 0: console, progress, JSONL, TensorBoard
  at::Device device_ = at::kCPU;
  int64_t global_batch_ = 0, num_micro_ = 0;
  int64_t step_ = 0;
  bool documents_ = false;       // data.mode DOCUMENTS
  bool hdp_ = false;             // parallel.hdp (Note: hybrid data parallelism plan)
  data::OffloadRule offload_;    // train.offload_* (Note: activation offload)
  bool logged_offload_ = false;  // the first step's offload counters are logged
  std::unique_ptr<data::MicroBatchLoader> loader_;
  double peak_flops_ = 0;
  bool warned_mfu_ = false;
  std::optional<std::pair<int64_t, int64_t>> trace_steps_;  // logging.trace_steps
  std::array<double, 4> straggler_sums_{};  // compute, data, optimizer, other: s since the check
  int64_t straggler_steps_ = 0;
  std::vector<StepMetrics> history_;
  Timers timers_;
  std::string last_checkpoint_;
  std::optional<FaultInjection> fault_;  // LOOM_FAULT_INJECT (tests of failure handling)
  std::function<void()> gradient_observer_;
};

}  // namespace loom::train
