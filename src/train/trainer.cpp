#include "loom/train/trainer.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <map>
#include <mutex>

#include "loom/checkpoint/checkpoint.h"
#include "loom/comm/local_communicator.h"
#include "loom/core/config.h"
#include "loom/core/env.h"
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

void validate_train(const config::TrainConfig& t, int64_t max_seq_len) {
  LOOM_CHECK_CONFIG(t.steps() >= 1, "field 'train.steps' must be >= 1, got {}", t.steps());
  LOOM_CHECK_CONFIG(t.seq_len() >= 1 && t.seq_len() <= max_seq_len,
                    "field 'train.seq_len' must be in [1, model.max_seq_len = {}], got {}", max_seq_len,
                    t.seq_len());
  LOOM_CHECK_CONFIG(t.micro_batch_size() >= 1, "field 'train.micro_batch_size' must be >= 1, got {}",
                    t.micro_batch_size());
  LOOM_CHECK_CONFIG(t.global_batch_size() >= 0,
                    "field 'train.global_batch_size' must be >= 0 (0 = micro_batch_size x dp), got {}",
                    t.global_batch_size());
  LOOM_CHECK_CONFIG(t.log_every() >= 1, "field 'train.log_every' must be >= 1, got {}", t.log_every());
  LOOM_CHECK_CONFIG(t.eval_every() >= 0 && t.save_every() >= 0,
                    "fields 'train.eval_every' ({}) and 'train.save_every' ({}) must be >= 0",
                    t.eval_every(), t.save_every());
  LOOM_CHECK_CONFIG(t.eval_batches() >= 1, "field 'train.eval_batches' must be >= 1, got {}",
                    t.eval_batches());
  LOOM_CHECK_CONFIG(t.keep_checkpoints() >= 0, "field 'train.keep_checkpoints' must be >= 0, got {}",
                    t.keep_checkpoints());
  LOOM_CHECK_CONFIG(t.peak_tflops() >= 0, "field 'train.peak_tflops' must be >= 0, got {}",
                    t.peak_tflops());
  LOOM_CHECK_CONFIG(t.num_threads() >= 0, "field 'train.num_threads' must be >= 0, got {}",
                    t.num_threads());
}
}  // namespace

