#include "loom/train/trainer.h"

#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>
#include <fmt/format.h>

#include <algorithm>
#include <cmath>

#include "loom/checkpoint/checkpoint.h"
#include "loom/checkpoint/training_state.h"
#include "loom/comm/local_communicator.h"
#include "loom/core/config.h"
#include "loom/core/error.h"
#include "loom/core/logging.h"
#include "loom/mesh/parallel_dims.h"
#include "loom/optim/clip.h"
#include "loom/train/system.h"

namespace loom::train {

namespace {
// NaN prints as "NaN" whatever its sign bit (which BLAS kernels do not agree on).
std::string show(double v) {
  if (std::isnan(v)) return "NaN";
  return fmt::format("{}", v);
}

}  // namespace

Trainer::Trainer(const config::JobConfig& config, comm::CommunicatorPtr world,
                 std::unique_ptr<data::DataSource> source)
    : config_(config), world_(std::move(world)), source_(std::move(source)) {
  config::validate(config_);
  if (!world_) world_ = std::make_shared<comm::LocalCommunicator>();
  const auto dims = mesh::ParallelDims::from_config(config_.parallel(), world_->size());
  LOOM_CHECK_KIND(ErrorKind::kUnsupported, dims.cp == 1 && dims.ep == 1,
                  "this build's trainer runs tensor (with sequence), pipeline and data "
                  "parallelism; parallel.cp={}, "
                  "ep={} need the context/expert-parallel layers, which are not in yet",
                  dims.cp, dims.ep);
  groups_ = std::make_unique<mesh::ProcessGroups>(dims, world_);
  log::set_coordinates(groups_->coords_string());
  const auto& t = config_.train();
  device_ = resolve_device(t.device());
  if (t.num_threads() > 0) at::set_num_threads(t.num_threads());
  fault_ = FaultInjection::from_env();
  if (fault_ && fault_->rank == world_->rank()) {
    LOOM_LOG_WARN("LOOM_FAULT_INJECT is set: this rank will fail at step {}", fault_->step);
  }
  if (t.tune_host_allocator() && !tune_host_allocator()) {
    LOOM_LOG_WARN(
        "glibc refused the host-allocator settings (mallopt); fresh pages will be faulted in each "
        "step");
  }
  const model::ModelSpec spec = model::ModelSpec::from_config(config_.model());
  // The pieces of a step (DESIGN: the trainer builds them and calls them in order).
  build_data(spec);
  build_model(spec);
  build_optimizer(spec);
  build_executor();
  flops_per_token_ = spec.flops_per_token(seq_len_);
  peak_flops_ = t.peak_tflops() > 0 ? t.peak_tflops() * 1e12
                                    : probe_matmul_flops(device_, spec.compute_dtype);
  MetricsContext ctx;
  ctx.total_steps = t.steps();
  ctx.log_every = t.log_every();
  ctx.moe = spec.is_moe();
  ctx.pipeline = groups_->pp_size() > 1;
  ctx.cuda = device_.is_cuda();
  sinks_ = make_metrics_sinks(config_, ctx, world_->rank() == 0);
  log_setup(spec);
}

void Trainer::build_data(const model::ModelSpec& spec) {
  const auto lo = data::LoaderOptions::from_config(config_, groups_->dp_size(), groups_->dp_rank(),
                                                   groups_->tp_size(), device_);
  seq_len_ = lo.seq_len;
  global_batch_ = lo.global_batch;
  documents_ = lo.mode == data::BatchMode::kDocuments;
  num_micro_ =
      documents_ ? 0 : global_batch_ / (lo.micro_batch_size * lo.dp_size);  // DOCUMENTS: varies
  if (!source_) source_ = data::make_source(config_, spec.vocab_size, global_batch_);
  LOOM_CHECK_CONFIG(source_->vocab_size() <= spec.vocab_size,
                    "the data's vocabulary ({} tokens) does not fit model.vocab_size = {}",
                    source_->vocab_size(), spec.vocab_size);
  loader_ = std::make_unique<data::MicroBatchLoader>(source_.get(), lo);
}

void Trainer::build_model(const model::ModelSpec& spec) {
  const auto& par = config_.parallel();
  LOOM_CHECK_CONFIG(par.vocab_divisible_by() >= 1,
                    "field 'parallel.vocab_divisible_by' must be >= 1, got {}",
                    par.vocab_divisible_by());
  parallel::TensorParallel tp;
  if (groups_->tp_size() > 1) tp.comm = groups_->tp_group();
  tp.sequence_parallel = par.sequence_parallel();
  tp.overlap_comm = par.overlap_tp_comm();
  // Pipeline stages: chunk c of this rank is virtual stage c * pp + pp rank (Note: pipeline
  // stages).
  const int pp = groups_->pp_size(), vp = parallel::pipeline::schedule_from_config(par, pp).chunks;
  const auto layouts = model::partition_stages(spec.num_layers, pp, vp, par.pp_first_stage_layers(),
                                               par.pp_last_stage_layers());
  for (int c = 0; c < vp; ++c) {
    const auto& layout = layouts[static_cast<size_t>(c * pp + groups_->pp_rank())];
    chunks_.push_back(std::make_unique<model::GptModel>(spec, config_.seed(), device_, tp,
                                                        par.vocab_divisible_by(), layout));
    for (const auto& p : chunks_.back()->parameters()) params_.push_back(p);
  }
}

void Trainer::build_optimizer(const model::ModelSpec& spec) {
  const auto& par = config_.parallel();
  const auto tp = groups_->tp_size() > 1 ? groups_->tp_group() : nullptr;
  const auto pp = groups_->pp_size() > 1 ? groups_->pp_group() : nullptr;
  LOOM_CHECK_CONFIG(config_.optim().clip_grad() >= 0,
                    "field 'optim.clip_grad' must be >= 0, got {}", config_.optim().clip_grad());
  parallel::GradSyncOptions sync;  // Note: gradient synchronisation
  sync.dp = groups_->dp_group();
  sync.tp = groups_->tp_group();
  if (pp && spec.tie_embeddings && (groups_->pp_is_first_stage() || groups_->pp_is_last_stage())) {
    sync.embedding = groups_->embedding_group();
    LOOM_INTERNAL_CHECK(sync.embedding && sync.embedding->size() == 2,
                        "pipeline stage {} of {} has no two-rank embedding group",
                        groups_->pp_rank(), pp->size());
  }
  const auto options = optim::AdamWOptions::from_config(config_.optim());
  if (par.distributed_optimizer()) {
    auto zero =
        std::make_unique<optim::DistributedAdamW>(&params_, options, groups_->dp_group(), tp, pp);
    zero_ = zero.get();
    sync.shards = zero_;
    optimizer_ = std::move(zero);
  } else {
    optimizer_ = std::make_unique<optim::AdamW>(&params_, options);
    LOOM_CHECK_CONFIG(groups_->dp_size() == 1 || par.grad_bucket_mb() > 0,
                      "field 'parallel.grad_bucket_mb' must be > 0, got {}", par.grad_bucket_mb());
    sync.bucket_bytes = static_cast<int64_t>(par.grad_bucket_mb() * (1 << 20));
    sync.overlap = par.overlap_grad_reduce();
  }
  grad_sync_ = std::make_unique<parallel::GradSync>(&params_, sync);
  schedule_ = std::make_unique<optim::LrSchedule>(config_.optim(), config_.train().steps());
  checkpoint::StateParts parts;  // Note: training state
  parts.params = &params_;
  parts.optimizer = optimizer_.get();
  parts.loader = loader_.get();
  parts.world = world_;
  parts.tp = tp;
  parts.pp = pp;
  parts.dp_rank = groups_->dp_rank();
  parts.tp_rank = groups_->tp_rank();
  state_ = std::make_unique<checkpoint::TrainingState>(parts);
}

void Trainer::build_executor() {
  const int pp = groups_->pp_size();
  const parallel::pipeline::ScheduleOptions o =
      parallel::pipeline::schedule_from_config(config_.parallel(), pp);
  if (pp > 1) {
    // [Note: pipeline runner] matches sends and receives by tag, with independent progress (MPI's
    // model). NCCL has no tags and matches in posting order on one stream, where 1F1B's crossing
    // transfers (activations one way, gradients the other) can block each other; that ordering
    // is not built yet, and CUDA activations are not staged through MPI.
    const auto& comm = *groups_->pp_group();
    LOOM_CHECK_KIND(
        ErrorKind::kUnsupported, std::string(comm.backend()) != "nccl" && comm.device() == device_,
        "parallel.pp = {} on train.device '{}' over the {} backend: the pipeline runner needs "
        "tag-matched point-to-point on the activations' device, which this build has only for CPU "
        "tensors over MPI (see docs/parallelism.md)",
        pp, device_.str(), comm.backend());
  }
  std::vector<model::GptModel*> chunks;
  for (auto& c : chunks_) chunks.push_back(c.get());
  executor_ =
      std::make_unique<StepExecutor>(chunks, o, groups_->pp_group(), grad_sync_.get(), device_);
  if (documents_) {
    // Packed documents give each step its own number of micro-batches; the interleaved schedule's
    // constraints on that number (at least pp, whole groups) cannot be promised.
    LOOM_CHECK_CONFIG(o.kind != parallel::pipeline::ScheduleKind::kInterleaved1F1B || pp == 1,
                      "data.mode DOCUMENTS packs a varying number of micro-batches per step, which "
                      "parallel.pp_schedule = interleaved cannot take; use 1f1b, afab or zb-h1");
  }
  // The configured micro-batch count's table, checked now (errors name the fields); in DOCUMENTS
  // mode one micro-batch's (the counts vary per step).
  const auto& runner = executor_->runner(documents_ ? 1 : static_cast<int>(num_micro_));
  if (pp > 1) pipeline_ = &runner;
}

void Trainer::log_setup(const model::ModelSpec& spec) {
  const auto& t = config_.train();
  LOOM_LOG_INFO("model: {}", spec.summary());
  LOOM_LOG_INFO("data: {}", source_->describe());
  LOOM_LOG_INFO("batch: {}", loader_->describe());
  LOOM_LOG_INFO(
      "parallel: tp={}{} pp={} dp={} ({} ranks); optimizer state {} per rank{}", groups_->tp_size(),
      chunks_.front()->tensor_parallel().sp() ? " with sequence parallelism" : "",
      groups_->pp_size(), groups_->dp_size(), world_->size(),
      format_bytes(static_cast<double>(optimizer_->state_bytes())),
      zero_ ? fmt::format(" (distributed optimizer: 1/{} of the moments)", groups_->dp_size())
            : "");
  if (pipeline_) {
    LOOM_LOG_INFO("pipeline: {}",
                  executor_->describe(documents_ ? "varying" : std::to_string(num_micro_)));
  }
  if (chunks_.front()->padded_vocab() != spec.vocab_size) {
    LOOM_LOG_INFO(
        "vocabulary padded from {} to {} rows (a multiple of parallel.vocab_divisible_by {} x tp "
        "{}) for "
        "the vocab-parallel embedding and head",
        spec.vocab_size, chunks_.front()->padded_vocab(), config_.parallel().vocab_divisible_by(),
        groups_->tp_size());
  }
  LOOM_LOG_INFO("compute: {} ({}), {:.3g} GFLOP per token; peak {:.2f} TFLOP/s per device ({})",
                c10::toString(spec.compute_dtype),
                spec.recompute ? "full recomputation" : "no recomputation", flops_per_token_ / 1e9,
                peak_flops_ / 1e12,
                t.peak_tflops() > 0 ? "train.peak_tflops" : "measured by a GEMM probe");
  LOOM_LOG_INFO("BLAS: {}", blas_description());
  if (world_->rank() == 0 && blas_core_forced()) {
    LOOM_LOG_WARN(
        "OPENBLAS_CORETYPE is set: OpenBLAS uses that core's kernels, which can halve GEMM speed");
  }
}

Trainer::~Trainer() = default;

namespace {
// All-reduces a host tensor over `comm` (through the communicator's device when it is not the CPU).
void all_reduce_host(at::Tensor& t, comm::Communicator& comm,
                     comm::ReduceOp op = comm::ReduceOp::kSum) {
  if (comm.size() == 1) return;
  at::Tensor d = t.to(comm.device());
  comm.all_reduce(d, {op});
  if (d.data_ptr() != t.data_ptr()) t.copy_(d.cpu());
}
}  // namespace

at::Tensor Trainer::full_tensor(const model::Parameter& p, const at::Tensor& local) const {
  return parallel::full_tensor(p, local, groups_->tp_group().get());
}

std::vector<at::Tensor> Trainer::full_gradients() const {
  std::vector<at::Tensor> local;
  if (zero_) {
    local = zero_->reduced_gradients();
  } else {
    for (const auto& p : params_) {
      const at::Tensor& g = p.tensor.grad();
      local.push_back(g.defined() ? g.detach() : at::zeros_like(p.tensor));
    }
  }
  std::vector<at::Tensor> full;
  for (size_t i = 0; i < params_.size(); ++i)
    full.push_back(full_tensor(params_[i], local[i]).clone());
  return full;
}

StepMetrics Trainer::train_step() {
  Stopwatch clock;
  timers_.reset();
  StepMetrics m;
  timers_.start("data");
  // This rank's plan and micro-batches (Note: step plan); N and the micro-batch count over all DP
  // ranks come with the plan, computed without communication.
  // A step that fails (a non-finite loss, a peer's error) leaves the data position where it was,
  // like the parameters: the loader advances only with the optimizer step.
  struct KeepPosition {
    data::MicroBatchLoader* loader;
    int64_t position;
    bool committed = false;
    ~KeepPosition() {
      if (!committed) loader->set_position(position);
    }
  } keep{loader_.get(), loader_->position()};
  const data::StepData data = loader_->next(/*prefetch_next=*/step_ + 1 < config_.train().steps());
  const std::vector<model::Batch>& batches = data.batches;
  const double total_tokens = static_cast<double>(data.plan.loss_tokens);
  timers_.stop("data");
  LOOM_CHECK(total_tokens > 0, "step {}: the global batch has no loss tokens", step_ + 1);

  grad_sync_->zero_grad();
  const double aux_scale = 1.0 / static_cast<double>(data.plan.global_micro_batches);
  // LOOM_FAULT_INJECT fires before this rank's first backward of the step.
  auto fault_point = [&] {
    if (fault_) fault_->maybe_trigger(world_->rank(), step_ + 1);
  };
  // Forward and backward on the one executor (Note: step executor; Note: loss scaling).
  const StepSums sums = executor_->train(batches, total_tokens, aux_scale, fault_point);
  m.forward_s = sums.stats.forward_s;
  m.backward_s = sums.stats.backward_s;
  m.pp_wait_s = sums.stats.recv_wait_s;
  at::Tensor loss_acc =
      at::tensor({sums.loss_sum, sums.aux_sum}, at::kDouble);  // [lm loss sum, aux sum]
  timers_.start("comm");
  grad_sync_->finish();  // Note: gradient synchronisation
  timers_.stop("comm");
  if (gradient_observer_) gradient_observer_();
  timers_.start("comm");
  // The last stage's loss and every stage's aux, over the pipeline, then over DP.
  if (groups_->pp_size() > 1) all_reduce_host(loss_acc, *groups_->pp_group());
  if (groups_->dp_size() > 1) all_reduce_host(loss_acc, *groups_->dp_group());
  timers_.stop("comm");
  m.step = step_ + 1;
  m.loss = loss_acc[0].item<double>() / total_tokens;
  m.aux_loss = loss_acc[1].item<double>() * aux_scale;
  m.tokens = static_cast<int64_t>(total_tokens);
  m.micro_batches = data.plan.global_micro_batches;
  LOOM_CHECK_KIND(
      ErrorKind::kNumerics, std::isfinite(m.loss),
      "step {}: the loss is {} ({} tokens); no update was applied, so the parameters are "
      "those after step {}. Lower optim.lr, raise optim.warmup_steps, or check the data",
      m.step, show(m.loss), m.tokens, step_);

  timers_.start("optimizer");
  m.grad_norm = zero_ ? zero_->clip_grad_norm(config_.optim().clip_grad())
                      : optim::clip_grad_norm(params_, config_.optim().clip_grad(),
                                              groups_->tp_group().get(), groups_->pp_group().get());
  LOOM_CHECK_KIND(
      ErrorKind::kNumerics, std::isfinite(m.grad_norm),
      "step {}: the gradient norm is {} (loss {}); no update was applied, so the parameters "
      "are those after step {}",
      m.step, show(m.grad_norm), show(m.loss), step_);
  m.lr = schedule_->lr_at(step_);
  optimizer_->step(m.lr);
  keep.committed = true;
  timers_.stop("optimizer");
  ++step_;

  m.seconds = clock.seconds();
  m.data_s = timers_.elapsed("data");
  m.comm_s = timers_.elapsed("comm");
  m.optimizer_s = timers_.elapsed("optimizer");
  if (grad_sync_->buckets()) m.grad_reduce_wait_s = grad_sync_->buckets()->stats().wait_s;
  m.tokens_per_s = total_tokens / m.seconds;  // real tokens: padding never counts
  m.tokens_per_s_per_device = m.tokens_per_s / world_->size();
  // Model FLOPs of the step's real sequences (Note: step plan: windows, or packed pieces).
  m.tflops_per_device =
      chunks_.front()->spec().step_flops(total_tokens, data.plan.sequence_tokens_sq) / m.seconds /
      world_->size() / 1e12;
  m.mfu = peak_flops_ > 0 ? m.tflops_per_device * 1e12 / peak_flops_ : 0;
  const MemoryStats mem = memory_stats(device_);
  m.device_peak = mem.device_peak;
  m.rss = mem.rss;
  m.peak_rss = mem.peak_rss;
  add_moe_stats(m, chunks_, groups_->pp_size() > 1 ? groups_->pp_group().get() : nullptr);
  history_.push_back(m);
  return m;
}

EvalMetrics Trainer::evaluate() {
  at::NoGradGuard no_grad;
  EvalMetrics e;
  e.step = step_;
  double sums[2] = {0, 0};
  for (int64_t g = 0; g < config_.train().eval_batches(); ++g) {
    const data::StepData d = loader_->load(data::Split::kValid, g * global_batch_);
    const std::vector<model::Batch>& batches = d.batches;
    const EvalSums part = executor_->evaluate(batches);  // forward-only on the same path
    sums[0] += part.loss_sum;
    sums[1] += part.tokens;
  }
  if (groups_->dp_size() > 1 || groups_->pp_size() > 1) {
    at::Tensor t = at::tensor({sums[0], sums[1]}, at::kDouble);
    if (groups_->pp_size() > 1) all_reduce_host(t, *groups_->pp_group());
    if (groups_->dp_size() > 1) all_reduce_host(t, *groups_->dp_group());
    sums[0] = t[0].item<double>();
    sums[1] = t[1].item<double>();
  }
  e.tokens = static_cast<int64_t>(sums[1]);
  e.loss = sums[0] / sums[1];
  e.perplexity = std::exp(e.loss);
  sinks_->eval(e);
  return e;
}

std::string Trainer::save_checkpoint() {
  const std::string& root = config_.train().checkpoint_dir();
  LOOM_CHECK_CONFIG(!root.empty(),
                    "cannot save a checkpoint: field 'train.checkpoint_dir' is empty");
  // Full, unpadded tensors under their global names whatever the layout (Note: training state).
  checkpoint::CheckpointData data = state_->gather(step_, {{"config", config::to_text(config_)}});
  std::string dir, failure;
  if (world_->rank() == 0) {
    try {
      dir = checkpoint::save_checkpoint(root, step_, data, config_.train().keep_checkpoints());
      sinks_->clear();
      LOOM_LOG_INFO("saved checkpoint {} (step {})", dir, step_);
    } catch (const Error& e) {
      failure = e.what();
    }
  }
  // Every rank learns whether the write succeeded (a full disk must not leave the others waiting).
  at::Tensor failed = at::full({1}, failure.empty() ? 0.0 : 1.0, at::kDouble);
  all_reduce_host(failed, *world_, comm::ReduceOp::kMax);
  LOOM_CHECK_KIND(ErrorKind::kIO, failed.item<double>() == 0,
                  "writing the checkpoint of step {} under '{}' failed{}", step_, root,
                  failure.empty() ? " on world rank 0 (see its error)" : ": " + failure);
  last_checkpoint_ = dir.empty() ? fmt::format("{}/step-{:08d}", root, step_) : dir;
  return last_checkpoint_;
}

void Trainer::load_checkpoint(const std::string& dir) {
  const checkpoint::RestoredState r = state_->load(dir);  // checked on every rank first
  step_ = r.step;
  if (r.consumed_samples != step_ * global_batch_) {
    LOOM_LOG_WARN(
        "checkpoint consumed {} samples in {} steps; this run uses {} per step from here on",
        r.consumed_samples, step_, global_batch_);
  }
  LOOM_LOG_INFO("resumed from {} at step {} ({} samples consumed)", dir, step_, r.consumed_samples);
}

TrainSummary Trainer::fit() {
  const auto& t = config_.train();
  if (t.resume() == "latest") {
    LOOM_CHECK_CONFIG(!t.checkpoint_dir().empty(),
                      "train.resume is 'latest' but train.checkpoint_dir is empty");
    if (auto latest = checkpoint::latest_checkpoint(t.checkpoint_dir())) {
      load_checkpoint(*latest);
    } else {
      LOOM_LOG_INFO("no checkpoint under '{}': starting from step 0", t.checkpoint_dir());
    }
  } else if (!t.resume().empty()) {
    load_checkpoint(t.resume());
  }
  TrainSummary s;
  s.first_step = step_;
  sinks_->start(step_);
  Stopwatch clock;
  double tps_sum = 0, mfu_sum = 0;
  int64_t timed = 0;
  EvalMetrics last_eval;
  bool have_eval = false;
  s.best_eval_loss = std::numeric_limits<double>::infinity();
  bool saved_now = false;
  while (step_ < t.steps()) {
    StepMetrics m = train_step();
    sinks_->step(m);
    if (step_ == s.first_step + 1) s.first_loss = m.loss;
    s.last_loss = m.loss;
    if (step_ > s.first_step + 1) {
      tps_sum += m.tokens_per_s;
      mfu_sum += m.mfu;
      ++timed;
    }
    saved_now = false;
    if (t.eval_every() > 0 && step_ % t.eval_every() == 0) {
      last_eval = evaluate();
      have_eval = true;
      s.best_eval_loss = std::min(s.best_eval_loss, last_eval.loss);
    }
    if (t.save_every() > 0 && step_ % t.save_every() == 0 && !t.checkpoint_dir().empty()) {
      save_checkpoint();
      saved_now = true;
    }
  }
  sinks_->finish();
  if (!t.checkpoint_dir().empty() && !saved_now && step_ > s.first_step) save_checkpoint();
  s.last_step = step_;
  s.seconds = clock.seconds();
  s.mean_tokens_per_s = timed > 0 ? tps_sum / static_cast<double>(timed)
                                  : (history_.empty() ? 0 : history_.back().tokens_per_s);
  s.mean_mfu = timed > 0 ? mfu_sum / static_cast<double>(timed)
                         : (history_.empty() ? 0 : history_.back().mfu);
  s.checkpoint = last_checkpoint_;
  if (!have_eval) s.best_eval_loss = std::nan("");
  LOOM_LOG_INFO(
      "done: steps {}..{} in {} | loss {:.4f} -> {:.4f} | best eval loss {:.4f} | {:.0f} tok/s | "
      "MFU {:.1f}%{}",
      s.first_step, s.last_step, format_duration(s.seconds), s.first_loss, s.last_loss,
      s.best_eval_loss, s.mean_tokens_per_s, s.mean_mfu * 100,
      s.checkpoint.empty() ? "" : " | checkpoint " + s.checkpoint);
  return s;
}

}  // namespace loom::train
