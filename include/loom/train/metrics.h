// Per-step and evaluation metrics, and the sinks that report them: the console line, the progress
// bar, JSONL records and TensorBoard scalars. The Trainer fills one StepMetrics per step and hands
// it to the sink set; a custom trainer can build the same set (make_metrics_sinks) or its own.
#pragma once

#include <cstdint>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "loom/comm/communicator.h"
#include "loom/config.pb.h"
#include "loom/core/timer.h"
#include "loom/model/gpt.h"
#include "loom/train/progress.h"
#include "loom/train/tensorboard.h"

namespace loom::train {

struct StepMetrics {
  int64_t step = 0;     // steps completed, including this one
  double loss = 0;      // LM cross-entropy per token over the global batch
  double aux_loss = 0;  // MoE auxiliary losses (balance + z), mean over micro-batches
  double lr = 0;
  double grad_norm = 0;       // before clipping
  int64_t tokens = 0;         // loss tokens in the global batch (real tokens: padding never counts)
  int64_t micro_batches = 0;  // micro-batches of the step over all DP ranks (DOCUMENTS: varies)
  double seconds = 0;         // wall time of the step
  double data_s = 0, forward_s = 0, backward_s = 0, comm_s = 0, optimizer_s = 0;
  double grad_reduce_wait_s = 0;  // DP all-reduce time left after backward (not overlapped)
  double pp_wait_s = 0;           // pipeline: time blocked on activation / gradient receives
  // Context parallelism and hybrid data parallelism's groups: time blocked on ring-attention
  // transfers after the compute they overlap (part of forward_s and backward_s).
  double ring_wait_s = 0;
  double tokens_per_s = 0;  // global
  double tokens_per_s_per_device = 0;
  double tflops_per_device = 0;  // achieved
  double mfu = 0;                // achieved / peak, per device
  int64_t rss = 0, peak_rss = 0;
  int64_t device_peak = 0;  // GPU caching-allocator peak (CUDA devices)
  int64_t moe_dropped = 0;  // (token, expert) assignments dropped by capacity
  double moe_max_load = 0;  // max over layers and experts of tokens / mean tokens
  // Per MoE layer (model order): the busiest expert's tokens over the mean, over the step's whole
  // global batch (every micro-batch of every data-parallel rank).
  std::vector<double> moe_layer_max_load;
  // Per MoE layer over the step (model::MoeStepStats): the share of (token, expert) assignments
  // capacity dropped, and the coefficient-weighted balance and z losses (mean over micro-batches;
  // summed over layers they are aux_loss).
  std::vector<double> moe_layer_dropped_fraction;
  std::vector<double> moe_layer_balance_loss;
  std::vector<double> moe_layer_z_loss;
  // Expert specialisation with blended data (Note: expert specialisation): per MoE layer (model
  // order), the step's real (token, expert) assignments by source, [sources x E] row-major, over
  // the whole global batch. Empty unless the data has several sources.
  std::vector<std::vector<double>> moe_source_counts;
};

struct EvalMetrics {
  int64_t step = 0;
  double loss = 0;
  double perplexity = 0;
  int64_t tokens = 0;
};

// Fills a finished step's throughput (from m.seconds and m.tokens: real tokens, padding never
// counts), achieved TFLOP/s and MFU per device, and memory. `flops`: the step's model FLOPs over
// all devices (ModelSpec::step_flops of the plan's sequences); `devices`: the world size;
// `peak_flops`: one device's peak (0: no MFU).
void add_performance(StepMetrics& m, double flops, int devices, double peak_flops,
                     at::Device device);

struct TrainSummary {
  int64_t first_step = 0, last_step = 0;
  double first_loss = 0, last_loss = 0;        // first and last logged training losses
  double best_eval_loss = 0;                   // NaN when nothing was evaluated
  double mean_tokens_per_s = 0, mean_mfu = 0;  // over steps after the first
  double seconds = 0;
  std::string checkpoint;  // the last checkpoint written, if any
  int stop_signal = 0;     // the signal that ended the run early (Note: stop signals); 0: none
};

// A run's summary from its steps and evaluations, timed from construction: throughput and MFU are
// averaged over the steps after the first (whose time includes warm-up), or are the only step's.
class SummaryTracker {
 public:
  explicit SummaryTracker(int64_t first_step);
  void step(const StepMetrics& m);
  void eval(const EvalMetrics& e);
  // The summary when the run ends at `last_step` with `checkpoint` (may be empty); also logged.
  TrainSummary finish(int64_t last_step, const std::string& checkpoint) const;
  int64_t first_step() const { return s_.first_step; }