Trainer::Trainer(const config::JobConfig& config, comm::CommunicatorPtr world,
                 std::unique_ptr<data::DataSource> source)
    : config_(config), world_(std::move(world)), source_(std::move(source)) {
  config::validate(config_);
  if (!world_) world_ = std::make_shared<comm::LocalCommunicator>();
  rank_ = world_->rank();
  const auto dims = mesh::ParallelDims::from_config(config_.parallel(), world_->size());
  LOOM_CHECK_KIND(ErrorKind::kUnsupported, dims.cp == 1 && dims.ep == 1,
                  "this build's trainer runs tensor (with sequence), pipeline and data parallelism; parallel.cp={}, "
                  "ep={} need the context/expert-parallel layers, which are not in yet",
                  dims.cp, dims.ep);
  LOOM_CHECK_CONFIG(config_.parallel().vocab_divisible_by() >= 1,
                    "field 'parallel.vocab_divisible_by' must be >= 1, got {}", config_.parallel().vocab_divisible_by());
  groups_ = std::make_unique<mesh::ProcessGroups>(dims, world_);
  dp_ = dims.dp;
  tp_ = dims.tp;
  pp_ = dims.pp;
  dp_rank_ = groups_->dp_rank();
  pp_rank_ = groups_->pp_rank();
  dp_comm_ = groups_->dp_group();
  tp_comm_ = groups_->tp_group();
  pp_comm_ = groups_->pp_group();
  log::set_coordinates(groups_->coords_string());

  const auto& t = config_.train();
  try {
    device_ = at::Device(t.device());
  } catch (const std::exception&) {
    LOOM_THROW(ErrorKind::kConfig, "field 'train.device': '{}' is not a device (cpu, cuda, cuda:N)", t.device());
  }
  LOOM_CHECK_CONFIG(device_.is_cpu() || device_.is_cuda(), "field 'train.device' must be cpu or cuda[:N], got '{}'",
                    t.device());
  if (device_.is_cuda()) {
    LOOM_CHECK_KIND(ErrorKind::kUnsupported, at::hasCUDA(),
                    "train.device is '{}', but this LibTorch has no CUDA (or no GPU is visible)", t.device());
    if (!device_.has_index()) {
      device_ = at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(env::first_int({"OMPI_COMM_WORLD_LOCAL_RANK",
                                                                                     "SLURM_LOCALID", "LOCAL_RANK"})
                                                                        .value_or(0)));
    }
  }
  if (t.num_threads() > 0) at::set_num_threads(t.num_threads());
  fault_ = FaultInjection::from_env();
  if (fault_ && fault_->rank == rank_) {
    LOOM_LOG_WARN("LOOM_FAULT_INJECT is set: this rank will fail at step {}", fault_->step);
  }
  if (t.tune_host_allocator() && !tune_host_allocator()) {
    LOOM_LOG_WARN("glibc refused the host-allocator settings (mallopt); fresh pages will be faulted in each step");
  }
  model::ModelSpec spec = model::ModelSpec::from_config(config_.model());
  validate_train(t, spec.max_seq_len);
  seq_len_ = t.seq_len();
  micro_batch_ = t.micro_batch_size();
  global_batch_ = t.global_batch_size() > 0 ? t.global_batch_size() : micro_batch_ * dp_;
  LOOM_CHECK_CONFIG(global_batch_ % (micro_batch_ * dp_) == 0,
                    "field 'train.global_batch_size' ({}) must be a multiple of train.micro_batch_size "
                    "({}) x data-parallel size ({}) = {}",
                    global_batch_, micro_batch_, dp_, micro_batch_ * dp_);
  num_micro_ = global_batch_ / (micro_batch_ * dp_);

  if (!source_) source_ = data::make_source(config_, spec.vocab_size, global_batch_);
  LOOM_CHECK_CONFIG(source_->vocab_size() <= spec.vocab_size,
                    "the data's vocabulary ({} tokens) does not fit model.vocab_size = {}",
                    source_->vocab_size(), spec.vocab_size);

  parallel::TensorParallel tp;
  if (tp_ > 1) tp.comm = tp_comm_;
  tp.sequence_parallel = config_.parallel().sequence_parallel();
  tp.overlap_comm = config_.parallel().overlap_tp_comm();
  if (tp.sp()) {
    LOOM_CHECK_CONFIG(seq_len_ % tp_ == 0,
                      "parallel.sequence_parallel splits the sequence over parallel.tp = {} ranks: train.seq_len = "
                      "{} is not divisible by it",
                      tp_, seq_len_);
  }
  // Pipeline stages: chunk c of this rank is virtual stage c * pp + pp rank (Note: pipeline stages).
  const auto& par = config_.parallel();
  const int vp = par.virtual_pp();
  LOOM_CHECK_CONFIG(vp >= 1, "field 'parallel.virtual_pp' must be >= 1, got {}", vp);
  LOOM_CHECK_CONFIG(vp == 1 || pp_ > 1,
                    "field 'parallel.virtual_pp' = {} interleaves model chunks over pipeline ranks and needs "
                    "parallel.pp > 1 (got pp = {})",
                    vp, pp_);
  const auto layouts = model::partition_stages(spec.num_layers, pp_, vp, par.pp_first_stage_layers(),
                                               par.pp_last_stage_layers());
  for (int c = 0; c < vp; ++c) {
    chunks_.push_back(std::make_unique<model::GptModel>(spec, config_.seed(), device_, tp, par.vocab_divisible_by(),
                                                        layouts[static_cast<size_t>(c * pp_ + pp_rank_)]));
    for (const auto& p : chunks_.back()->parameters()) params_.push_back(p);
  }
  {
    parallel::pipeline::ScheduleOptions o;
    o.kind = !par.pp_schedule().empty()
                 ? parallel::pipeline::parse_schedule(par.pp_schedule())
                 : (vp > 1 ? parallel::pipeline::ScheduleKind::kInterleaved1F1B : parallel::pipeline::ScheduleKind::k1F1B);
    o.stages = pp_;
    o.chunks = vp;
    o.microbatches = static_cast<int>(num_micro_);
    o.group = par.pp_microbatch_group();
    if (pp_ > 1) {
      // [Note: pipeline runner] matches sends and receives by tag, with independent progress (MPI's
      // model). NCCL has no tags and matches in posting order on one stream, where 1F1B's crossing
      // transfers (activations one way, gradients the other) can block each other; that ordering
      // is not built yet, and CUDA activations are not staged through MPI.
      LOOM_CHECK_KIND(ErrorKind::kUnsupported,
                      std::string(pp_comm_->backend()) != "nccl" && pp_comm_->device() == device_,
                      "parallel.pp = {} on train.device '{}' over the {} backend: the pipeline runner needs "
                      "tag-matched point-to-point on the activations' device, which this build has only for CPU "
                      "tensors over MPI (see docs/parallelism.md)",
                      pp_, device_.str(), pp_comm_->backend());
      parallel::pipeline::check_options(o);
      runner_ = std::make_unique<parallel::pipeline::PipelineRunner>(o, pp_comm_);
      // A chunk's gradients are final after the last pass that adds to them: its last B in the
      // table, and with a split backward also its last W (the deferred weight GEMMs). The DP bucket
      // hooks count a parameter only during those passes, and only when it receives a gradient,
      // so no bucket starts its all-reduce while a pass may still add to it.
      for (const auto& a : runner_->table()) {
        if (a.pass == parallel::pipeline::Pass::kForward) continue;
        auto it = std::find_if(final_passes_.begin(), final_passes_.end(),
                               [&](const auto& b) { return b.pass == a.pass && b.chunk == a.chunk; });
        if (it == final_passes_.end()) {
          final_passes_.push_back(a);
        } else {
          *it = a;
        }
      }
    }
  }
  if (pp_ > 1 && spec.tie_embeddings && (pp_rank_ == 0 || pp_rank_ == pp_ - 1)) {
    embedding_comm_ = groups_->embedding_group();
    LOOM_INTERNAL_CHECK(embedding_comm_ && embedding_comm_->size() == 2,
                        "pipeline stage {} of {} has no two-rank embedding group", pp_rank_, pp_);
    auto it = std::find_if(params_.begin(), params_.end(), [](const auto& p) { return p.name == "embedding.weight"; });
    LOOM_INTERNAL_CHECK(it != params_.end(), "pipeline stage {} has no tied embedding tensor", pp_rank_);
    tied_embedding_ = static_cast<size_t>(it - params_.begin());
  }
  const auto adamw = optim::AdamWOptions::from_config(config_.optim());
  if (config_.parallel().distributed_optimizer()) {
    auto zero = std::make_unique<optim::DistributedAdamW>(&params_, adamw, dp_comm_, tp_ > 1 ? tp_comm_ : nullptr,
                                                          pp_ > 1 ? pp_comm_ : nullptr);
    zero_ = zero.get();
    optimizer_ = std::move(zero);
  } else {
    optimizer_ = std::make_unique<optim::AdamW>(&params_, adamw);
    if (dp_ > 1) {
      LOOM_CHECK_CONFIG(config_.parallel().grad_bucket_mb() > 0, "field 'parallel.grad_bucket_mb' must be > 0, got {}",
                        config_.parallel().grad_bucket_mb());
      buckets_ = std::make_unique<parallel::GradBuckets>(
          &params_, dp_comm_, static_cast<int64_t>(config_.parallel().grad_bucket_mb() * (1 << 20)),
          config_.parallel().overlap_grad_reduce());
    }
  }
  schedule_ = std::make_unique<optim::LrSchedule>(config_.optim(), t.steps());
  LOOM_CHECK_CONFIG(config_.optim().clip_grad() >= 0, "field 'optim.clip_grad' must be >= 0, got {}",
                    config_.optim().clip_grad());

  flops_per_token_ = spec.flops_per_token(seq_len_);
  if (t.peak_tflops() > 0) {
    peak_flops_ = t.peak_tflops() * 1e12;
  } else {
    peak_flops_ = probe_matmul_flops(device_, spec.compute_dtype);
  }

  if (rank_ == 0) {
    std::string path = t.metrics_jsonl();
    if (path.empty() && !config_.logging().dir().empty()) path = config_.logging().dir() + "/metrics.jsonl";
    if (!path.empty()) {
      std::error_code ec;
      auto parent = std::filesystem::path(path).parent_path();
      if (!parent.empty()) std::filesystem::create_directories(parent, ec);
      jsonl_.open(path, std::ios::app);
      LOOM_CHECK_KIND(ErrorKind::kIO, jsonl_.good(), "cannot open metrics file '{}'", path);
    }
    std::string tb = t.tensorboard_dir();
    if (tb.empty() && !config_.logging().dir().empty()) tb = config_.logging().dir() + "/tensorboard";
    if (!tb.empty() && tb != "off") tensorboard_ = std::make_unique<TensorBoardWriter>(tb);
  }
  LOOM_LOG_INFO("model: {}", spec.summary());
  LOOM_LOG_INFO("data: {}", source_->describe());
  LOOM_LOG_INFO("batch: {} sequences x {} tokens per step = {} micro-batches of {} on each of {} DP rank(s)",
                global_batch_, seq_len_, num_micro_, micro_batch_, dp_);
  LOOM_LOG_INFO("parallel: tp={}{} pp={} dp={} ({} ranks); optimizer state {} per rank{}", tp_,
                tp.sp() ? " with sequence parallelism" : "", pp_, dp_, world_->size(),
                format_bytes(static_cast<double>(optimizer_->state_bytes())),
                zero_ ? fmt::format(" (distributed optimizer: 1/{} of the moments)", dp_) : "");
  if (runner_) {
    const auto& o = runner_->options();
    LOOM_LOG_INFO("pipeline: {} schedule, {} stages x {} chunk(s), {} micro-batches per step; this rank: layers {}",
                  parallel::pipeline::schedule_name(o.kind), o.stages, o.chunks, o.microbatches, [&] {
                    std::string r;
                    for (const auto& c : chunks_) {
                      const auto& st = c->stage();
                      r += fmt::format("{}[{}, {}){}{}", r.empty() ? "" : " + ", st.first_layer,
                                       st.first_layer + st.num_layers, st.pre_process ? " +embedding" : "",
                                       st.post_process ? " +head" : "");
                    }
                    return r;
                  }());
  }
  if (chunks_.front()->padded_vocab() != spec.vocab_size) {
    LOOM_LOG_INFO("vocabulary padded from {} to {} rows (a multiple of parallel.vocab_divisible_by {} x tp {}) for "
                  "the vocab-parallel embedding and head",
                  spec.vocab_size, chunks_.front()->padded_vocab(), config_.parallel().vocab_divisible_by(), tp_);
  }
  LOOM_LOG_INFO("compute: {} ({}), {:.3g} GFLOP per token; peak {:.2f} TFLOP/s per device ({})",
                c10::toString(spec.compute_dtype), spec.recompute ? "full recomputation" : "no recomputation",
                flops_per_token_ / 1e9, peak_flops_ / 1e12,
                t.peak_tflops() > 0 ? "train.peak_tflops" : "measured by a GEMM probe");
  LOOM_LOG_INFO("BLAS: {}", blas_description());
  if (rank_ == 0 && blas_core_forced()) {
    LOOM_LOG_WARN("OPENBLAS_CORETYPE is set: OpenBLAS uses that core's kernels, which can halve GEMM speed");
  }
}

