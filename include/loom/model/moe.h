// Mixture-of-Experts feed-forward: a top-k router over E SwiGLU experts (plus optional shared
// experts that every token uses), dropless or with a capacity factor, with the load-balancing and
// z losses. Single-process dispatch for now; the expert-parallel all-to-all dispatcher replaces
// `dispatch_and_compute` and keeps the same routing.
#pragma once

#include <ATen/ATen.h>

#include <memory>
#include <string>
#include <vector>

#include "loom/model/layers.h"
#include "loom/model/model_spec.h"
#include "loom/model/parameter.h"
#include "loom/parallel/expert_parallel.h"

namespace loom::model {

struct Routing {
  at::Tensor logits;     // [T, E] router logits (fp32, or fp64 for fp64 inputs)
  at::Tensor aux_probs;  // [T, E] per-token distribution over all experts the aux loss uses
  at::Tensor experts;    // [T, k] int64 chosen experts
  at::Tensor gates;      // [T, k] weights of the chosen experts' outputs
};

// What one MoE layer saw in its latest recorded forward (for logging and balance metrics).
struct MoeStats {
  // [E] int64, before capacity drops: the micro-batch's (summed over CP; GLOBAL_BATCH in training:
  // the slot's, summed over the whole data-parallel domain).
  at::Tensor tokens_per_expert;
  int64_t dropped = 0;  // (token, expert) assignments dropped by the capacity
  double aux_loss = 0;  // coefficient-weighted load-balancing loss
  double z_loss = 0;    // coefficient-weighted router z-loss
};

// One MoE layer over a whole training step (end_moe_step): every micro-batch of every rank of the
// data-parallel domain, so the figures are the global batch's, as the single process computes them.
struct MoeStepStats {
  at::Tensor loads;    // [E] fp64: real tokens routed to each expert, before drops
  at::Tensor sources;  // [sources, E] fp64 by data source (Note: expert specialisation); undefined
                       // with fewer than 2 sources
  double dropped_fraction = 0;  // (token, expert) assignments dropped by capacity / all of them
  // Coefficient-weighted balance and z losses, summed over the step's micro-batches over the step's
  // micro-batch count (begin_step's; the sum when it was not given): the layer's part of the
  // trainer's aux loss.
  double balance_loss = 0;
  double z_loss = 0;
};

// The data-parallel domain a layer balances over (GLOBAL_BATCH counts, the expert bias's loads):
// the dp x cp ranks of its pipeline stage. `slots`: the micro-batches that make one step's slot,
// one per DP rank (the CP ranks of a DP rank share a micro-batch).
struct MoeDomain {
  comm::CommunicatorPtr comm;  // null: this rank alone
  int64_t slots = 1;
};

class MoeLayer {
 public:
  // With TP (expert TP = TP, no EP yet) every expert's FFN is split like a dense SwiGLU (fc1 rows,
  // fc2 columns) and the shared experts likewise; the router is replicated. See Note: MoE under
  // tensor parallelism in moe.cpp.
  // With expert parallelism (Note: expert parallelism) this rank holds experts
  // [ep_rank E / ep, (ep_rank + 1) E / ep), each with its expert_tp slice; tokens are dispatched
  // over ep.comm. Expert parallelism runs with tp = 1 for now.
  MoeLayer(const ModelSpec& spec, const ParameterFactory& f,
           const parallel::TensorParallel& tp = {}, const parallel::ContextParallel& cp = {},
           const parallel::ExpertParallel& ep = {});

  struct Output {
    at::Tensor y;        // [s, b, h]
    at::Tensor aux;      // scalar: aux_loss_coeff * balance loss + z_loss_coeff * z loss
    at::Tensor balance;  // GLOBAL_BATCH in training: [E + 1] the f_i and the rank's P scale used
  };
  Output forward(const at::Tensor& x, const ForwardContext& ctx);  // x [s, b, h] (SP: a shard)

  // [Note: router]
  // softmax, pre_softmax false (Megatron's default): top-k on the logits, softmax over the k.
  // softmax, pre_softmax true: softmax over all E, top-k of those, renormalised when
  // normalize_topk. sigmoid: top-k of sigmoid(logits), renormalised when normalize_topk and k > 1.
  // Gates are then multiplied by router_scaling_factor. Selection (not the gates) adds the expert
  // bias to the scores top-k looks at, and with num_groups > 1 first keeps the topk_groups groups
  // whose best top_k / topk_groups scores sum highest (DeepSeek-V3). The balance loss is
  //   aux = coeff * E / (k T^2) * sum_e (sum_t p[t, e]) * n_e
  // with p the softmax over all experts (sigmoid: scores normalised per token) and n_e the tokens
  // routed to e before any drop, over the tokens model.moe.aux_loss_type says (Note: balance
  // losses in moe.cpp); z = coeff_z * mean_t logsumexp(logits_t)^2.
  Routing route(const at::Tensor& x2d) const;  // x2d [T, h]

  const MoeStats& stats() const { return stats_; }

