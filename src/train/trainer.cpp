#include "loom/train/trainer.h"

#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <map>
#include <optional>

#include "loom/checkpoint/checkpoint.h"
#include "loom/checkpoint/training_state.h"
#include "loom/comm/group_view.h"
#include "loom/comm/local_communicator.h"
#include "loom/core/config.h"
#include "loom/core/error.h"
#include "loom/core/logging.h"
#include "loom/core/timer.h"
#include "loom/core/trace.h"
#include "loom/data/balance_scheduler.h"
#include "loom/mesh/parallel_dims.h"
#include "loom/model/offload.h"
#include "loom/ops/context_attention.h"
#include "loom/optim/chained.h"
#include "loom/train/memory_estimate.h"
#include "loom/train/signals.h"
#include "loom/train/straggler.h"
#include "loom/train/system.h"

namespace loom::train {

namespace fs = std::filesystem;

namespace {
// NaN prints as "NaN" whatever its sign bit (which BLAS kernels do not agree on).
std::string show(double v) {
  if (std::isnan(v)) return "NaN";
  return fmt::format("{}", v);
}

// Checked on the whole micro-batch, which every rank that shares it (CP, an HDP group) holds, so
// that they all stop together (a rank's own shard check would leave its peers waiting in the
// attention).
void check_positions(const model::Batch& b, int64_t max_pos) {
  if (!b.position_ids.defined() || !b.position_ids.is_cpu()) return;
  const int64_t last = b.position_ids.max().item<int64_t>();
  LOOM_CHECK(last < max_pos, "batch: position {} of a packed document reaches model.max_seq_len {}",
             last, max_pos);
}

}  // namespace

Trainer::Trainer(const config::JobConfig& config, comm::CommunicatorPtr world,
                 std::unique_ptr<data::DataSource> source)
    : config_(config), world_(std::move(world)), source_(std::move(source)) {
  config::validate(config_);
  if (!world_) world_ = std::make_shared<comm::LocalCommunicator>();
  const auto dims = mesh::ParallelDims::from_config(config_.parallel(), world_->size());
  LOOM_CHECK_CONFIG(dims.ep > 1 || dims.expert_tp == dims.tp,
                    "parallel.expert_tp = {} differs from parallel.tp = {}, but parallel.ep = 1: "
                    "expert tensor parallelism is carved with expert parallelism (set "
                    "parallel.ep > 1, or expert_tp to 0)",
                    dims.expert_tp, dims.tp);
  // Checked here, on every rank alike (a stage without MoE layers would not see the layer's check).
  LOOM_CHECK_CONFIG(dims.ep == 1 || dims.tp == 1 || config_.parallel().sequence_parallel(),
                    "expert parallelism with parallel.tp = {} needs parallel.sequence_parallel: "
                    "true (each TP rank dispatches its own sequence shard)",
                    dims.tp);
  LOOM_CHECK_CONFIG(dims.ep == 1 || config_.model().moe().num_experts() > 0,
                    "parallel.ep = {} spreads MoE experts over ranks, but the model has none "
                    "(model.moe.num_experts = 0)",
                    dims.ep);
  hdp_ = config_.parallel().hdp();
  if (hdp_) {  // Note: hybrid data parallelism plan
    LOOM_CHECK_CONFIG(parallel::parse_cp_comm_type(config_.parallel().cp_comm_type()) ==
                          parallel::CpCommType::kP2P,
                      "parallel.hdp runs each long sequence's group with ring attention: "
                      "parallel.cp_comm_type must be p2p (it is '{}')",
                      config_.parallel().cp_comm_type());
    LOOM_CHECK_CONFIG(dims.ep == 1 || dims.tp == 1,
                      "parallel.hdp with expert parallelism under parallel.tp = {} is not "
                      "supported yet (the tp x cp token groups are static); use tp 1 or ep 1",
                      dims.tp);
  }
  const auto& t = config_.train();
  // Note: activation offload.
  LOOM_CHECK_CONFIG(t.offload_fraction() >= 0 && t.offload_fraction() <= 1,
                    "train.offload_fraction = {}: the share of each model chunk's blocks whose "
                    "activations go to host memory must be in [0, 1]",
                    t.offload_fraction());
  LOOM_CHECK_CONFIG(t.offload_min_tokens() >= 0 && t.offload_bandwidth_gbps() >= 0 &&
                        std::isfinite(t.offload_bandwidth_gbps()),
                    "train.offload_min_tokens = {} and train.offload_bandwidth_gbps = {} must not "
                    "be negative",
                    t.offload_min_tokens(), t.offload_bandwidth_gbps());
  LOOM_CHECK_CONFIG(t.offload_bandwidth_gbps() == 0 || hdp_,
                    "train.offload_bandwidth_gbps = {} chooses each micro-batch's offload share "
                    "from the hybrid data parallelism cost model, so it needs parallel.hdp: true "
                    "(or set it to 0 to offload train.offload_fraction of the blocks always)",
                    t.offload_bandwidth_gbps());
  groups_ = std::make_unique<mesh::ProcessGroups>(dims, world_);
  log::set_coordinates(groups_->coords_string());
  set_long_timeouts(true);  // until the first step is done (Note: timeouts)
  device_ = resolve_device(t.device());
  if (t.num_threads() > 0) at::set_num_threads(t.num_threads());
  trace_steps_ = trace::parse_steps(config_.logging().trace_steps(), "logging.trace_steps");
  fault_ = FaultInjection::from_env();
  if (fault_ && fault_->rank == world_->rank()) {
    LOOM_LOG_WARN("LOOM_FAULT_INJECT is set: this rank will misbehave from step {}", fault_->step);
  }
  if (t.tune_host_allocator() && !tune_host_allocator()) {
    LOOM_LOG_WARN(
        "glibc refused the host-allocator settings (mallopt); fresh pages will be "
        "faulted in each step");
  }
  const model::ModelSpec spec = model::ModelSpec::from_config(config_.model());
  // Before anything is allocated (Note: memory estimate).
  const int local_ranks = ranks_on_this_node(world_.get());
  // Every rank measures before any allocates, and all decide on the smallest figure, so the job
  // ends on every rank with the same message or on none.
  double available = available_memory(device_, local_ranks);
  available = comm::all_reduce_scalar(available < 0 ? 1e300 : available, world_.get(),
                                      comm::ReduceOp::kMin);
  const MemoryEstimate need = estimate_memory(spec, config_, dims);
  offload_.bytes_per_token_layer = need.layer_bytes_per_token;
  check_memory(need, available >= 1e300 ? -1.0 : available, device_, local_ranks);
  // The pieces of a step (DESIGN: the trainer builds them and calls them in order).
  build_data(spec);
  build_model(spec);
  if (hdp_ && config_.parallel().hdp_cost().empty()) fit_hdp_cost(spec);
  if (hdp_) set_hdp_ring(spec);
  set_offload_rule(spec);
  build_optimizer(spec);
  build_executor();
  // The measured ceiling is the best any rank reached: a rank disturbed while probing (ranks
  // sharing cores, a neighbour still loading data) would otherwise log an MFU above 100%.
  peak_flops_ = t.peak_tflops() > 0
                    ? t.peak_tflops() * 1e12
                    : comm::all_reduce_scalar(probe_matmul_flops(device_, spec.compute_dtype),
                                              world_.get(), comm::ReduceOp::kMax);
  MetricsContext ctx;
  ctx.total_steps = t.steps();
  ctx.log_every = t.log_every();
  ctx.moe = spec.is_moe();
  ctx.pipeline = groups_->pp_size() > 1;
  ctx.ring = groups_->cp_size() > 1 || hdp_;
  ctx.cuda = device_.is_cuda();
  if (spec.is_moe() && source_->source_names().size() > 1) {
    ctx.sources = source_->source_names();
    ctx.num_experts = spec.moe.num_experts;
  }
  sinks_ = make_metrics_sinks(config_, ctx, world_->rank() == 0);
  log_setup(spec);
}

void Trainer::build_data(const model::ModelSpec& spec) {
  // Every CP rank of a DP rank loads the same micro-batches and keeps its share of each. Under
  // hybrid data parallelism the dp x cp ranks are one pool that the scheduler plans as a whole.
  const auto pool = groups_->dp_cp_group();
  auto lo = hdp_
                ? data::LoaderOptions::from_config(config_, pool->size(), pool->rank(),
                                                   groups_->tp_size(), device_, 1)
                : data::LoaderOptions::from_config(config_, groups_->dp_size(), groups_->dp_rank(),
                                                   groups_->tp_size(), device_, groups_->cp_size());
  if (hdp_ && config_.parallel().hdp_cost().empty()) {
    // T(s) in units of one token's matmuls: the attention term over the per-token one (Note:
    // hybrid data parallelism plan).
    const double per_token = spec.step_flops(1, 0), per_sq = spec.step_flops(0, 1);
    lo.cost = data::CostModel{per_token > 0 ? per_sq / per_token : 0, 1, 0};
  }
  global_batch_ = lo.global_batch;
  documents_ = lo.mode == data::BatchMode::kDocuments;
  num_micro_ = documents_ ? 0 : global_batch_ / (lo.micro_batch_size * lo.dp_size);  // else varies
  if (!source_) source_ = data::make_source(config_, spec.vocab_size, global_batch_);
  LOOM_CHECK_CONFIG(source_->vocab_size() <= spec.vocab_size,
                    "the data's vocabulary ({} tokens) does not fit model.vocab_size = {}",
                    source_->vocab_size(), spec.vocab_size);
  loader_ = std::make_unique<data::MicroBatchLoader>(source_.get(), lo);
}

void Trainer::build_model(const model::ModelSpec& spec) {
  const auto& par = config_.parallel();
  parallel::TensorParallel tp;
  if (groups_->tp_size() > 1) tp.comm = groups_->tp_group();
  tp.sequence_parallel = par.sequence_parallel();
  tp.overlap_comm = par.overlap_tp_comm();
  const auto cp_type = parallel::parse_cp_comm_type(par.cp_comm_type());  // checked at any cp
  LOOM_CHECK_CONFIG(par.cp_a2a_size() == 0 || cp_type == parallel::CpCommType::kA2AP2P,
                    "parallel.cp_a2a_size = {} applies to parallel.cp_comm_type a2a+p2p only (it "
                    "is '{}')",
                    par.cp_a2a_size(), par.cp_comm_type());
  if (groups_->cp_size() > 1 && !hdp_) {  // under HDP the groups change per micro-batch
    cp_ = parallel::make_context_parallel(groups_->cp_group(), cp_type, par.cp_a2a_size(),
                                          spec.attention_block);
  }
  if (groups_->ep_size() > 1) {  // Note: expert parallelism
    ep_ = parallel::make_expert_parallel(groups_->group(mesh::Group::kTpEp), groups_->ep_size(),
                                         groups_->ep_rank(), groups_->expert_tp_size(),
                                         groups_->expert_tp_rank());
    // Under TP each TP rank dispatches its own sequence shard (Note: expert parallelism with
    // tensor parallelism).
    if (groups_->tp_size() > 1) ep_.tokens = groups_->group(mesh::Group::kTpCp);
  }
  chunks_ = model::build_chunks(spec, config_, device_, tp, groups_->pp_size(), groups_->pp_rank(),
                                cp_, ep_);
  for (const auto& c : chunks_)
    params_.insert(params_.end(), c->parameters().begin(), c->parameters().end());
  // MoE balance over the data-parallel domain of this stage (Note: balance losses): the dp x cp
  // ranks, one micro-batch slot per DP rank; and the TP ranks when each routes its own shard.
  model::MoeDomain domain;
  const auto domain_group = ep_.tokens ? mesh::Group::kTpDpCp : mesh::Group::kDpCp;
  if (groups_->group(domain_group)->size() > 1) domain.comm = groups_->group(domain_group);
  domain.slots = hdp_ ? groups_->dp_cp_group()->size() : groups_->dp_size();
  // Blended data: the layers count each source's experts (Note: expert specialisation).
  const auto sources = static_cast<int64_t>(source_->source_names().size());
  for (const auto& c : chunks_) {
    for (model::MoeLayer* m : c->moe_layers()) {
      m->set_domain(domain);
      m->set_sources(sources);
      moe_layers_.push_back(m);
    }
  }
}

// [Note: hybrid data parallelism cost model]
// Without parallel.hdp_cost, the scheduler's T(s) = a s^2 + b s + c is fitted at start-up from the
// job's own model on its own devices: every rank times the forward and backward of its chunks
// (this stage's layers, under its TP, EP and SP) on one sequence of s = C/4, C/2, 3C/4 and C
// tokens (C the capacity, train.micro_batch_tokens, at most train.seq_len; multiples of the pad),
// the best of 3 runs after a warm-up; every rank's times are gathered in one all-reduce and each
// length's is the median over the world (data::median_over_ranks: a rank descheduled while timing,
// as ranks sharing cores are, does not bend the curve), so every rank fits the very same model
// (ranks planning with different models would disagree on the plan and wait on each other), by
// non-negative least squares (data::fit_cost_model). Timings that do not grow with length are
// taken once more, best of 6; if they still do not, or with fewer than 3 distinct lengths (a
// capacity under 3 pads), the FLOPs model stays. The fitted constant is dropped (it is what a call
// costs, i.e. per micro-batch, where the scheduler's c is per sequence), and a quadratic term the
// short lengths cannot show is taken from the FLOPs, relative to the measured time per token (group
// shares reach train.seq_len, where it dominates). The loader saves the fitted model with its
// state, and a resumed run takes the saved one: the same steps are planned the same way. The
// synthetic sequence uses no random numbers (the RNG state is part of a checkpoint), and the
// gradients it leaves are cleared before the optimizer and gradient synchronisation exist.
void Trainer::fit_hdp_cost(const model::ModelSpec& spec) {
  const auto& o = loader_->options();
  const int64_t pad = std::max<int64_t>(o.pad_multiple, 1);
  const int64_t top = std::min(o.micro_batch_tokens, o.seq_len);
  std::vector<int64_t> lengths;
  for (int64_t q = 1; q <= 4; ++q) {
    const int64_t s = std::max(pad, top * q / 4 / pad * pad);
    if (s <= top && (lengths.empty() || lengths.back() != s)) lengths.push_back(s);
  }
  if (lengths.size() < 3) {
    LOOM_LOG_INFO("hdp: the capacity ({} tokens) is too small to fit a cost model; using {}",
                  o.micro_batch_tokens, o.cost.describe());
    return;
  }
  const bool sp = chunks_.front()->tensor_parallel().sp();
  const int tp = groups_->tp_size();
  // Every rank's best of `reps` timed runs per length (after a warm-up), gathered from all ranks
  // (a sum of rows each rank fills its own of), then the median over the ranks per length.
  auto measure = [&](int reps) {
    const auto n = static_cast<int64_t>(lengths.size());
    at::Tensor all = at::zeros({world_->size(), n}, at::kDouble);
    for (size_t i = 0; i < lengths.size(); ++i) {
      const int64_t s = lengths[i];
      const at::Tensor ids = (at::arange(s + 1, at::kLong) * 7919 + 13) % spec.vocab_size;
      model::Batch b;
      b.tokens = ids.narrow(0, 0, s).view({1, s});
      b.targets = ids.narrow(0, 1, s).view({1, s});
      b = b.to(device_);
      const int64_t local = sp ? s / tp : s;
      double best = 1e300;
      for (int rep = 0; rep <= reps; ++rep) {
        Stopwatch clock;
        for (auto& c : chunks_) {
          at::Tensor input;
          if (!c->stage().pre_process) {
            input = (at::arange(local * spec.hidden, at::kFloat).sin() * 0.1)
                        .view({local, 1, spec.hidden})
                        .to(device_, spec.compute_dtype)
                        .requires_grad_(true);
          }
          const auto out = c->forward_stage(b, input);
          at::Tensor objective = c->stage().post_process ? out.loss.loss_sum : out.hidden.sum();
          if (out.loss.aux_loss.defined() && out.loss.aux_loss.requires_grad())
            objective = objective + out.loss.aux_loss.to(objective.scalar_type());
          objective.backward();
          (void)objective.detach().cpu().item<double>();  // the device's work is done
        }
        if (rep > 0) best = std::min(best, clock.seconds());
      }
      all[world_->rank()][static_cast<int64_t>(i)] = best;
    }
    comm::all_reduce_host(all, world_.get());
    all = all.cpu().contiguous();
    const auto got = all.accessor<double, 2>();
    std::vector<std::vector<double>> rows(static_cast<size_t>(world_->size()));
    for (int r = 0; r < world_->size(); ++r) {
      for (int64_t i = 0; i < n; ++i) rows[static_cast<size_t>(r)].push_back(got[r][i]);
    }
    const auto median = data::median_over_ranks(rows);
    std::vector<std::pair<double, double>> points;
    for (size_t i = 0; i < lengths.size(); ++i)
      points.emplace_back(static_cast<double>(lengths[i]), median[i]);
    return points;
  };
  // Once more with twice the runs when the timings do not grow with the length (every rank sees
  // the same gathered figures, so all decide alike).
  auto points = measure(3);
  if (const auto first = data::fit_cost_model(points); first.a <= 0 && first.b <= 0) {
    LOOM_LOG_INFO("hdp: the start-up timings do not grow with the sequence's length; timing again");
    points = measure(6);
  }
  for (auto& p : params_) {
    if (p.tensor.grad().defined()) p.tensor.mutable_grad().reset();
  }
  data::CostModel cost = data::fit_cost_model(points);
  const data::CostModel flops = o.cost;  // build_data's: b = 1, a = attention's share
  // c is what one call costs whatever its length (launches, the head), i.e. per micro-batch; the
  // scheduler charges c per sequence, so short documents packed together would look expensive:
  // the constant is dropped.
  cost.c = 0;
  if (cost.a <= 0 && cost.b <= 0) {  // timings that do not grow with length: noise
    LOOM_LOG_WARN(
        "hdp: the start-up timings do not grow with the sequence's length ({}); the "
        "scheduler keeps {}",
        cost.describe(), flops.describe());
    return;
  }
  // Up to C tokens the quadratic term can hide in the noise; longer sequences run as group shares
  // up to train.seq_len, where it dominates: without a measured one, attention's FLOPs share
  // relative to the measured time per token.
  const bool from_flops = cost.a <= 0 && flops.a > 0 && flops.b > 0;
  if (from_flops) cost.a = cost.b * flops.a / flops.b;
  loader_->set_cost(cost, /*fitted=*/true);
  std::string measured;
  for (const auto& [len, t] : points)
    measured += fmt::format("{}{}: {:.3g} s", measured.empty() ? "" : ", ", len, t);
  LOOM_LOG_INFO(
      "hdp: cost model fitted at start-up from the model's forward and backward ({}; "
      "median over {} ranks): {}{} (a resumed run takes its checkpoint's)",
      measured, world_->size(), cost.describe(),
      from_flops ? " (the quadratic term from the FLOPs, unseen at these lengths)" : "");
}

// Note: hybrid data parallelism ring cost. A group member streams the whole sequence's keys and
// values through a stage's layers three times (forward K/V, backward K/V and dK/dV): per token,
// 3 x 2 x (its KV heads) x head_dim x the compute dtype's bytes x layers, over the link.
void Trainer::set_hdp_ring(const model::ModelSpec& spec) {
  const double gbps = config_.parallel().hdp_ring_gbps();
  if (gbps <= 0) return;
  const bool seconds = !config_.parallel().hdp_cost().empty() || loader_->cost_fitted();
  if (!seconds) {
    LOOM_LOG_WARN(
        "parallel.hdp_ring_gbps: the cost model ({}) was not fitted in seconds at start-up, so "
        "the scheduler cannot weigh the ring's transfers against it; it plans as if they hide "
        "behind compute",
        loader_->options().cost.describe());
    return;
  }
  // A stage's mean layers, as the start-up fit averages the stages' timings: every rank of every
  // stage plans with the same figure (stages with different plans would send each other
  // different micro-batches).
  const double layers =
      static_cast<double>(spec.num_layers) / static_cast<double>(groups_->pp_size());
  const int64_t kv_heads = std::max<int64_t>(spec.num_kv_heads / groups_->tp_size(), 1);
  const double bytes = 3.0 * 2.0 * static_cast<double>(kv_heads * spec.head_dim) *
                       static_cast<double>(c10::elementSize(spec.compute_dtype)) * layers;
  LOOM_CHECK_CONFIG(std::isfinite(bytes / (gbps * 1e9)),
                    "field 'parallel.hdp_ring_gbps' ({}) is too small: {} B per token over it is "
                    "not a finite time",
                    gbps, bytes);
  loader_->set_ring(bytes / (gbps * 1e9));
  LOOM_LOG_INFO(
      "hdp: ring attention moves {} B per token of a group's sequence on each member at {} GB/s "
      "({:.3g} s per token); no group grows past the knee where those transfers dominate its share",
      bytes, gbps, bytes / (gbps * 1e9));
}

// Note: activation offload. ByteScale's rule needs the cost model in seconds: the start-up fit
// (or a resumed run's), or parallel.hdp_cost, which must then be given in seconds.
void Trainer::set_offload_rule(const model::ModelSpec& spec) {
  const auto& t = config_.train();
  offload_.max_ratio = t.offload_fraction();
  offload_.min_tokens = t.offload_min_tokens();
  offload_.forward_share = spec.recompute ? 0.25 : 1.0 / 3.0;  // recomputation: a second forward
  offload_.layers = 0;
  for (const auto& chunk : chunks_) {
    const auto& st = chunk->stage();
    offload_.layers += st.num_layers >= 0 ? st.num_layers : spec.num_layers - st.first_layer;
  }
  offload_.layers = std::max<int64_t>(offload_.layers, 1);
  if (offload_.max_ratio <= 0) return;
  const double bandwidth = t.offload_bandwidth_gbps() * 1e9;
  const bool seconds = !config_.parallel().hdp_cost().empty() || loader_->cost_fitted();
  if (bandwidth > 0 && !seconds) {
    LOOM_LOG_WARN(
        "train.offload_bandwidth_gbps: the cost model ({}) was not fitted in seconds at start-up, "
        "so ByteScale's rule cannot size the offload; every micro-batch with a sequence of at "
        "least {} tokens offloads train.offload_fraction = {}",
        loader_->options().cost.describe(), offload_.min_tokens, offload_.max_ratio);
  }
  offload_.bandwidth = seconds ? bandwidth : 0.0;
  LOOM_LOG_INFO(
      "activation offload: up to {} of each model chunk's blocks for micro-batches with a sequence "
      "of at least {} tokens{}",
      offload_.max_ratio, offload_.min_tokens,
      offload_.bandwidth > 0
          ? fmt::format(", each share by ByteScale's rule at {} GB/s ({} B per token and layer, {} "
                        "layers)",
                        t.offload_bandwidth_gbps(), offload_.bytes_per_token_layer, offload_.layers)
          : std::string());
}

void Trainer::build_optimizer(const model::ModelSpec& spec) {
  const auto tp = groups_->tp_size() > 1 ? groups_->tp_group() : nullptr;
  const auto pp = groups_->pp_size() > 1 ? groups_->pp_group() : nullptr;
  // Weights are replicated over DP and CP: gradients are reduced (and ZeRO-1 shards the optimizer)
  // over the dp-cp group, as Megatron-Core does.
  // A stage whose layers are all dense (model.moe.first_dense_layers, moe_layer_freq) holds no
  // expert shard: its ranks (the expert groups lie within a stage) use the plain optimizer.
  const bool experts = ep_.enabled() && std::any_of(params_.begin(), params_.end(),
                                                    [](const auto& p) { return p.ep_sharded(); });
  if (experts) {  // Note: optimizers under expert parallelism
    optim::ExpertGroups experts;
    experts.dp = groups_->expert_dp_group();
    experts.ep = groups_->ep_group();
    experts.group = ep_.comm;
    optimizer_ = std::make_unique<optim::ChainedOptimizer>(&params_, config_,
                                                           groups_->dp_cp_group(), tp, pp, experts);
  } else {
    optimizer_ = optim::make_optimizer(&params_, config_, groups_->dp_cp_group(), tp, pp);
  }
  parallel::GradSyncOptions sync;  // Note: gradient synchronisation
  // Under expert parallelism the buckets' all-reduces, started from backward hooks, run on
  // communicators of their own, apart from the dispatcher's all-to-alls over the same ranks in
  // backward (Note: optimizers under expert parallelism). ZeRO-1 reduces in finish(), on the groups
  // themselves.
  // Under hybrid data parallelism likewise: ring attention's transfers run on the pool itself.
  const bool side = (experts || hdp_) && optimizer_->gradient_shards() == nullptr &&
                    config_.parallel().overlap_grad_reduce();
  sync.dp = side ? groups_->side_channel(mesh::Group::kDpCp, "grad") : groups_->dp_cp_group();
  if (experts) {
    sync.expert_dp =
        side ? groups_->side_channel(mesh::Group::kExpertDp, "grad") : groups_->expert_dp_group();
  }
  sync.tp = groups_->tp_group();
  if (pp && spec.tie_embeddings && (groups_->pp_is_first_stage() || groups_->pp_is_last_stage())) {
    sync.embedding = groups_->embedding_group();
  }
  sync.shards = optimizer_->gradient_shards();  // ZeRO-1: reduce-scattered into its shards
  sync.bucket_bytes = static_cast<int64_t>(config_.parallel().grad_bucket_mb() * (1 << 20));
  sync.overlap = config_.parallel().overlap_grad_reduce();
  grad_sync_ = std::make_unique<parallel::GradSync>(&params_, sync);
  schedule_ = std::make_unique<optim::LrSchedule>(config_.optim(), config_.train().steps());
  checkpoint::StateParts parts;  // Note: training state
  parts.params = &params_;
  for (model::MoeLayer* m : moe_layers_) {
    if (m->expert_bias.defined())
      parts.buffers.emplace_back(m->name() + ".expert_bias", m->expert_bias);
  }
  parts.optimizer = optimizer_.get();
  parts.loader = loader_.get();
  parts.world = world_;
  parts.tp = tp;
  parts.pp = pp;
  parts.dp_rank = groups_->dp_cp_group()->rank();  // one replica (dp 0, cp 0) saves
  parts.tp_rank = groups_->tp_rank();
  parts.experts = ep_;
  parts.config = &config_;
  state_ = std::make_unique<checkpoint::TrainingState>(parts);
}

void Trainer::build_executor() {
  std::vector<model::GptModel*> chunks;
  for (auto& c : chunks_) chunks.push_back(c.get());
  executor_ = std::make_unique<StepExecutor>(
      chunks, parallel::pipeline::schedule_from_config(config_.parallel(), groups_->pp_size()),
      groups_->pp_group(), grad_sync_.get(), device_);
  // The configured micro-batch count's table, checked now (errors name the fields); in DOCUMENTS
  // mode one micro-batch's (the counts vary per step).
  const auto& runner = executor_->runner(documents_ ? 1 : static_cast<int>(num_micro_));
  if (groups_->pp_size() > 1) pipeline_ = &runner;
}

void Trainer::log_setup(const model::ModelSpec& spec) {
  const auto& t = config_.train();
  LOOM_LOG_INFO("model: {}", spec.summary());
  LOOM_LOG_INFO("data: {}", source_->describe());
  LOOM_LOG_INFO("batch: {}", loader_->describe());
  LOOM_LOG_INFO(
      "parallel: tp={}{}{} pp={} dp={} ({} ranks); optimizer state {} per rank{}",
      groups_->tp_size(),
      chunks_.front()->tensor_parallel().sp() ? " with sequence parallelism" : "",
      cp_.enabled()
          ? fmt::format(" cp={} ({}{})", cp_.size(), parallel::cp_comm_type_name(cp_.type),
                        cp_.type == parallel::CpCommType::kA2AP2P
                            ? fmt::format(", all-to-all groups of {}", cp_.a2a_size())
                            : std::string())
          : std::string(),
      groups_->pp_size(),
      hdp_ ? fmt::format("{} (hybrid: one pool of {} ranks{})", groups_->dp_size(),
                         groups_->dp_cp_group()->size(),
                         groups_->cp_size() > 1 ? fmt::format(" with cp={}", groups_->cp_size())
                                                : std::string())
           : std::to_string(groups_->dp_size()),
      world_->size(), format_bytes(static_cast<double>(optimizer_->state_bytes())),
      optimizer_->gradient_shards()
          ? fmt::format(" (distributed optimizer: 1/{} of the moments{})",
                        groups_->dp_size() * groups_->cp_size(),
                        ep_.enabled()
                            ? fmt::format(", the experts' 1/{}", groups_->expert_dp_size())
                            : std::string())
          : "");
  if (ep_.enabled()) {
    LOOM_LOG_INFO(
        "experts: ep={} expert_tp={} expert_dp={}: {} of the {} experts per MoE layer on each "
        "rank, tokens exchanged by all-to-all over groups of {} ranks",
        groups_->ep_size(), groups_->expert_tp_size(), groups_->expert_dp_size(),
        spec.moe.num_experts / groups_->ep_size(), spec.moe.num_experts, ep_.size());
  }
  if (pipeline_) {
    LOOM_LOG_INFO("pipeline: {}",
                  executor_->describe(documents_ ? "varying" : std::to_string(num_micro_)));
  }
  if (chunks_.front()->padded_vocab() != spec.vocab_size) {
    LOOM_LOG_INFO(
        "vocabulary padded from {} to {} rows (a multiple of parallel.vocab_divisible_by "
        "{} x tp {}) for the vocab-parallel embedding and head",
        spec.vocab_size, chunks_.front()->padded_vocab(), config_.parallel().vocab_divisible_by(),
        groups_->tp_size());
  }
  LOOM_LOG_INFO("compute: {} ({}), {:.3g} GFLOP per token; peak {:.2f} TFLOP/s per device ({})",
                c10::toString(spec.compute_dtype),
                spec.recompute ? "full recomputation" : "no recomputation",
                spec.flops_per_token(t.seq_len()) / 1e9, peak_flops_ / 1e12,
                t.peak_tflops() > 0 ? "train.peak_tflops" : "measured by a GEMM probe");
  LOOM_LOG_INFO("BLAS: {}", blas_description());
  if (world_->rank() == 0 && blas_core_forced()) {
    LOOM_LOG_WARN(
        "OPENBLAS_CORETYPE is set: OpenBLAS uses that core's kernels, which can halve GEMM speed");
  }
}

Trainer::~Trainer() {
  // A run that ended inside the traced steps (a stop signal, an error) still leaves its trace.
  if (trace_steps_ && trace::on()) write_trace();
}

at::Tensor Trainer::full_tensor(const model::Parameter& p, const at::Tensor& local) const {
  if (p.ep_sharded()) return parallel::expert_full_tensor(p, local, ep_);
  return parallel::full_tensor(p, local, groups_->tp_group().get());
}

std::vector<at::Tensor> Trainer::full_gradients() const {
  const std::vector<at::Tensor> local = optimizer_->reduced_gradients();
  std::vector<at::Tensor> full;
  for (size_t i = 0; i < params_.size(); ++i)
    full.push_back(full_tensor(params_[i], local[i]).clone());
  return full;
}

// Note: stragglers. Collective over the world every logging.straggler_every steps.
void Trainer::check_stragglers(const StepMetrics& m) {
  const auto& l = config_.logging();
  // Compute: forward and backward less the waits on other ranks' ring transfers (a rank that
  // waits on a slow peer is not itself slow).
  straggler_sums_[0] += std::max(0.0, m.forward_s + m.backward_s - m.ring_wait_s);
  straggler_sums_[1] += m.data_s;
  straggler_sums_[2] += m.optimizer_s;
  // The rest of the step outside the waits for other ranks: host overhead, and whatever a slow
  // node does between the measured phases.
  straggler_sums_[3] += std::max(0.0, m.seconds - m.forward_s - m.backward_s - m.data_s -
                                          m.optimizer_s - m.comm_s - m.pp_wait_s);
  ++straggler_steps_;
  if (l.straggler_every() <= 0 || m.step % l.straggler_every() != 0 || world_->size() < 2) return;
  constexpr int kCols = 5;  // stage, compute, data, optimizer, other
  at::Tensor t = at::zeros({world_->size(), kCols}, at::kDouble);
  auto* row = t.data_ptr<double>() + static_cast<int64_t>(world_->rank()) * kCols;
  row[0] = groups_->pp_rank();
  for (int i = 0; i < kCols - 1; ++i)
    row[i + 1] = straggler_sums_[i] / static_cast<double>(straggler_steps_);
  comm::all_reduce_host(t, world_.get());
  straggler_sums_ = {};
  straggler_steps_ = 0;
  if (world_->rank() != 0) return;
  std::vector<RankTimes> ranks(static_cast<size_t>(world_->size()));
  const double* d = t.data_ptr<double>();
  for (int r = 0; r < world_->size(); ++r) {
    ranks[r].world_rank = r;
    ranks[r].group = static_cast<int>(d[r * kCols]);
    ranks[r].phases.assign(d + r * kCols + 1, d + (r + 1) * kCols);
  }
  for (const auto& line :
       find_stragglers(ranks, {"compute", "data", "optimizer", "other"}, l.straggler_factor())) {
    LOOM_LOG_WARN("straggler over steps {}-{}: {}", m.step - l.straggler_every() + 1, m.step, line);
  }
}

// Note: traces. A trace that cannot be written is a warning: it never ends the training.
void Trainer::write_trace() const {
  const auto& l = config_.logging();
  const fs::path dir = !l.trace_dir().empty() ? fs::path(l.trace_dir())
                       : !l.dir().empty()     ? fs::path(l.dir()) / "traces"
                                              : fs::path("traces");
  const fs::path path = dir / fmt::format("rank-{}.steps-{}-{}.json", world_->rank(),
                                          trace_steps_->first, trace_steps_->second);
  try {
    fs::create_directories(dir);
    const size_t n = trace::stop_and_write(path.string());
    if (world_->rank() == 0) {
      LOOM_LOG_INFO(
          "trace of steps {}-{}: {} slices in {} (one file per rank; open them in "
          "ui.perfetto.dev)",
          trace_steps_->first, trace_steps_->second, n, path.string());
    }
  } catch (const std::exception& e) {
    LOOM_LOG_WARN("the trace of steps {}-{} was not written to {}: {}", trace_steps_->first,
                  trace_steps_->second, path.string(), e.what());
  }
}

// [Note: timeouts] comm.long_timeout_s while starting, in the first step and around checkpoint
// writes and loads; comm.timeout_s otherwise, so that a stalled rank ends a running job quickly.
void Trainer::set_long_timeouts(bool on) const {
  const auto& c = config_.comm();
  groups_->set_timeout_s(on ? std::max(c.long_timeout_s(), c.timeout_s()) : c.timeout_s());
}

// The last stage's losses (and every stage's aux) summed over the pipeline, then over DP and CP
// (each CP rank holds its tokens' part).
void Trainer::sum_over_pp_dp(at::Tensor& sums) const {
  comm::all_reduce_host(sums, groups_->pp_group().get());
  comm::all_reduce_host(sums, groups_->dp_cp_group().get());
}

std::vector<model::Batch> Trainer::cp_local(const std::vector<model::Batch>& batches) const {
  std::vector<model::Batch> out;
  out.reserve(batches.size());
  const int64_t max_pos = chunks_.front()->spec().max_seq_len;
  for (const auto& b : batches) {
    check_positions(b, max_pos);
    out.push_back(model::cp_shard(b, cp_.size(), cp_.rank()));
  }
  return out;
}

std::vector<model::Batch> Trainer::hdp_local(const data::StepData& data) const {
  LOOM_INTERNAL_CHECK(data.plan.micro_batches.size() == data.batches.size(),
                      "HDP step: {} planned micro-batches, {} loaded",
                      data.plan.micro_batches.size(), data.batches.size());
  const auto pool = groups_->dp_cp_group();
  const int64_t max_pos = chunks_.front()->spec().max_seq_len;
  const int64_t block = chunks_.front()->spec().attention_block;
  // The step's groups, one view each (a sequence's group recurs only within its micro-batch).
  std::map<std::vector<int>, std::shared_ptr<const parallel::ContextParallel>> groups;
  std::vector<model::Batch> out;
  out.reserve(data.batches.size());
  for (size_t i = 0; i < data.batches.size(); ++i) {
    const data::MicroBatchPlan& mb = data.plan.micro_batches[i];
    const model::Batch& b = data.batches[i];
    check_positions(b, max_pos);
    if (mb.group.size() <= 1) {
      out.push_back(b);
      continue;
    }
    auto& cp = groups[mb.group];
    if (!cp) {
      auto c = std::make_shared<parallel::ContextParallel>();
      c->comm = comm::make_group_view(pool, mb.group);
      c->ring = c->comm;
      c->type = parallel::CpCommType::kP2P;
      c->block = block;
      cp = c;
    }
    LOOM_INTERNAL_CHECK(cp->rank() == mb.group_rank, "HDP group [{}]: member {} planned, {} found",
                        fmt::join(mb.group, ","), mb.group_rank, cp->rank());
    model::Batch local = model::cp_shard(b, cp->size(), cp->rank());
    local.cp_group = cp;
    out.push_back(std::move(local));
  }
  return out;
}

std::vector<model::Batch> Trainer::local_batches(const data::StepData& data) const {
  std::vector<model::Batch> out =
      hdp_ ? hdp_local(data) : (cp_.enabled() ? cp_local(data.batches) : data.batches);
  // Note: activation offload (only a training forward reads the share).
  if (offload_.max_ratio <= 0) return out;
  LOOM_INTERNAL_CHECK(data.plan.micro_batches.size() == out.size(),
                      "step: {} planned micro-batches, {} loaded", data.plan.micro_batches.size(),
                      out.size());
  for (size_t i = 0; i < out.size(); ++i) {
    out[i].offload =
        data::offload_share(data.plan.micro_batches[i], loader_->options().cost, offload_);
  }
  return out;
}

StepMetrics Trainer::train_step() {
  Stopwatch clock;
  timers_.reset();
  StepMetrics m;
  m.step = step_ + 1;
  if (trace_steps_ && m.step >= trace_steps_->first && m.step <= trace_steps_->second &&
      !trace::on()) {  // Note: traces (a resumed run starts inside the range)
    trace::start(world_->rank(),
                 fmt::format("rank {} ({})", world_->rank(), groups_->coords_string()));
  }
  const auto step_start = trace::Clock::now();
  timers_.start("data");
  // This rank's plan and micro-batches (Note: step plan); N and the micro-batch count over all DP
  // ranks come with the plan, computed without communication.
  data::PositionGuard keep(*loader_);  // a failed step leaves the data position where it was
  const data::StepData data = loader_->next(/*prefetch_next=*/m.step < config_.train().steps(),
                                            /*last=*/m.step == config_.train().steps());
  m.tokens = data.plan.loss_tokens;
  m.micro_batches = data.plan.global_micro_batches;
  const double total_tokens = static_cast<double>(m.tokens);
  const double aux_scale = 1.0 / static_cast<double>(m.micro_batches);
  timers_.stop("data");
  LOOM_CHECK(m.tokens > 0, "step {}: the global batch has no loss tokens", m.step);

  grad_sync_->zero_grad();
  model::begin_moe_step(moe_layers_, static_cast<double>(m.micro_batches),
                        total_tokens);  // Note: balance losses
  auto fault_point = [&] {              // LOOM_FAULT_INJECT fires before this rank's first backward
    if (fault_) fault_->maybe_trigger(world_->rank(), m.step);
  };
  // Forward and backward on the one executor (Note: step executor; Note: loss scaling).
  const model::OffloadCounters offload_before = model::offload_counters();
  const double ring_wait_before = ops::cp_counters().ring_wait_s;
  const StepSums sums = executor_->train(local_batches(data), total_tokens, aux_scale, fault_point);
  if (config_.train().offload_fraction() > 0 && !logged_offload_) {  // Note: activation offload
    logged_offload_ = true;
    const model::OffloadCounters after = model::offload_counters();
    LOOM_LOG_INFO(
        "activation offload in step {}: {} saved tensors ({:.2f} MiB) went to host memory and "
        "came back ({} of them ahead of their block's backward) on this rank; {} saves of "
        "parameters and shared inputs stayed",
        m.step, after.packed - offload_before.packed,
        static_cast<double>(after.packed_bytes - offload_before.packed_bytes) / (1 << 20),
        after.prefetched - offload_before.prefetched, after.kept - offload_before.kept);
  }
  m.forward_s = sums.stats.forward_s;
  m.backward_s = sums.stats.backward_s;
  m.pp_wait_s = sums.stats.recv_wait_s;
  m.ring_wait_s = ops::cp_counters().ring_wait_s - ring_wait_before;
  timers_.start("comm");
  grad_sync_->finish();  // Note: gradient synchronisation
  timers_.stop("comm");
  if (gradient_observer_) gradient_observer_();
  timers_.start("comm");
  double aux_sum = sums.aux_sum;
  // Under EP with TP each TP rank's aux is its own shard's part (Note: expert parallelism with
  // tensor parallelism); otherwise the TP ranks computed the same aux.
  if (ep_.tokens) aux_sum = comm::all_reduce_scalar(aux_sum, groups_->tp_group().get());
  at::Tensor losses = at::tensor({sums.loss_sum, aux_sum}, at::kDouble);
  sum_over_pp_dp(losses);
  timers_.stop("comm");
  m.loss = losses[0].item<double>() / total_tokens;
  m.aux_loss = losses[1].item<double>() * aux_scale;
  LOOM_CHECK_KIND(ErrorKind::kNumerics, std::isfinite(m.loss),
                  "step {}: the loss is {} ({} tokens); no update was applied, so the parameters "
                  "are those after step {}. Lower optim.lr, raise optim.warmup_steps, or check "
                  "the data",
                  m.step, show(m.loss), m.tokens, step_);

  timers_.start("optimizer");
  m.grad_norm = optimizer_->clip_grad_norm(config_.optim().clip_grad());
  LOOM_CHECK_KIND(ErrorKind::kNumerics, std::isfinite(m.grad_norm),
                  "step {}: the gradient norm is {} (loss {}); no update was applied, so the "
                  "parameters are those after step {}",
                  m.step, show(m.grad_norm), show(m.loss), step_);
  m.lr = schedule_->lr_at(step_);
  optimizer_->step(m.lr);
  // The step's expert loads over the data-parallel domain; the expert biases move.
  // The step's figures per layer (with blended data, the experts by source too: Note: expert
  // specialisation).
  const std::vector<model::MoeStepStats> moe_step = model::end_moe_step(moe_layers_);
  keep.commit();
  timers_.stop("optimizer");
  if (history_.empty()) set_long_timeouts(false);  // the first step is done
  ++step_;

  m.seconds = clock.seconds();
  if (trace::on())
    trace::slice("step", fmt::format("step {}", m.step), step_start, trace::Clock::now());
  if (trace_steps_ && m.step == trace_steps_->second) write_trace();
  m.data_s = timers_.elapsed("data");
  m.comm_s = timers_.elapsed("comm");
  m.optimizer_s = timers_.elapsed("optimizer");
  m.grad_reduce_wait_s = grad_sync_->bucket_wait_s();
  // Model FLOPs of the step's real sequences (Note: step plan: windows, or packed pieces).
  const double flops =
      chunks_.front()->spec().step_flops(total_tokens, data.plan.sequence_tokens_sq);
  add_performance(m, flops, world_->size(), peak_flops_, device_);
  if (m.mfu > 1.0 && !warned_mfu_) {
    warned_mfu_ = true;
    LOOM_LOG_WARN(
        "step {}: MFU {:.0f}% is above 100%: the peak it is measured against ({:.3g} TFLOP/s, {}) "
        "is below what this step achieved; set train.peak_tflops to the device's peak",
        m.step, 100 * m.mfu, peak_flops_ / 1e12,
        config_.train().peak_tflops() > 0 ? "train.peak_tflops" : "a GEMM probe at start-up");
  }
  add_moe_stats(m, chunks_, moe_step, groups_->pp_size() > 1 ? groups_->pp_group().get() : nullptr,
                static_cast<int64_t>(source_->source_names().size()));
  check_stragglers(m);
  history_.push_back(m);
  return m;
}

EvalMetrics Trainer::evaluate() {
  at::NoGradGuard no_grad;
  at::Tensor sums = at::zeros({2}, at::kDouble);  // [loss sum, tokens]
  for (int64_t g = 0; g < config_.train().eval_batches(); ++g) {
    const data::StepData d = loader_->load(data::Split::kValid, g * global_batch_);
    // Forward-only on the same path.
    const EvalSums part = executor_->evaluate(local_batches(d));
    sums += at::tensor({part.loss_sum, part.tokens}, at::kDouble);
  }
  sum_over_pp_dp(sums);
  EvalMetrics e;
  e.step = step_;
  e.tokens = static_cast<int64_t>(sums[1].item<double>());
  e.loss = sums[0].item<double>() / sums[1].item<double>();
  e.perplexity = std::exp(e.loss);
  sinks_->eval(e);
  return e;
}

std::string Trainer::save_checkpoint() {
  const auto& t = config_.train();
  LOOM_CHECK_CONFIG(!t.checkpoint_dir().empty(),
                    "cannot save a checkpoint: field 'train.checkpoint_dir' is empty");
  // Full, unpadded tensors under their global names whatever the layout (Note: training state).
  set_long_timeouts(true);  // rank 0 writes while the others wait
  last_checkpoint_ = state_->save(t.checkpoint_dir(), step_, {}, t.keep_checkpoints());
  set_long_timeouts(history_.empty());
  sinks_->clear();
  LOOM_LOG_INFO("saved checkpoint {} (step {})", last_checkpoint_, step_);
  return last_checkpoint_;
}

void Trainer::load_checkpoint(const std::string& dir) {
  set_long_timeouts(true);
  const checkpoint::RestoredState r = state_->load(dir);  // checked on every rank first
  set_long_timeouts(history_.empty());
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
  if (auto dir = checkpoint::resume_target(t.resume(), t.checkpoint_dir())) load_checkpoint(*dir);
  const bool saving = !t.checkpoint_dir().empty();
  // This run's lineage only from here on (Note: checkpoint lineage).
  if (saving && world_->rank() == 0) checkpoint::set_aside_newer(t.checkpoint_dir(), step_);
  std::optional<StopSignals> signals;  // Note: stop signals
  if (t.stop_on_signal()) signals.emplace();
  SummaryTracker summary(step_);
  sinks_->start(step_);
  int64_t saved = -1;
  int stop = 0;
  while (step_ < t.steps() && stop == 0) {
    const StepMetrics m = train_step();
    sinks_->step(m);
    summary.step(m);
    if (t.eval_every() > 0 && step_ % t.eval_every() == 0) summary.eval(evaluate());
    if (saving && t.save_every() > 0 && step_ % t.save_every() == 0) {
      save_checkpoint();
      saved = step_;
    }
    if (signals) {  // any rank's signal stops every rank after the same step
      stop = static_cast<int>(
          comm::all_reduce_scalar(StopSignals::received(), world_.get(), comm::ReduceOp::kMax));
    }
  }
  sinks_->finish();
  if (stop != 0) {
    LOOM_LOG_WARN("signal {} received: stopping after step {}{}", strsignal(stop), step_,
                  saving ? ", writing a checkpoint" : " (no train.checkpoint_dir: nothing saved)");
  }
  if (saving && saved != step_ && step_ > summary.first_step()) save_checkpoint();
  TrainSummary s = summary.finish(step_, last_checkpoint_);
  s.stop_signal = stop;
  return s;
}

}  // namespace loom::train