Trainer::~Trainer() = default;

model::Batch Trainer::make_micro_batch(data::Split split, int64_t first_sample, int64_t count) const {
  at::Tensor buf = at::empty({count, seq_len_ + 1}, at::kLong);
  int64_t* p = buf.data_ptr<int64_t>();
  for (int64_t i = 0; i < count; ++i) source_->sample(split, first_sample + i, seq_len_ + 1, p + i * (seq_len_ + 1));
  model::Batch b;
  b.tokens = buf.narrow(1, 0, seq_len_).contiguous().to(device_);
  b.targets = buf.narrow(1, 1, seq_len_).contiguous().to(device_);
  return b;
}

std::vector<model::Batch> Trainer::load_step(int64_t consumed) const {
  const int64_t base = consumed + dp_rank_ * (global_batch_ / dp_);
  std::vector<model::Batch> batches;
  for (int64_t i = 0; i < num_micro_; ++i) {
    batches.push_back(make_micro_batch(data::Split::kTrain, base + i * micro_batch_, micro_batch_));
  }
  return batches;
}

namespace {
// All-reduces a host tensor over `comm` (through the communicator's device when it is not the CPU).
void all_reduce_host(at::Tensor& t, comm::Communicator& comm, comm::ReduceOp op = comm::ReduceOp::kSum) {
  if (comm.size() == 1) return;
  at::Tensor d = t.to(comm.device());
  comm.all_reduce(d, {op});
  if (d.data_ptr() != t.data_ptr()) t.copy_(d.cpu());
}
}  // namespace

