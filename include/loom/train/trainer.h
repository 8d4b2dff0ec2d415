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
// batch, whatever the split into ranks and micro-batches; the MoE auxiliary losses are averaged over
// micro-batches. Gradients are summed over DP.
//
// With pipeline parallelism the same objective is split by stage: the last virtual stage
// differentiates loss_sum_mb / N plus its own MoE layers' aux_mb / (M * DP), every other stage only
// its MoE layers' aux term (N is known on every stage: each reads the micro-batch). The sum over
// stages is the objective above. The reported loss and aux loss are summed over the pipeline group.
// A tied embedding's two copies (first stage: the lookup, last stage: the head) get the sum of both
// gradients from an all-reduce over the embedding group after the data-parallel reduction; the
// gradient norm counts the owner only (Parameter::pipeline_copy).
#pragma once

#include <cstdint>
#include <fstream>
#include <future>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "loom/comm/communicator.h"
#include "loom/config.pb.h"
#include "loom/core/timer.h"
#include "loom/data/source.h"
#include "loom/mesh/process_groups.h"
#include "loom/model/gpt.h"
#include "loom/optim/adamw.h"
#include "loom/optim/distributed.h"
#include "loom/optim/schedule.h"
#include "loom/parallel/data_parallel.h"
#include "loom/parallel/pipeline.h"
#include "loom/train/fault.h"
#include "loom/train/progress.h"
#include "loom/train/tensorboard.h"

namespace loom::train {

struct StepMetrics {
  int64_t step = 0;          // steps completed, including this one
  double loss = 0;           // LM cross-entropy per token over the global batch
  double aux_loss = 0;       // MoE auxiliary losses (balance + z), mean over micro-batches
  double lr = 0;
  double grad_norm = 0;      // before clipping
  int64_t tokens = 0;        // loss tokens in the global batch
  double seconds = 0;        // wall time of the step
  double data_s = 0, forward_s = 0, backward_s = 0, comm_s = 0, optimizer_s = 0;
  double grad_reduce_wait_s = 0;       // DP all-reduce time left after backward (not overlapped)
  double pp_wait_s = 0;                // pipeline: time blocked on activation / gradient receives
  double tokens_per_s = 0;             // global
  double tokens_per_s_per_device = 0;
  double tflops_per_device = 0;        // achieved
  double mfu = 0;                      // achieved / peak, per device
  int64_t rss = 0, peak_rss = 0;
  int64_t device_peak = 0;             // GPU caching-allocator peak (CUDA devices)
  int64_t moe_dropped = 0;             // (token, expert) assignments dropped by capacity
  double moe_max_load = 0;             // max over layers and experts of tokens / mean tokens
};

struct EvalMetrics {
  int64_t step = 0;
  double loss = 0;
  double perplexity = 0;
  int64_t tokens = 0;
};

struct TrainSummary {
  int64_t first_step = 0, last_step = 0;
  double first_loss = 0, last_loss = 0;  // first and last logged training losses
  double best_eval_loss = 0;
  double mean_tokens_per_s = 0, mean_mfu = 0;  // over steps after the first
  double seconds = 0;
  std::string checkpoint;  // the last checkpoint written, if any
};

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
  // This rank's parameters, every chunk's in chunk order (shared with the chunks: the same tensors).
  std::vector<model::Parameter>& parameters() { return params_; }
  // The pipeline runner (nullptr without pipeline parallelism).
  const parallel::pipeline::PipelineRunner* pipeline() const { return runner_.get(); }
  optim::Optimizer& optimizer() { return *optimizer_; }
  const optim::LrSchedule& schedule() const { return *schedule_; }
  int64_t step() const { return step_; }
  int64_t consumed_samples() const { return consumed_samples_; }
  const config::JobConfig& config() const { return config_; }
  const std::vector<StepMetrics>& history() const { return history_; }
  double peak_flops() const { return peak_flops_; }

  const mesh::ProcessGroups& groups() const { return *groups_; }
  // The DP gradient buckets (nullptr when dp = 1 or with the distributed optimizer).
  const parallel::GradBuckets* grad_buckets() const { return buckets_.get(); }
  // The full (unpadded) tensor of parameter `p` whose local value (or optimizer state) is `local`:
  // gathered over TP for sharded parameters. Collective over the TP group.
  at::Tensor full_tensor(const model::Parameter& p, const at::Tensor& local) const;
  int64_t global_batch_size() const { return global_batch_; }
  int64_t micro_batches_per_rank() const { return num_micro_; }

 private:
  model::Batch make_micro_batch(data::Split split, int64_t first_sample, int64_t count) const;
  // This rank's micro-batches of the global batch that starts at sample `consumed`.
  std::vector<model::Batch> load_step(int64_t consumed) const;
  void reduce_gradients();
  double all_reduce_sum(double v);  // over the DP group
  // Forward and backward of this rank's micro-batches; adds [loss sum, aux sum] to `acc`.
  void forward_backward(const std::vector<model::Batch>& batches, double total_tokens, at::Tensor& acc,
                        StepMetrics& m);
  parallel::pipeline::RunnerCallbacks pipeline_callbacks(const std::vector<model::Batch>& batches) const;
  void log_step(const StepMetrics& m);
  void write_jsonl(const std::string& line);

  config::JobConfig config_;
  comm::CommunicatorPtr world_;
  std::unique_ptr<mesh::ProcessGroups> groups_;
  comm::CommunicatorPtr dp_comm_, tp_comm_, pp_comm_;
  comm::CommunicatorPtr embedding_comm_;  // pp > 1, tied embeddings, first or last stage
  int rank_ = 0, dp_ = 1, dp_rank_ = 0, tp_ = 1, pp_ = 1, pp_rank_ = 0;
  std::unique_ptr<data::DataSource> source_;
  std::vector<std::unique_ptr<model::GptModel>> chunks_;
  std::vector<model::Parameter> params_;
  std::unique_ptr<parallel::pipeline::PipelineRunner> runner_;
  std::vector<parallel::pipeline::Action> final_passes_;  // each chunk's last B (and W) of the table
  size_t tied_embedding_ = 0;  // index in params_ of embedding.weight when embedding_comm_ is set
  std::unique_ptr<optim::Optimizer> optimizer_;
  optim::DistributedAdamW* zero_ = nullptr;  // optimizer_ when parallel.distributed_optimizer
  std::unique_ptr<parallel::GradBuckets> buckets_;  // dp > 1 with the replicated optimizer
  std::unique_ptr<optim::LrSchedule> schedule_;
  std::unique_ptr<Progress> progress_;
  std::ofstream jsonl_;
  std::unique_ptr<TensorBoardWriter> tensorboard_;
  at::Device device_ = at::kCPU;
  int64_t seq_len_ = 0, micro_batch_ = 0, global_batch_ = 0, num_micro_ = 0;
  int64_t step_ = 0, consumed_samples_ = 0;
  double peak_flops_ = 0, flops_per_token_ = 0;
  std::vector<StepMetrics> history_;
  // [Note: prefetch] The next step's micro-batches are read on a background thread while this step
  // computes; they are used only if the data position still matches (a resume discards them).
  std::future<std::vector<model::Batch>> prefetch_;
  int64_t prefetch_consumed_ = -1;
  Timers timers_;
  std::string last_checkpoint_;
  std::optional<FaultInjection> fault_;  // LOOM_FAULT_INJECT (tests of failure handling)
};

}  // namespace loom::train
