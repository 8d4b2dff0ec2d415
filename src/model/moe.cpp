#include "loom/model/moe.h"

#include <cmath>
#include <vector>

#include "loom/core/error.h"
#include "loom/ops/functional.h"
#include "loom/parallel/weight_grad_store.h"

namespace loom::model {

// [Note: MoE under tensor parallelism]
// The layer opens one TP region around everything: the input is all-gathered (SP) or copied, every
// rank routes the same, whole set of tokens with the replicated router (so routing, capacity drops
// and statistics equal the single-process layer's), computes its column/row slice of each chosen
// expert and of the shared experts, and the partial outputs leave the region summed (all-reduce or
// sequence reduce-scatter). The gates multiply partial outputs, so the router's gradient is a
// partial sum on each rank (TpShard::partial_grad, all-reduced by the trainer). The auxiliary
// losses are computed identically on every TP rank; their gradient is scaled by 1/tp so that, once
// the input gradient is all-reduced by the region, it counts once.
MoeLayer::MoeLayer(const ModelSpec& spec, const ParameterFactory& f,
                   const parallel::TensorParallel& tp, const parallel::ContextParallel& cp)
    : moe_(spec.moe), tp_(tp), cp_(cp) {
  const int64_t e = moe_.num_experts, ffn = moe_.expert_ffn, h = spec.hidden;
  LOOM_CHECK_CONFIG(
      ffn % tp.size() == 0,
      "the expert FFN width (model.moe.expert_ffn_hidden_size = {}) is not divisible by the "
      "tensor-parallel size parallel.tp = {}",
      ffn, tp.size());
  TpShard router;
  router.partial_grad = tp.enabled();
  TpShard fc1, fc2;
  fc1.dim = 1;
  fc1.blocks = 2;  // [gate | up] rows of each expert
  fc2.dim = 2;
  router_weight = f.make("router.weight", {e, h}, Init::kNormal, moe_.router_init_std, -1, router);
  fc1_weight = f.make("experts.fc1.weight", {e, 2 * ffn, h}, Init::kNormal, spec.init_std, -1, fc1);
  fc2_weight =
      f.make("experts.fc2.weight", {e, h, ffn}, Init::kNormal, spec.output_init_std, -1, fc2);
  if (moe_.num_shared_experts > 0) {
    ModelSpec dense = spec;
    dense.bias = false;
    dense.swiglu = true;
    shared = std::make_unique<Mlp>(dense, f.child("shared"),
                                   moe_.num_shared_experts * moe_.shared_ffn, tp);
  }
}

Routing MoeLayer::route(const at::Tensor& x2d) const {
  const auto dt = x2d.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  Routing r;
  r.logits = at::linear(x2d.to(dt), router_weight.to(dt));  // [T, E]
  const int64_t k = moe_.top_k;
  if (moe_.score == ScoreFunction::kSoftmax) {
    r.aux_probs = at::softmax(r.logits, -1);
    if (moe_.pre_softmax) {
      auto top = at::topk(r.aux_probs, k, -1);
      r.gates = std::get<0>(top);
      r.experts = std::get<1>(top);
      if (moe_.normalize_topk && k > 1) r.gates = r.gates / r.gates.sum(-1, true);
    } else {
      auto top = at::topk(r.logits, k, -1);
      r.gates = at::softmax(std::get<0>(top), -1);
      r.experts = std::get<1>(top);
    }
  } else {
    at::Tensor scores = at::sigmoid(r.logits);
    r.aux_probs = scores / scores.sum(-1, true);
    auto top = at::topk(scores, k, -1);
    r.gates = std::get<0>(top);
    r.experts = std::get<1>(top);
    if (moe_.normalize_topk && k > 1) r.gates = r.gates / r.gates.sum(-1, true);
  }
  if (moe_.scaling_factor != 1.0) r.gates = r.gates * moe_.scaling_factor;
  return r;
}

at::Tensor MoeLayer::dispatch_and_compute(const at::Tensor& x2d, const Routing& r,
                                          int64_t* dropped) const {
  const int64_t t = x2d.size(0), k = moe_.top_k, e = moe_.num_experts;
  const auto dt = x2d.scalar_type();
  // Sort the T*k (token, expert) assignments by expert, keeping token order inside an expert.
  at::Tensor flat = r.experts.reshape({-1});
  at::Tensor order = std::get<1>(at::sort(flat, /*stable=*/true, 0, /*descending=*/false));
  at::Tensor counts_t = at::bincount(flat, {}, e).cpu();
  std::vector<int64_t> counts(counts_t.data_ptr<int64_t>(), counts_t.data_ptr<int64_t>() + e);

  *dropped = 0;
  if (moe_.capacity_factor > 0) {
    const auto capacity = static_cast<int64_t>(
        std::ceil(static_cast<double>(t * k) / static_cast<double>(e) * moe_.capacity_factor));
    at::Tensor gates_sorted =
        r.gates.reshape({-1}).index_select(0, order).detach().to(at::kDouble).cpu();
    std::vector<at::Tensor> keep;
    int64_t off = 0;
    for (int64_t i = 0; i < e; ++i) {
      const int64_t n = counts[i];
      at::Tensor seg = at::arange(off, off + n, at::kLong);
      if (n > capacity) {
        *dropped += n - capacity;
        if (moe_.drop_policy == DropPolicy::kByPosition) {
          seg = seg.narrow(0, 0, capacity);
        } else {
          at::Tensor top = std::get<1>(at::topk(gates_sorted.narrow(0, off, n), capacity));
          seg = std::get<0>(at::sort(top)) + off;
        }
        counts[i] = capacity;
      }
      keep.push_back(seg);
      off += n;
    }
    order = order.index_select(0, at::cat(keep).to(order.device()));
  }

  at::Tensor token_of = at::div(order, k, "floor");  // [A] source token per assignment
  at::Tensor gate_of = r.gates.reshape({-1}).index_select(0, order).to(dt);  // [A]
  at::Tensor xs = x2d.index_select(0, token_of);                             // [A, h]
  at::Tensor w1 = fc1_weight.to(dt), w2 = fc2_weight.to(dt);
  std::vector<at::Tensor> outs;
  int64_t off = 0;
  for (int64_t i = 0; i < e; ++i) {
    if (counts[i] == 0) continue;  // an idle expert: no compute, no gradient
    at::Tensor xe = xs.narrow(0, off, counts[i]);
    outs.push_back(parallel::linear(ops::swiglu(parallel::linear(xe, w1[i])), w2[i]));
    off += counts[i];
  }
  at::Tensor y = at::zeros_like(x2d);
  if (outs.empty()) return y;
  at::Tensor ys = at::cat(outs) * gate_of.unsqueeze(1);
  return y.index_add(0, token_of, ys);
}

MoeLayer::Output MoeLayer::forward(const at::Tensor& input, const ForwardContext& ctx) {
  const at::Tensor x = parallel::enter_tp_region(input, tp_);  // every token of the micro-batch
  const int64_t s = x.size(0), b = x.size(1), h = x.size(2);
  const int64_t t = s * b;
  at::Tensor x2d = x.reshape({t, h});
  Routing r = route(x2d);
  int64_t dropped = 0;
  at::Tensor y = dispatch_and_compute(x2d, r, &dropped);
  if (shared) y = y + (tp_.enabled() ? shared->partial(x2d) : shared->forward(x2d));
  if (tp_.enabled()) y = parallel::leave_tp_region(y.view({s, b, h}), tp_);

  // Padding positions (Batch::padding) are routed but count in no statistic: the balance and z
  // losses and the expert counts are those of the real tokens, whatever a row was padded to.
  at::Tensor real;  // [T] 1 = a real token, in [s, b] order; undefined = all
  if (ctx.padding.defined()) {
    real = ctx.padding.logical_not().t().reshape({t}).to(r.logits.scalar_type());
  }
  at::Tensor counts = real.defined()
                          ? at::bincount(r.experts.reshape({-1}),
                                         real.repeat_interleave(moe_.top_k), moe_.num_experts)
                          : at::bincount(r.experts.reshape({-1}), {}, moe_.num_experts);  // [E]
  // [Note: MoE under context parallelism] A CP rank routes its share of the micro-batch's tokens.
  // The balance loss of the whole micro-batch, sum_e P_e c_e x E / (k T^2), is a sum over tokens
  // of P_e given the micro-batch's counts c_e: each CP rank adds its tokens' P_e against the
  // counts summed over CP (constants), with T the micro-batch's tokens, and the gradient sum over
  // dp-cp adds the parts. Likewise the z-loss's mean over T. (Capacity drops apply per CP rank.)
  double tokens = real.defined() ? real.sum().item<double>() : static_cast<double>(t);
  if (cp_.enabled()) {
    // One message: the counts and the real tokens of the micro-batch.
    at::Tensor sums = at::cat(
        {counts.to(at::kDouble), at::full({1}, tokens, counts.options().dtype(at::kDouble))});
    cp_.comm->all_reduce(sums);
    counts = sums.narrow(0, 0, moe_.num_experts);
    tokens = sums[moe_.num_experts].item<double>();
  }
  tokens = std::max(tokens, 1.0);
  at::Tensor aux = at::zeros({}, r.logits.options());
  double aux_value = 0, z_value = 0;
  if (moe_.aux_loss_coeff > 0) {
    const double scale = moe_.aux_loss_coeff * static_cast<double>(moe_.num_experts) /
                         (static_cast<double>(moe_.top_k) * tokens * tokens);
    const at::Tensor probs = real.defined() ? r.aux_probs * real.unsqueeze(1) : r.aux_probs;
    at::Tensor balance = (probs.sum(0) * counts.to(r.aux_probs.scalar_type())).sum() * scale;
    aux = aux + balance;
    if (ctx.record_stats) aux_value = balance.item<double>();
  }
  if (moe_.z_loss_coeff > 0) {
    at::Tensor z2 = at::logsumexp(r.logits, -1).pow(2);
    if (real.defined()) z2 = z2 * real;
    at::Tensor z = z2.sum() * (moe_.z_loss_coeff / tokens);
    aux = aux + z;
    if (ctx.record_stats) z_value = z.item<double>();
  }
  if (tp_.enabled()) aux = parallel::scale_gradient(aux, 1.0 / tp_.size());
  if (ctx.record_stats) {
    if (real.defined() && !cp_.enabled()) counts = counts.round().to(at::kLong);
    if (cp_.enabled()) {  // the micro-batch's figures, as the single process logs them
      at::Tensor sums = at::tensor({aux_value, z_value, static_cast<double>(dropped)}, at::kDouble);
      comm::all_reduce_host(sums, cp_.comm.get());  // to the communicator's device and back
      aux_value = sums[0].item<double>();
      z_value = sums[1].item<double>();
      dropped = static_cast<int64_t>(sums[2].item<double>() + 0.5);
      counts = counts.round().to(at::kLong);
    }
    stats_.tokens_per_expert = counts.cpu();
    stats_.dropped = dropped;
    stats_.aux_loss = aux_value;
    stats_.z_loss = z_value;
  }
  return {tp_.enabled() ? y : y.view({s, b, h}), aux};
}

}  // namespace loom::model