double Trainer::all_reduce_sum(double v) {
  at::Tensor t = at::full({1}, v, at::kDouble);
  all_reduce_host(t, *dp_comm_);
  return t.item<double>();
}

namespace {
// Sums the gradients of `params` over `comm` through one flat buffer; an undefined gradient counts
// as zeros (and is materialised: a rank whose expert saw no token still holds the others' sum).
void all_reduce_gradients(const std::vector<model::Parameter*>& params, comm::Communicator& comm,
                          at::Device device) {
  if (params.empty()) return;
  std::vector<at::Tensor> flat;
  for (auto* p : params) {
    const at::Tensor& g = p->tensor.grad();
    flat.push_back(g.defined() ? g.reshape({-1}) : at::zeros({p->tensor.numel()}, p->tensor.options()));
  }
  at::Tensor buf = at::cat(flat);
  const bool staged = buf.device() != comm.device();  // e.g. CUDA gradients over the MPI world
  if (staged) buf = buf.to(comm.device());
  comm.all_reduce(buf);
  if (staged) buf = buf.to(device);
  int64_t off = 0;
  at::NoGradGuard no_grad;
  for (auto* p : params) {
    at::Tensor view = buf.narrow(0, off, p->tensor.numel()).view(p->tensor.sizes());
    if (p->tensor.grad().defined()) {
      p->tensor.mutable_grad().copy_(view);
    } else {
      p->tensor.mutable_grad() = view.clone();
    }
    off += p->tensor.numel();
  }
}
}  // namespace

void Trainer::reduce_gradients() {
  auto& params = params_;
  // DP first (Note: gradient buckets): its all-reduces may still be in flight on the buffers the
  // TP reduction below writes. Sums commute, so the order does not change the result.
  if (buckets_) buckets_->finish();
  // Replicated parameters whose gradient is a partial sum on each TP rank (Note: tensor-parallel
  // shards): norms and biases under SP, the MoE router.
  if (tp_ > 1) {
    std::vector<model::Parameter*> partial;
    for (auto& p : params) {
      if (p.shard.partial_grad) partial.push_back(&p);
    }
    all_reduce_gradients(partial, *tp_comm_, device_);
  }
  // The tied embedding's two copies (first stage's lookup, last stage's head) each get the sum of
  // both gradients, after the DP sum (Note: loss scaling). Before a ZeRO-1 reduce-scatter, which
  // runs after this, the order is the same: the sum is over both copies and every DP rank.
  if (embedding_comm_) all_reduce_gradients({&params[tied_embedding_]}, *embedding_comm_, device_);
}

at::Tensor Trainer::full_tensor(const model::Parameter& p, const at::Tensor& local) const {
  if (!p.tp_sharded()) return local.detach();
  at::Tensor in = local.detach().contiguous().view({-1}).to(tp_comm_->device());
  at::Tensor out = at::empty({tp_ * in.numel()}, in.options());
  tp_comm_->all_gather(out, in);
  std::vector<at::Tensor> shards;
  for (const auto& c : out.chunk(tp_)) shards.push_back(c.view(local.sizes()));
  return model::unshard(shards, p.shard, p.global_shape);
}

parallel::pipeline::RunnerCallbacks Trainer::pipeline_callbacks(const std::vector<model::Batch>& batches) const {
  const model::ModelSpec& spec = chunks_.front()->spec();
  const bool sp = chunks_.front()->tensor_parallel().sp();
  parallel::pipeline::RunnerCallbacks cb;
  cb.activation_options = at::TensorOptions()
                              .dtype(spec.param_dtype == at::kDouble ? at::kDouble : spec.compute_dtype)
                              .device(device_);
  const int64_t hidden = spec.hidden, tp = tp_;
  cb.shape = [&batches, sp, hidden, tp](int mb) {
    const model::Batch& b = batches[static_cast<size_t>(mb)];
    return std::vector<int64_t>{sp ? b.seq_len() / tp : b.seq_len(), b.batch_size(), hidden};
  };
  return cb;
}

void Trainer::forward_backward(const std::vector<model::Batch>& batches, double total_tokens, at::Tensor& acc,
                               StepMetrics& m) {
  const bool moe = chunks_.front()->spec().is_moe();
  const double aux_scale = 1.0 / static_cast<double>(num_micro_ * dp_);
  bool fault_checked = false;  // LOOM_FAULT_INJECT fires before this rank's first backward of the step
  auto fault_point = [&] {
    if (fault_ && !fault_checked) fault_->maybe_trigger(rank_, step_ + 1);
    fault_checked = true;
  };
  if (!runner_) {
    for (size_t i = 0; i < batches.size(); ++i) {
      const model::Batch& b = batches[i];
      if (buckets_) buckets_->arm(i + 1 == batches.size());
      timers_.start("forward");
      model::ModelOutput out = chunks_.front()->forward(b);
      at::Tensor loss = out.loss_sum / total_tokens;
      if (moe) loss = loss + out.aux_loss * aux_scale;
      timers_.stop("forward");
      timers_.start("backward");
      fault_point();
      loss.backward();
      timers_.stop("backward");
      acc[0] += out.loss_sum.detach().to(at::kDouble).cpu();
      acc[1] += out.aux_loss.detach().to(at::kDouble).cpu();
    }
    return;
  }
  // Pipeline: each stage differentiates its part of the objective (Note: loss scaling).
  parallel::pipeline::RunnerCallbacks cb = pipeline_callbacks(batches);
  cb.forward = [&](int c, int mb, const at::Tensor& input) {
    model::GptModel& chunk = *chunks_[static_cast<size_t>(c)];
    model::GptModel::StageOutput out = chunk.forward_stage(batches[static_cast<size_t>(mb)], input);
    parallel::pipeline::ChunkOutput co;
    co.hidden = out.hidden;
    at::Tensor loss;
    if (chunk.stage().post_process) {
      loss = out.loss.loss_sum / total_tokens;
      acc[0] += out.loss.loss_sum.detach().to(at::kDouble).cpu();
    }
    if (moe && out.loss.aux_loss.requires_grad()) {
      at::Tensor aux = out.loss.aux_loss * aux_scale;
      loss = loss.defined() ? loss + aux : aux;
      acc[1] += out.loss.aux_loss.detach().to(at::kDouble).cpu();
    }
    co.loss = loss;
    return co;
  };
  cb.before_pass = [&](const parallel::pipeline::Action& a) {
    if (a.pass == parallel::pipeline::Pass::kForward) return;
    fault_point();
    if (buckets_) {
      buckets_->arm(std::find(final_passes_.begin(), final_passes_.end(), a) != final_passes_.end());
    }
  };
  const parallel::pipeline::RunnerStats st = runner_->run(cb);
  m.forward_s = st.forward_s;
  m.backward_s = st.backward_s;
  m.pp_wait_s = st.recv_wait_s;
}

