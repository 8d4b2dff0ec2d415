#include "loom/train/memory_estimate.h"

#include <fmt/format.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <functional>
#include <string>

#include "device_memory.h"
#include "loom/core/error.h"
#include "loom/core/logging.h"
#include "loom/model/gpt.h"
#include "loom/model/offload.h"
#include "loom/train/system.h"

namespace loom::train {
namespace {

double element_bytes(at::ScalarType t) { return static_cast<double>(c10::elementSize(t)); }

// A number from a /proc or /sys file ("max" and unreadable files: < 0).
double read_number(const std::string& path) {
  std::ifstream in(path);
  std::string word;
  if (!(in >> word) || word == "max") return -1;
  try {
    return std::stod(word);
  } catch (const std::exception&) {
    return -1;
  }
}

double mem_available_bytes() {
  std::ifstream in("/proc/meminfo");
  std::string key, unit;
  double value = 0;
  while (in >> key >> value >> unit) {
    if (key == "MemAvailable:") return value * 1024.0;
  }
  return -1;
}

// A "key value" line of a cgroup memory.stat file (< 0 when absent).
double stat_value(const std::string& path, const std::string& key) {
  std::ifstream in(path);
  std::string k;
  double v = 0;
  while (in >> k >> v) {
    if (k == key) return v;
  }
  return -1;
}

// What the cgroup (v2, else v1) still allows this container, < 0 without a limit. The usage counts
// the page cache, which the kernel reclaims under the limit: its inactive file pages are left out
// (the working set, as Kubernetes computes it), or a container that has just read its dataset
// would look full.
double cgroup_headroom_bytes() {
  double limit = read_number("/sys/fs/cgroup/memory.max");
  double used = read_number("/sys/fs/cgroup/memory.current");
  double reclaimable = stat_value("/sys/fs/cgroup/memory.stat", "inactive_file");
  if (limit < 0) {
    limit = read_number("/sys/fs/cgroup/memory/memory.limit_in_bytes");
    used = read_number("/sys/fs/cgroup/memory/memory.usage_in_bytes");
    reclaimable = stat_value("/sys/fs/cgroup/memory/memory.stat", "total_inactive_file");
    if (limit > 1e18) limit = -1;  // v1's "no limit" is a huge number
  }
  if (limit < 0) return -1;
  const double working_set = std::max(0.0, used - std::max(reclaimable, 0.0));
  return std::max(0.0, limit - working_set);
}

}  // namespace

std::string MemoryEstimate::describe() const {
  return fmt::format("parameters {}, gradients {}, optimizer {}, activations ~{}, logits ~{}",
                     format_bytes(parameters), format_bytes(gradients), format_bytes(optimizer),
                     format_bytes(activations), format_bytes(logits));
}

MemoryEstimate estimate_memory(const model::ModelSpec& spec, const config::JobConfig& job,
                               const mesh::ParallelDims& dims) {
  const auto& par = job.parallel();
  const auto& t = job.train();
  const double tp = dims.tp, pp = dims.pp, dp = dims.dp, cp = dims.cp;
  const double L = static_cast<double>(std::max<int64_t>(spec.num_layers, 1));
  // The layers each rank holds: the pipeline's own split (Note: pipeline schedule tables), with
  // parallel.pp_first/last_stage_layers and the virtual stages of an interleaved schedule.
  const int vp = dims.pp > 1 ? std::max(1, par.virtual_pp()) : 1;
  const auto stages = model::partition_stages(spec.num_layers, dims.pp, vp,
                                              dims.pp > 1 ? par.pp_first_stage_layers() : -1,
                                              dims.pp > 1 ? par.pp_last_stage_layers() : -1);
  std::vector<double> rank_layers(static_cast<size_t>(dims.pp), 0.0);
  for (size_t s = 0; s < stages.size(); ++s) {
    const double n = stages[s].num_layers >= 0 ? static_cast<double>(stages[s].num_layers)
                                               : L - static_cast<double>(stages[s].first_layer);
    rank_layers[s % static_cast<size_t>(dims.pp)] += n;
  }

  // Parameters of the fullest rank: its layers' share over tp, plus on the first rank the
  // embedding (and learned positions), on the last the head (a tied head is a copy there when
  // pp > 1) and the final norm.
  const auto split = spec.parameter_split();
  // The routed experts spread over ep x expert_tp ranks, the rest of a layer over tp.
  const double expert_per_layer =
      split.experts / L / (dims.ep > 1 ? dims.ep * static_cast<double>(dims.expert_tp) : tp);
  const double per_layer = (split.layers - split.experts) / L / tp + expert_per_layer;
  const double vocab_rows =
      static_cast<double>(spec.padded_vocab(dims.tp, par.vocab_divisible_by()));
  const double table = vocab_rows * static_cast<double>(spec.hidden) / tp;
  const double positions =
      spec.rope ? 0.0 : static_cast<double>(spec.max_seq_len) * static_cast<double>(spec.hidden);
  const double head = spec.tie_embeddings ? (dims.pp > 1 ? table : 0.0) : table;
  double params = 0, stage_layers = 0, expert_params = 0;
  for (int r = 0; r < dims.pp; ++r) {
    double n = rank_layers[static_cast<size_t>(r)] * per_layer;
    if (r == 0) n += table + positions;
    if (r == dims.pp - 1) n += head + split.final_norm;
    if (n > params) expert_params = rank_layers[static_cast<size_t>(r)] * expert_per_layer;
    params = std::max(params, n);
    stage_layers = std::max(stage_layers, rank_layers[static_cast<size_t>(r)]);
  }
  const double master = element_bytes(spec.param_dtype);
  const bool sgd = job.optim().optimizer() == config::OptimConfig::SGD;  // no state

  MemoryEstimate m;
  m.parameters = params * master;
  m.gradients = params * master;
  // ZeRO-1 shards the moments over dp x cp, the expert shards' over expert_dp (Note: optimizers
  // under expert parallelism; without expert parallelism the experts are dense parameters).
  const bool zero = par.distributed_optimizer();
  const double moments =
      dims.ep > 1 ? (params - expert_params) / (zero ? dp * cp : 1.0) +
                        expert_params / (zero ? static_cast<double>(dims.expert_dp()) : 1.0)
                  : params / (zero ? dp * cp : 1.0);
  m.optimizer = sgd ? 0.0 : 2.0 * moments * master;

  // Activations kept for backward, per token and layer.
  const bool documents = job.data().mode() == config::DataConfig::DOCUMENTS;
  const double seq = static_cast<double>(t.seq_len());
  const double tokens =
      documents
          ? static_cast<double>(t.micro_batch_tokens() > 0 ? t.micro_batch_tokens() : t.seq_len())
          : static_cast<double>(t.micro_batch_size()) * seq;
  // Context parallelism splits every sequence; under hybrid data parallelism a rank holds at most
  // the capacity (train.micro_batch_tokens) whether packed or a group's share, whatever cp is.
  const bool hdp = par.hdp();
  const double local_tokens = hdp ? tokens : tokens / cp;
  // The longest attention a rank computes whole (HDP: a packed piece of at most the capacity).
  const double attn_seq = hdp ? std::min(tokens, seq) : seq;
  const double h = static_cast<double>(spec.hidden);
  const double heads = static_cast<double>(spec.num_heads);
  const double qkv = (heads + 2.0 * spec.num_kv_heads) * spec.head_dim;
  const double sp = par.sequence_parallel() ? tp : 1.0;
  double ffn_elems = 0;
  if (spec.is_moe()) {
    ffn_elems = spec.moe.top_k * (h + 3.0 * spec.moe.expert_ffn) +
                3.0 * spec.moe.shared_ffn * spec.moe.num_shared_experts + spec.moe.num_experts;
  } else {
    ffn_elems = (spec.swiglu ? 3.0 : 2.0) * spec.ffn;
  }
  const double compute =
      element_bytes(spec.compute_dtype == at::kBFloat16 ? at::kBFloat16 : spec.param_dtype);
  // Full attention keeps fp32 scores and probabilities, [s, s] per head; blockwise attention
  // (context parallelism, long sequences, model.attention_block_size > 0) keeps its fp32 output
  // and log-sum-exp, head_dim + 1 floats per head and token (its tiles are transient).
  const int64_t block = job.model().attention_block_size();
  const bool blockwise = block > 0 || (block == 0 && ((!hdp && cp > 1) || attn_seq >= 1024));
  const double score_bytes = blockwise
                                 ? heads / tp * 4.0 * (1.0 + static_cast<double>(spec.head_dim))
                                 : 2.0 * heads * attn_seq / tp * 4.0;
  const double layer_full =
      ((5.0 * h / sp) + (qkv + heads * spec.head_dim + ffn_elems) / tp) * compute + score_bytes;
  const double layer_input = h / sp * compute;
  const bool recompute = job.model().recompute() != config::ModelConfig::NO_RECOMPUTE;
  // Activation offload moves the first blocks' saved tensors of each chunk to host
  // (model::offloaded_layers). It frees device memory only off the CPU (there the "host" copy is
  // the same memory), and surely for the busiest micro-batch only when every micro-batch offloads
  // train.offload_fraction (no offload_min_tokens, no bandwidth rule). In backward the block being
  // differentiated and the one loaded ahead are back: up to two offloaded layers of one
  // micro-batch.
  const double saved_per_layer = recompute ? layer_input : layer_full;
  double offloaded = 0;
  if (t.device() != "cpu" && t.offload_min_tokens() == 0 && t.offload_bandwidth_gbps() == 0) {
    const auto per_chunk = static_cast<int64_t>(std::llround(stage_layers / vp));
    offloaded = static_cast<double>(
        vp * model::offloaded_layers(std::clamp(t.offload_fraction(), 0.0, 1.0), per_chunk));
  }
  const double kept_layers = stage_layers - offloaded;
  const double per_token =
      recompute ? kept_layers * layer_input + layer_full : kept_layers * layer_full;
  m.layer_bytes_per_token = saved_per_layer;
  // Micro-batches a stage holds at once: 1 without a pipeline; the first stage of 1F1B holds pp;
  // interleaving (v chunks) adds (pp - 1) / v.
  double in_flight = 1;
  if (dims.pp > 1) {
    const double v = vp;
    in_flight = pp + (v > 1 ? (pp - 1) / v : 0.0);
    const double micro =
        documents ? in_flight
                  : static_cast<double>(t.global_batch_size()) /
                        std::max(1.0, t.micro_batch_size() * dp);  // CP ranks share micro-batches
    in_flight = std::min(in_flight, std::max(1.0, micro));         // no more than the step has
  }
  m.activations =
      local_tokens * (per_token * in_flight + std::min(offloaded, 2.0) * saved_per_layer);
  // The head's fp32 logits, their log-softmax and gradient, one micro-batch at a time.
  m.logits = local_tokens * vocab_rows / tp * 4.0 * 3.0;
  return m;
}

int ranks_on_this_node(comm::Communicator* world) {
  if (world == nullptr || world->size() == 1) return 1;
  char host[256] = {0};
  ::gethostname(host, sizeof(host) - 1);
  // A 63-bit hash of the host name per rank, gathered by a sum of one-hot rows.
  const int64_t mine =
      static_cast<int64_t>(std::hash<std::string>{}(std::string(host)) & 0x7fffffffffffffffull);
  at::Tensor names = at::zeros({world->size()}, at::kLong);
  names.data_ptr<int64_t>()[world->rank()] = mine;
  comm::all_reduce_host(names, world);
  return static_cast<int>((names == mine).sum().item<int64_t>());
}

double available_memory(at::Device device, int local_ranks) {
  if (device.is_cuda()) return detail::cuda_free_memory(device.index() < 0 ? 0 : device.index());
  double avail = mem_available_bytes();
  const double cgroup = cgroup_headroom_bytes();
  if (cgroup >= 0) avail = avail < 0 ? cgroup : std::min(avail, cgroup);
  if (avail < 0) return -1;
  return avail / std::max(1, local_ranks);
}

void check_memory(const MemoryEstimate& need, double available, at::Device device,
                  int local_ranks) {
  const std::string where =
      device.is_cuda()
          ? fmt::format("free on {}", device.str())
          : fmt::format("the host's available memory{}",
                        local_ranks > 1 ? fmt::format(" / {} ranks on the node", local_ranks)
                                        : std::string());
  if (available < 0) {
    LOOM_LOG_INFO("memory: about {} per rank ({}); available memory unknown",
                  format_bytes(need.total()), need.describe());
    return;
  }
  LOOM_CHECK_CONFIG(
      need.state() <= available,
      "the model does not fit: each rank needs {} for its parameters, gradients and optimizer "
      "state alone ({}), but has {} ({}). Spread the model over more ranks (parallel.tp, "
      "parallel.pp), shard the optimizer state (parallel.distributed_optimizer: true with dp x cp "
      "> 1), "
      "or make it smaller (model.hidden_size, model.num_layers, model.vocab_size)",
      format_bytes(need.state()), need.describe(), format_bytes(available), where);
  if (need.total() > available) {
    LOOM_LOG_WARN(
        "memory: this job may not fit: about {} per rank ({}) against {} ({}); consider "
        "model.recompute: FULL, a smaller train.micro_batch_size, or more parallel.tp/pp",
        format_bytes(need.total()), need.describe(), format_bytes(available), where);
  } else {
    LOOM_LOG_INFO("memory: about {} per rank ({}) of {} ({})", format_bytes(need.total()),
                  need.describe(), format_bytes(available), where);
  }
}

}  // namespace loom::train