  void set_domain(MoeDomain domain) { domain_ = std::move(domain); }
  const MoeDomain& domain() const { return domain_; }
  // Training steps ([Note: balance losses]): begin_step clears the step's buffers (GLOBAL_BATCH
  // counts, the loads); step_loads is [E] fp64, the real tokens routed to each expert by this
  // rank's training forwards of the step (before drops; on the device, undefined before the first);
  // end_step takes those loads summed over the domain and moves the expert bias (if any).
  // `micro_batches` (M_all) and `tokens` (N): the step's, over every DP rank (0: unknown).
  void begin_step(double micro_batches = 0, double tokens = 0);
  const at::Tensor& step_loads() const { return step_loads_; }
  // This rank's step sums so far: {dropped assignments, assignments, balance loss, z loss}.
  std::vector<double> step_sums() const {
    return {step_dropped_, step_assignments_, step_balance_, step_z_};
  }
  double step_micro_batches() const { return step_micro_batches_; }
  void end_step(const at::Tensor& domain_loads);
  // Expert specialisation (Note: expert specialisation in moe.cpp): with `sources` > 1 blended
  // data sources, training forwards also count, per source, the real (token, expert) assignments
  // before drops from Batch::source; step_sources is [sources, E] fp64 (undefined before the
  // step's first forward, or with fewer than 2 sources).
  void set_sources(int64_t sources) { sources_ = sources; }
  int64_t sources() const { return sources_; }
  const at::Tensor& step_sources() const { return step_sources_; }
  const MoeSpec& spec() const { return moe_; }
  const std::string& name() const { return name_; }  // "layers.3.moe"

  at::Tensor router_weight;     // [E, h]
  at::Tensor fc1_weight;        // [E, 2f, h]  per expert [gate | up] rows
  at::Tensor fc2_weight;        // [E, h, f]
  std::unique_ptr<Mlp> shared;  // num_shared_experts fused into one SwiGLU of width n * f_shared
  // Aux-loss-free balancing: [E] fp32 on the parameters' device, added to the selection scores;
  // not trained by gradients (end_step), checkpointed as "<name>.expert_bias". Undefined when
  // model.moe.bias_update_rate is 0.
  at::Tensor expert_bias;

 private:
  // The kept (token, expert) assignments sorted by expert (capacity applied to this rank's T).
  struct Assignments {
    at::Tensor order;             // [A] indices into the flat [T * k] assignments
    at::Tensor token_of;          // [A] their tokens
    std::vector<int64_t> counts;  // [E] kept assignments per expert
    int64_t dropped = 0;
  };
  Assignments assign(const Routing& r, int64_t t) const;
  comm::Communicator* stats_comm(const ForwardContext& ctx) const;
  at::Tensor expert(int64_t i, const at::Tensor& x, const at::Tensor& w1,
                    const at::Tensor& w2) const;
  at::Tensor dispatch_and_compute(const at::Tensor& x2d, const Routing& r, int64_t* dropped) const;
  at::Tensor dispatch_expert_parallel(const at::Tensor& x2d, const Routing& r,
                                      const Assignments& a) const;
  at::Tensor select_experts(const at::Tensor& scores) const;
  // The balance loss of this micro-batch (Note: balance losses); `real` [T] or undefined, `counts`
  // [E] this rank's real assignments. Sets *micro_counts to the counts the stats report and, when
  // it summed them over CP, *micro_tokens to the micro-batch's real tokens (else leaves it).
  at::Tensor balance_loss(const Routing& r, const at::Tensor& real, const at::Tensor& counts,
                          const ForwardContext& ctx, int64_t t, int64_t b, at::Tensor* balance,
                          at::Tensor* micro_counts, double* micro_tokens);

  MoeSpec moe_;
  MoeStats stats_;
  parallel::TensorParallel tp_;
  parallel::ContextParallel cp_;
  parallel::ExpertParallel ep_;
  MoeDomain domain_;
  // EP under TP (SP): this rank routes its own sequence shard, not the gathered micro-batch.
  bool local_routing_ = false;
  // The ranks whose tokens make up one micro-batch with this rank's (CP, or tp x cp under
  // local routing): the balance statistics are summed over them. Null: this rank alone.
  comm::CommunicatorPtr stats_comm_;
  std::string name_;
  at::Tensor global_counts_;  // [E] fp64: GLOBAL_BATCH counts of the step's micro-batches so far
  double global_tokens_ = 0;  // and their real tokens, both summed over the domain
  double step_micro_batches_ = 0, step_tokens_ = 0;  // begin_step's
  at::Tensor step_loads_;                            // [E] fp64
  int64_t sources_ = 0;
  at::Tensor step_sources_;  // [sources, E] fp64
  // This rank's parts of the step's figures (before any sum over CP or TP ranks).
  double step_dropped_ = 0, step_assignments_ = 0, step_balance_ = 0, step_z_ = 0;
};

// Step boundaries for every MoE layer of a rank (all its chunks; they share one domain).
// begin_moe_step before the step's first forward. end_moe_step after the optimizer step: the step's
// loads of all layers are summed over the domain in one all-reduce and each layer's expert bias
// moves; returns each layer's figures over the domain (MoeStepStats), all from one all-reduce of
// the layers' loads, source tables and sums.
void begin_moe_step(const std::vector<MoeLayer*>& layers, double micro_batches = 0,
                    double tokens = 0);
std::vector<MoeStepStats> end_moe_step(const std::vector<MoeLayer*>& layers);

}  // namespace loom::model