 private:
  TrainSummary s_;
  Stopwatch clock_;
  double tps_sum_ = 0, mfu_sum_ = 0, last_tps_ = 0, last_mfu_ = 0;
  int64_t steps_ = 0;
};

// What the sinks need to know about the run.
struct MetricsContext {
  int64_t first_step = 0, total_steps = 0;
  int64_t log_every = 1;
  bool moe = false;       // report the aux loss, expert load and drops
  bool pipeline = false;  // report the pipeline wait
  bool ring = false;      // report the ring-attention wait (parallel.cp > 1 or parallel.hdp)
  bool cuda = false;      // memory: the GPU peak instead of the host RSS
  // Blended data under MoE: the sources' names (DataSource::source_names) and the experts per
  // layer; the sinks then report expert specialisation. Empty: one source.
  std::vector<std::string> sources;
  int64_t num_experts = 0;
};

// Expert specialisation accumulated over steps (StepMetrics::moe_source_counts): for each MoE
// layer, each source's share of its assignments per expert, and the mutual information between a
// token's source and its chosen experts in bits (0 when routing ignores the source; at most the
// source entropy, reached when every expert serves one source).
class SpecialisationTable {
 public:
  SpecialisationTable(std::vector<std::string> sources, int64_t experts)
      : sources_(std::move(sources)), experts_(experts) {}
  void add(const StepMetrics& m);  // a step's counts (ignored when it has none)
  void reset();
  int64_t steps() const { return steps_; }
  int64_t layers() const { return static_cast<int64_t>(counts_.size()); }
  const std::vector<std::string>& sources() const { return sources_; }
  int64_t experts() const { return experts_; }
  // Assignments of source s's tokens in layer l, and the share of them routed to expert e.
  double assignments(int64_t layer, int64_t source) const;
  double share(int64_t layer, int64_t source, int64_t expert) const;
  double mutual_information_bits(int64_t layer) const;

 private:
  std::vector<std::string> sources_;
  int64_t experts_;
  std::vector<std::vector<double>> counts_;  // [layer][source * E + expert]
  int64_t steps_ = 0;
};

class MetricsSink {
 public:
  virtual ~MetricsSink() = default;
  // The run starts or resumes at `first_step` (after any checkpoint is loaded).
  virtual void start(int64_t /*first_step*/) {}
  virtual void step(const StepMetrics& m) = 0;
  virtual void eval(const EvalMetrics&) {}
  virtual void finish() {}
};

// The set the Trainer writes to: each sink in turn. Rank 0 holds the sinks; other ranks an empty
// set. Anything else printed while a progress bar is drawn goes through message() (or after
// clear()) so the bar's line is cleared first.
class MetricsSinks {
 public:
  MetricsSinks() = default;
  void add(std::unique_ptr<MetricsSink> sink) { sinks_.push_back(std::move(sink)); }
  void set_progress(std::shared_ptr<Progress> progress) { progress_ = std::move(progress); }
  // The run starts (or resumes) at `first_step`: the progress bar and its ETA count from there.
  void start(int64_t first_step);
  void step(const StepMetrics& m);
  void eval(const EvalMetrics& e);
  void clear();   // clears the progress bar's line (it is redrawn at the next step)
  void finish();  // ends the progress bar
  size_t size() const { return sinks_.size(); }

 private:
  std::vector<std::unique_ptr<MetricsSink>> sinks_;
  std::shared_ptr<Progress> progress_;
};

// Fills m.moe_dropped (the last micro-batch's, summed over layers), the per-layer figures and
// m.moe_max_load (the layers' max) from this rank's chunks and `layers` (model::end_moe_step: each
// of the chunks' MoE layers, in order, over the data-parallel domain), over every pipeline stage
// (`pp`, may be null). Collective over `pp` when the model is MoE. With `num_sources` > 1 (the
// same on every stage) m.moe_source_counts is filled too.
void add_moe_stats(StepMetrics& m, const std::vector<std::unique_ptr<model::GptModel>>& chunks,
                   const std::vector<model::MoeStepStats>& layers, comm::Communicator* pp,
                   int64_t num_sources = 0);

// The console line (every log_every steps, the first and the last; with an ETA when no bar is
// drawn) and the progress bar.
std::unique_ptr<MetricsSink> make_console_sink(const MetricsContext& ctx,
                                               std::shared_ptr<Progress> progress);
// One JSON object per line: {"type": "train", ...} per step and {"type": "eval", ...}. A run that
// resumes at step S first moves the records of steps after S (written by a run that crashed or was
// rolled back after its last checkpoint, and about to be redone) and a torn last line to
// `<file>.abandoned-<UTC time>`; a fresh run moves an earlier run's file to `<file>.before-<UTC
// time>`. Then it writes {"type": "start", "step": S, "moved": n}: each step appears once, from
// the run that produced the checkpointed state, and nothing is deleted. With ctx.sources, the train
// record of every log_every-th (and the last) step carries "moe_specialisation": {"steps": n,
// "sources": [names], "assignments": [layer][source], "share": [layer][source][expert],
// "mi_bits": [layer]} over the n steps since the previous such record (SpecialisationTable).
std::unique_ptr<MetricsSink> make_jsonl_sink(const std::string& path, const MetricsContext& ctx);
// TensorBoard scalars (train/, perf/, memory/, moe/ with moe/{max_load,dropped_fraction,
// balance_loss,z_loss}_layer<l>, eval/), flushed every log_every steps; with
// ctx.sources also, at those steps, moe/specialisation_mi_layer<l> and (for up to 256 sources x
// experts) moe/share_layer<l>/<source>/expert<e> over the steps since the previous flush.
std::unique_ptr<MetricsSink> make_tensorboard_sink(const std::string& dir,
                                                   const MetricsContext& ctx);

// The sinks a job's config asks for on this rank (all on rank 0, none elsewhere): the console and
// progress (train.progress), JSONL (train.metrics_jsonl or <logging.dir>/metrics.jsonl) and
// TensorBoard (train.tensorboard_dir or <logging.dir>/tensorboard; "off": none).
std::unique_ptr<MetricsSinks> make_metrics_sinks(const config::JobConfig& job,
                                                 const MetricsContext& ctx, bool rank0);

}  // namespace loom::train