StepMetrics Trainer::train_step() {
  Stopwatch clock;
  timers_.reset();
  StepMetrics m;
  timers_.start("data");
  std::vector<model::Batch> batches;
  if (prefetch_.valid()) {
    auto ready = prefetch_.get();  // waits only if the read is slower than a step
    if (prefetch_consumed_ == consumed_samples_) batches = std::move(ready);
  }
  if (batches.empty()) batches = load_step(consumed_samples_);
  const int64_t next = consumed_samples_ + global_batch_;
  if (config_.train().prefetch() && step_ + 1 < config_.train().steps()) {
    prefetch_consumed_ = next;
    prefetch_ = std::async(std::launch::async, [this, next] { return load_step(next); });
  }
  int64_t local_tokens = 0;
  for (const auto& b : batches) local_tokens += b.num_loss_tokens();
  timers_.stop("data");
  timers_.start("comm");
  const double total_tokens = all_reduce_sum(static_cast<double>(local_tokens));  // over DP
  timers_.stop("comm");
  LOOM_CHECK(total_tokens > 0, "step {}: the global batch has no loss tokens", step_ + 1);

  if (buckets_) {
    buckets_->zero();
  } else {
    for (auto& c : chunks_) c->zero_grad();
  }
  const double aux_scale = 1.0 / static_cast<double>(num_micro_ * dp_);
  at::Tensor loss_acc = at::zeros({2}, at::kDouble);  // [lm loss sum, aux sum]
  forward_backward(batches, total_tokens, loss_acc, m);
  timers_.start("comm");
  reduce_gradients();
  if (zero_) zero_->reduce_scatter_gradients();
  if (pp_ > 1) all_reduce_host(loss_acc, *pp_comm_);  // the last stage's loss, every stage's aux
  if (dp_ > 1) all_reduce_host(loss_acc, *dp_comm_);
  timers_.stop("comm");
  m.step = step_ + 1;
  m.loss = loss_acc[0].item<double>() / total_tokens;
  m.aux_loss = loss_acc[1].item<double>() * aux_scale;
  m.tokens = static_cast<int64_t>(total_tokens);
  LOOM_CHECK_KIND(ErrorKind::kNumerics, std::isfinite(m.loss),
                  "step {}: the loss is {} ({} tokens); no update was applied, so the parameters are "
                  "those after step {}. Lower optim.lr, raise optim.warmup_steps, or check the data",
                  m.step, show(m.loss), m.tokens, step_);

  timers_.start("optimizer");
  m.grad_norm = zero_ ? zero_->clip_grad_norm(config_.optim().clip_grad())
                      : optim::clip_grad_norm(params_, config_.optim().clip_grad(), tp_comm_.get(), pp_comm_.get());
  LOOM_CHECK_KIND(ErrorKind::kNumerics, std::isfinite(m.grad_norm),
                  "step {}: the gradient norm is {} (loss {}); no update was applied, so the parameters "
                  "are those after step {}",
                  m.step, show(m.grad_norm), show(m.loss), step_);
  m.lr = schedule_->lr_at(step_);
  optimizer_->step(m.lr);
  timers_.stop("optimizer");
  ++step_;
  consumed_samples_ += global_batch_;

  m.seconds = clock.seconds();
  m.data_s = timers_.elapsed("data");
  if (!runner_) {
    m.forward_s = timers_.elapsed("forward");
    m.backward_s = timers_.elapsed("backward");
  }
  m.comm_s = timers_.elapsed("comm");
  m.optimizer_s = timers_.elapsed("optimizer");
  if (buckets_) m.grad_reduce_wait_s = buckets_->stats().wait_s;
  const double all_tokens = static_cast<double>(global_batch_ * seq_len_);
  m.tokens_per_s = all_tokens / m.seconds;
  m.tokens_per_s_per_device = m.tokens_per_s / world_->size();
  m.tflops_per_device = flops_per_token_ * m.tokens_per_s_per_device / 1e12;
  m.mfu = peak_flops_ > 0 ? m.tflops_per_device * 1e12 / peak_flops_ : 0;
  const MemoryStats mem = memory_stats(device_);
  m.device_peak = mem.device_peak;
  m.rss = mem.rss;
  m.peak_rss = mem.peak_rss;
  for (const auto& chunk : chunks_) {
    for (const auto& [layer, st] : chunk->moe_stats()) {
      m.moe_dropped += st.dropped;
      if (st.tokens_per_expert.defined()) {
        const double mean = st.tokens_per_expert.to(at::kDouble).mean().item<double>();
        const double mx = st.tokens_per_expert.max().item<int64_t>();
        if (mean > 0) m.moe_max_load = std::max(m.moe_max_load, mx / mean);
      }
    }
  }
  if (pp_ > 1 && chunks_.front()->spec().is_moe()) {  // every stage's MoE layers
    at::Tensor dropped = at::full({1}, static_cast<double>(m.moe_dropped), at::kDouble);
    at::Tensor load = at::full({1}, m.moe_max_load, at::kDouble);
    all_reduce_host(dropped, *pp_comm_);
    all_reduce_host(load, *pp_comm_, comm::ReduceOp::kMax);
    m.moe_dropped = static_cast<int64_t>(dropped.item<double>());
    m.moe_max_load = load.item<double>();
  }
  history_.push_back(m);
  return m;
}

