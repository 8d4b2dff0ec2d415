// Mixture-of-Experts feed-forward: a top-k router over E SwiGLU experts (plus optional shared
// experts that every token uses), dropless or with a capacity factor, with the load-balancing and
// z losses. Single-process dispatch for now; the expert-parallel all-to-all dispatcher replaces
// `dispatch_and_compute` and keeps the same routing.
#pragma once

#include <ATen/ATen.h>

#include <memory>

#include "loom/model/layers.h"
#include "loom/model/model_spec.h"
#include "loom/model/parameter.h"

namespace loom::model {

struct Routing {
  at::Tensor logits;     // [T, E] router logits (fp32, or fp64 for fp64 inputs)
  at::Tensor aux_probs;  // [T, E] per-token distribution over all experts the aux loss uses
  at::Tensor experts;    // [T, k] int64 chosen experts
  at::Tensor gates;      // [T, k] weights of the chosen experts' outputs
};

// What one MoE layer saw in its latest recorded forward (for logging and balance metrics).
struct MoeStats {
  at::Tensor tokens_per_expert;  // [E] int64, before capacity drops
  int64_t dropped = 0;           // (token, expert) assignments dropped by the capacity
  double aux_loss = 0;           // coefficient-weighted load-balancing loss
  double z_loss = 0;             // coefficient-weighted router z-loss
};

class MoeLayer {
 public:
  // With TP (expert TP = TP, no EP yet) every expert's FFN is split like a dense SwiGLU (fc1 rows,
  // fc2 columns) and the shared experts likewise; the router is replicated. See Note: MoE under
  // tensor parallelism in moe.cpp.
  MoeLayer(const ModelSpec& spec, const ParameterFactory& f,
           const parallel::TensorParallel& tp = {}, const parallel::ContextParallel& cp = {});

  struct Output {
    at::Tensor y;    // [s, b, h]
    at::Tensor aux;  // scalar: aux_loss_coeff * balance loss + z_loss_coeff * z loss
  };
  Output forward(const at::Tensor& x, const ForwardContext& ctx);  // x [s, b, h] (SP: a shard)

  // [Note: router]
  // softmax, pre_softmax false (Megatron's default): top-k on the logits, softmax over the k.
  // softmax, pre_softmax true: softmax over all E, top-k of those, renormalised when
  // normalize_topk. sigmoid: top-k of sigmoid(logits), renormalised when normalize_topk and k > 1.
  // Gates are then multiplied by router_scaling_factor. The balance loss is
  //   aux = coeff * E / (k T^2) * sum_e (sum_t p[t, e]) * n_e
  // with p the softmax over all experts (sigmoid: scores normalised per token) and n_e the tokens
  // routed to e before any drop; z = coeff_z * mean_t logsumexp(logits_t)^2.
  Routing route(const at::Tensor& x2d) const;  // x2d [T, h]

  const MoeStats& stats() const { return stats_; }

  at::Tensor router_weight;     // [E, h]
  at::Tensor fc1_weight;        // [E, 2f, h]  per expert [gate | up] rows
  at::Tensor fc2_weight;        // [E, h, f]
  std::unique_ptr<Mlp> shared;  // num_shared_experts fused into one SwiGLU of width n * f_shared

 private:
  at::Tensor dispatch_and_compute(const at::Tensor& x2d, const Routing& r, int64_t* dropped) const;

  MoeSpec moe_;
  MoeStats stats_;
  parallel::TensorParallel tp_;
  parallel::ContextParallel cp_;
};

}  // namespace loom::model