EvalMetrics Trainer::evaluate() {
  at::NoGradGuard no_grad;
  EvalMetrics e;
  e.step = step_;
  const int64_t per_rank = global_batch_ / dp_;
  double sums[2] = {0, 0};
  for (int64_t g = 0; g < config_.train().eval_batches(); ++g) {
    const int64_t base = g * global_batch_ + dp_rank_ * per_rank;
    std::vector<model::Batch> batches;
    for (int64_t i = 0; i < num_micro_; ++i) {
      batches.push_back(make_micro_batch(data::Split::kValid, base + i * micro_batch_, micro_batch_));
    }
    if (!runner_) {
      for (const auto& b : batches) {
        model::ModelOutput out = chunks_.front()->forward(b);
        sums[0] += out.loss_sum.item<double>();
        sums[1] += static_cast<double>(out.num_tokens);
      }
      continue;
    }
    parallel::pipeline::RunnerCallbacks cb = pipeline_callbacks(batches);
    cb.forward = [&](int c, int mb, const at::Tensor& input) {
      model::GptModel& chunk = *chunks_[static_cast<size_t>(c)];
      model::GptModel::StageOutput out = chunk.forward_stage(batches[static_cast<size_t>(mb)], input);
      if (chunk.stage().post_process) {  // only the last stage has the loss (summed over PP below)
        sums[0] += out.loss.loss_sum.item<double>();
        sums[1] += static_cast<double>(out.loss.num_tokens);
      }
      parallel::pipeline::ChunkOutput co;
      co.hidden = out.hidden;
      return co;
    };
    runner_->forward_only(cb, static_cast<int>(num_micro_));
  }
  if (dp_ > 1 || pp_ > 1) {
    at::Tensor t = at::tensor({sums[0], sums[1]}, at::kDouble);
    if (pp_ > 1) all_reduce_host(t, *pp_comm_);
    if (dp_ > 1) all_reduce_host(t, *dp_comm_);
    sums[0] = t[0].item<double>();
    sums[1] = t[1].item<double>();
  }
  e.tokens = static_cast<int64_t>(sums[1]);
  e.loss = sums[0] / sums[1];
  e.perplexity = std::exp(e.loss);
  if (rank_ == 0) {
    if (progress_) progress_->clear();
    LOOM_LOG_INFO("eval step {} | loss {:.4f} | perplexity {:.2f} | {} tokens", e.step, e.loss, e.perplexity, e.tokens);
    nlohmann::json j = {{"type", "eval"}, {"step", e.step}, {"loss", e.loss},
                        {"perplexity", e.perplexity}, {"tokens", e.tokens}};
    write_jsonl(j.dump());
    if (tensorboard_) {
      tensorboard_->add_scalars(e.step, {{"eval/loss", e.loss}, {"eval/perplexity", e.perplexity}});
      tensorboard_->flush();
    }
  }
  return e;
}

std::string Trainer::save_checkpoint() {
  const std::string& root = config_.train().checkpoint_dir();
  LOOM_CHECK_CONFIG(!root.empty(), "cannot save a checkpoint: field 'train.checkpoint_dir' is empty");
  std::string dir;
  // The checkpoint holds full, unpadded tensors whatever the layout (the first DP replica gathers
  // its TP shards; world rank 0 writes), so it loads under any tp (Note: tensor-parallel shards).
  checkpoint::CheckpointData data;
  const std::vector<optim::NamedTensor> optim_state = optimizer_->state();  // collective with ZeRO-1
  // With pipeline parallelism each stage's first DP replica gathers its TP shards, and the stages'
  // (tp 0) ranks send theirs to world rank 0 over the pipeline group.
  if (dp_rank_ == 0) {
    std::map<std::string, const model::Parameter*> by_name;
    for (const auto& p : params_) {
      if (p.pipeline_copy) continue;  // saved by its owner
      data.model[p.name] = full_tensor(p, p.tensor);
      by_name[p.name] = &p;
    }
    for (const auto& s : optim_state) {
      auto owner = by_name.find(s.name.substr(0, s.name.rfind('.')));
      if (owner == by_name.end()) continue;  // a pipeline copy's state
      data.state["optim." + s.name] = full_tensor(*owner->second, s.tensor);
    }
    if (pp_ > 1 && groups_->tp_rank() == 0) checkpoint::gather_checkpoint_data(data, *pp_comm_, 0);
  }
  if (rank_ == 0) {
    {
      at::Generator gen = at::detail::getDefaultCPUGenerator();
      std::lock_guard<std::mutex> lock(gen.mutex());
      data.state["rng.cpu"] = gen.get_state();
    }
    data.metadata = {{"format", checkpoint::kSingleProcessFormat},
                     {"step", std::to_string(step_)},
                     {"consumed_samples", std::to_string(consumed_samples_)},
                     {"optimizer_step", std::to_string(optimizer_->step_count())},
                     {"world_size", std::to_string(world_->size())},
                     {"config", config::to_text(config_)}};
    dir = checkpoint::save_checkpoint(root, step_, data, config_.train().keep_checkpoints());
    if (progress_) progress_->clear();
    LOOM_LOG_INFO("saved checkpoint {} (step {})", dir, step_);
  }
  world_->barrier();
  last_checkpoint_ = dir.empty() ? fmt::format("{}/step-{:08d}", root, step_) : dir;
  return last_checkpoint_;
}

void Trainer::load_checkpoint(const std::string& dir) {
  // Everything is checked before anything is changed, and every rank learns whether any rank's
  // check failed: a pipeline stage whose parameters are missing must not leave the other stages
  // waiting in a collective (and a failed load leaves the model as it was).
  checkpoint::CheckpointData data;
  std::map<std::string, const model::Parameter*> by_name;
  std::vector<optim::NamedTensor> state;
  std::exception_ptr failure;
  try {
    data = checkpoint::load_checkpoint(dir);
    auto meta = [&](const char* key) -> std::string {
      auto it = data.metadata.find(key);
      LOOM_CHECK_KIND(ErrorKind::kIO, it != data.metadata.end(), "checkpoint '{}': metadata '{}' is missing",
                      dir, key);
      return it->second;
    };
    LOOM_CHECK_KIND(ErrorKind::kIO, meta("format") == checkpoint::kSingleProcessFormat,
                    "checkpoint '{}' has format '{}', this build reads '{}'", dir, meta("format"),
                    checkpoint::kSingleProcessFormat);
    for (const char* key : {"step", "consumed_samples", "optimizer_step"}) (void)meta(key);
    LOOM_CHECK_KIND(ErrorKind::kIO, data.state.count("rng.cpu") == 1, "checkpoint '{}': 'rng.cpu' is missing", dir);
    for (const auto& p : params_) {
      auto it = data.model.find(p.name);
      LOOM_CHECK_KIND(ErrorKind::kIO, it != data.model.end(),
                      "checkpoint '{}' has no parameter '{}': was it written for a different model config?",
                      dir, p.name);
      LOOM_CHECK_KIND(ErrorKind::kIO, it->second.sizes() == at::IntArrayRef(p.global_shape),
                      "checkpoint '{}': parameter '{}' has shape {}, the model needs {}", dir, p.name,
                      it->second.sizes(), at::IntArrayRef(p.global_shape));
      by_name[p.name] = &p;
    }
    for (const auto& [name, t] : data.state) {
      if (name.rfind("optim.", 0) != 0) continue;
      const std::string key = name.substr(6);
      auto owner = by_name.find(key.substr(0, key.rfind('.')));
      if (owner == by_name.end()) continue;  // another pipeline stage's
      LOOM_CHECK_KIND(ErrorKind::kIO, t.sizes() == at::IntArrayRef(owner->second->global_shape),
                      "checkpoint '{}': optimizer state '{}' has shape {}, the parameter needs {}", dir, key,
                      t.sizes(), at::IntArrayRef(owner->second->global_shape));
      state.push_back({key, model::shard_of(t, owner->second->shard, owner->second->tp_size, owner->second->tp_rank)});
    }
  } catch (const Error&) {
    failure = std::current_exception();
  }
  // Parameters this rank saves (not pipeline copies), summed over the stages; and whether any rank failed.
  int64_t owned = 0;
  for (const auto& p : params_) owned += p.pipeline_copy ? 0 : 1;
  at::Tensor failed = at::full({1}, failure ? 1.0 : 0.0, at::kDouble);
  all_reduce_host(failed, *world_, comm::ReduceOp::kMax);
  if (failure) std::rethrow_exception(failure);
  LOOM_CHECK_KIND(ErrorKind::kIO, failed.item<double>() == 0,
                  "checkpoint '{}' does not fit this model on another rank (see that rank's error): was it written "
                  "for a different model config?",
                  dir);
  if (pp_ > 1) {
    at::Tensor n = at::full({1}, static_cast<double>(owned), at::kDouble);
    all_reduce_host(n, *pp_comm_);
    owned = static_cast<int64_t>(n.item<double>());
  }
  LOOM_CHECK_KIND(ErrorKind::kIO, static_cast<int64_t>(data.model.size()) == owned,
                  "checkpoint '{}' holds {} parameters, the model has {}: was it written for a different "
                  "model config?",
                  dir, data.model.size(), owned);
  auto meta = [&](const char* key) { return data.metadata.at(key); };
  at::NoGradGuard no_grad;
  for (auto& p : params_) p.tensor.copy_(model::shard_of(data.model.at(p.name), p.shard, p.tp_size, p.tp_rank));
  optimizer_->load_state(state, std::stoll(meta("optimizer_step")));
  auto rng = data.state.find("rng.cpu");
  {
    at::Generator gen = at::detail::getDefaultCPUGenerator();
    std::lock_guard<std::mutex> lock(gen.mutex());
    gen.set_state(rng->second);
  }
  step_ = std::stoll(meta("step"));
  consumed_samples_ = std::stoll(meta("consumed_samples"));
  if (consumed_samples_ != step_ * global_batch_) {
    LOOM_LOG_WARN("checkpoint consumed {} samples in {} steps; this run uses {} per step from here on",
                  consumed_samples_, step_, global_batch_);
  }
  LOOM_LOG_INFO("resumed from {} at step {} ({} samples consumed)", dir, step_, consumed_samples_);
}

void Trainer::write_jsonl(const std::string& line) {
  if (jsonl_.is_open()) {
    jsonl_ << line << '\n';
    jsonl_.flush();
  }
}

void Trainer::log_step(const StepMetrics& m) {
  if (rank_ != 0) return;
  const int64_t total = config_.train().steps();
  std::string brief = fmt::format("loss {:.4f} | lr {:.2e} | {:.0f} tok/s | MFU {:.1f}%", m.loss, m.lr,
                                  m.tokens_per_s, m.mfu * 100);
  nlohmann::json j = {{"type", "train"},       {"step", m.step},
                      {"loss", m.loss},        {"aux_loss", m.aux_loss},
                      {"lr", m.lr},            {"grad_norm", m.grad_norm},
                      {"tokens", m.tokens},    {"seconds", m.seconds},
                      {"tokens_per_s", m.tokens_per_s},
                      {"tokens_per_s_per_device", m.tokens_per_s_per_device},
                      {"tflops_per_device", m.tflops_per_device},
                      {"mfu", m.mfu},          {"rss_bytes", m.rss},
                      {"peak_rss_bytes", m.peak_rss},
                      {"device_peak_bytes", m.device_peak},
                      {"time", {{"data", m.data_s}, {"forward", m.forward_s}, {"backward", m.backward_s},
                                {"comm", m.comm_s}, {"optimizer", m.optimizer_s}, {"pp_wait", m.pp_wait_s}}}};
  if (chunks_.front()->spec().is_moe()) {
    j["moe_dropped"] = m.moe_dropped;
    j["moe_max_load"] = m.moe_max_load;
  }
  write_jsonl(j.dump());
  if (tensorboard_) {
    std::vector<std::pair<std::string, double>> v = {
        {"train/loss", m.loss},           {"train/lr", m.lr},
        {"train/grad_norm", m.grad_norm}, {"perf/tokens_per_s", m.tokens_per_s},
        {"perf/tflops_per_device", m.tflops_per_device}, {"perf/mfu", m.mfu},
        {"memory/rss_gib", static_cast<double>(m.rss) / (1 << 30)}};
    if (chunks_.front()->spec().is_moe()) {
      v.emplace_back("train/aux_loss", m.aux_loss);
      v.emplace_back("moe/max_load", m.moe_max_load);
    }
    tensorboard_->add_scalars(m.step, v);
    if (m.step % config_.train().log_every() == 0) tensorboard_->flush();
  }
  const bool log_now = m.step % config_.train().log_every() == 0 || m.step == total || m.step == 1;
  if (log_now) {
    if (progress_) progress_->clear();
    const double t = std::max(m.seconds, 1e-12);
    std::string line = fmt::format(
        "step {}/{} | loss {:.4f} | lr {:.3e} | grad {:.3f} | {:.0f} tok/s | {:.3f} TFLOP/s | MFU {:.1f}% "
        "| mem {} | data {:.0f}% fwd {:.0f}% bwd {:.0f}% comm {:.0f}% opt {:.0f}%",
        m.step, total, m.loss, m.lr, m.grad_norm, m.tokens_per_s, m.tflops_per_device, m.mfu * 100,
        device_.is_cuda() ? format_bytes(static_cast<double>(m.device_peak)) + " GPU peak"
                          : format_bytes(static_cast<double>(m.rss)),
        100 * m.data_s / t, 100 * m.forward_s / t,
        100 * m.backward_s / t, 100 * m.comm_s / t, 100 * m.optimizer_s / t);
    if (runner_) line += fmt::format(" | pp wait {:.0f}%", 100 * m.pp_wait_s / t);
    if (chunks_.front()->spec().is_moe()) {
      line += fmt::format(" | aux {:.4f} | max load {:.2f}", m.aux_loss, m.moe_max_load);
      if (m.moe_dropped > 0) line += fmt::format(" | dropped {}", m.moe_dropped);
    }
    if (progress_ && !progress_->active()) line += fmt::format(" | ETA {}", format_duration(progress_->eta(m.step)));
    LOOM_LOG_INFO("{}", line);
  }
  if (progress_) progress_->update(m.step, brief);
}

TrainSummary Trainer::fit() {
  const auto& t = config_.train();
  if (t.resume() == "latest") {
    LOOM_CHECK_CONFIG(!t.checkpoint_dir().empty(), "train.resume is 'latest' but train.checkpoint_dir is empty");
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
  progress_ = std::make_unique<Progress>(t.progress(), step_, t.steps(), rank_ == 0 && t.progress() != "off");
  Stopwatch clock;
  double tps_sum = 0, mfu_sum = 0;
  int64_t timed = 0;
  EvalMetrics last_eval;
  bool have_eval = false;
  s.best_eval_loss = std::numeric_limits<double>::infinity();
  bool saved_now = false;
  while (step_ < t.steps()) {
    StepMetrics m = train_step();
    log_step(m);
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
  if (progress_) progress_->finish();
  if (!t.checkpoint_dir().empty() && !saved_now && step_ > s.first_step) save_checkpoint();
  s.last_step = step_;
  s.seconds = clock.seconds();
  s.mean_tokens_per_s = timed > 0 ? tps_sum / static_cast<double>(timed) : (history_.empty() ? 0 : history_.back().tokens_per_s);
  s.mean_mfu = timed > 0 ? mfu_sum / static_cast<double>(timed) : (history_.empty() ? 0 : history_.back().mfu);
  s.checkpoint = last_checkpoint_;
  if (!have_eval) s.best_eval_loss = std::nan("");
  LOOM_LOG_INFO("done: steps {}..{} in {} | loss {:.4f} -> {:.4f} | best eval loss {:.4f} | {:.0f} tok/s | MFU {:.1f}%{}",
                s.first_step, s.last_step, format_duration(s.seconds), s.first_loss, s.last_loss,
                s.best_eval_loss, s.mean_tokens_per_s, s.mean_mfu * 100,
                s.checkpoint.empty() ? "" : " | checkpoint " + s.checkpoint);
  return s;
}

}  // namespace loom::train
