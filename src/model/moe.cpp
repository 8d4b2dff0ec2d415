#include "loom/model/moe.h"

#include <cmath>
#include <limits>
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
// the input gradient is all-reduced by the region, it counts once. Under expert parallelism the
// routed experts leave this region instead: see [Note: expert parallelism with tensor
// parallelism].
MoeLayer::MoeLayer(const ModelSpec& spec, const ParameterFactory& f,
                   const parallel::TensorParallel& tp, const parallel::ContextParallel& cp,
                   const parallel::ExpertParallel& ep)
    : moe_(spec.moe), tp_(tp), cp_(cp), ep_(ep) {
  const int64_t e = moe_.num_experts, ffn = moe_.expert_ffn, h = spec.hidden;
  LOOM_CHECK_CONFIG(e % ep.ep == 0,
                    "model.moe.num_experts = {} experts do not split over parallel.ep = {} ranks "
                    "({} % {} = {})",
                    e, ep.ep, e, ep.ep, e % ep.ep);
  // [Note: expert parallelism with tensor parallelism] Under EP with TP, each TP rank routes and
  // dispatches its own sequence shard (sequence parallelism's), as a CP rank routes its piece:
  // the expert group spans the TP ranks, so the shards of one micro-batch are distinct tokens. The
  // balance statistics of the micro-batch are summed over tp x cp (ExpertParallel::tokens), the
  // aux losses need no 1/tp scale, and the router's gradient is a partial sum over TP as before.
  // The shared experts stay tensor-parallel over the gathered micro-batch. Capacity drops apply per
  // shard, as under CP.
  local_routing_ = ep.enabled() && tp.enabled();
  LOOM_CHECK_CONFIG(!local_routing_ || tp.sp(),
                    "expert parallelism with parallel.tp = {} needs parallel.sequence_parallel: "
                    "true (each TP rank dispatches its own sequence shard)",
                    tp.size());
  LOOM_INTERNAL_CHECK(!local_routing_ || ep.tokens != nullptr,
                      "expert parallelism under TP without the tp x cp token group");
  stats_comm_ = local_routing_ ? ep.tokens : (cp.enabled() ? cp.comm : nullptr);
  if (stats_comm_ && stats_comm_->size() == 1) stats_comm_ = nullptr;
  // Without expert parallelism the experts split over TP (under it over expert_tp: checked below).
  LOOM_CHECK_CONFIG(
      ep.enabled() || ffn % tp.size() == 0,
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
  // Experts: this rank's E / ep of them, each split over expert_tp (= tp without an expert group).
  const int etp = ep.enabled() ? ep.etp : tp.size(),
            etp_rank = ep.enabled() ? ep.etp_rank : tp.rank();
  LOOM_CHECK_CONFIG(ffn % etp == 0,
                    "the expert FFN width (model.moe.expert_ffn_hidden_size = {}) is not divisible "
                    "by the expert tensor-parallel size {}",
                    ffn, etp);
  fc1_weight = f.make_expert("experts.fc1.weight", {e, 2 * ffn, h}, Init::kNormal, spec.init_std,
                             fc1, ep.ep, ep.ep_rank, etp, etp_rank);
  fc2_weight = f.make_expert("experts.fc2.weight", {e, h, ffn}, Init::kNormal, spec.output_init_std,
                             fc2, ep.ep, ep.ep_rank, etp, etp_rank);
  name_ = f.prefix();
  if (moe_.bias_update_rate > 0) {
    expert_bias = at::zeros({e}, f.options().dtype(at::kFloat));
  }
  if (moe_.num_shared_experts > 0) {
    ModelSpec dense = spec;
    dense.bias = false;
    dense.swiglu = true;
    shared = std::make_unique<Mlp>(dense, f.child("shared"),
                                   moe_.num_shared_experts * moe_.shared_ffn, tp);
  }
}

// Top-k over `scores` [T, E] (no gradient): with the expert bias added, and inside the best
// topk_groups groups when routing is group-limited (Note: router).
at::Tensor MoeLayer::select_experts(const at::Tensor& scores) const {
  at::Tensor s = scores.detach();
  if (expert_bias.defined()) s = s + expert_bias.to(s.scalar_type());
  if (moe_.num_groups > 1) {
    const int64_t t = s.size(0), g = moe_.num_groups, per = moe_.num_experts / g;
    const at::Tensor best = std::get<0>(at::topk(s.view({t, g, per}), moe_.top_k / moe_.topk_groups,
                                                 -1));  // [T, G, k / topk_groups]
    const at::Tensor groups = std::get<1>(at::topk(best.sum(-1), moe_.topk_groups, -1));  // [T, kg]
    const at::Tensor keep = at::zeros({t, g}, s.options().dtype(at::kBool))
                                .scatter_(1, groups, true)
                                .unsqueeze(-1)
                                .expand({t, g, per})
                                .reshape({t, moe_.num_experts});
    s = s.masked_fill(keep.logical_not(), -std::numeric_limits<double>::infinity());
  }
  return std::get<1>(at::topk(s, moe_.top_k, -1));
}

Routing MoeLayer::route(const at::Tensor& x2d) const {
  const auto dt = x2d.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  Routing r;
  r.logits = at::linear(x2d.to(dt), router_weight.to(dt));  // [T, E]
  const int64_t k = moe_.top_k;
  if (moe_.score == ScoreFunction::kSoftmax) {
    r.aux_probs = at::softmax(r.logits, -1);
    if (moe_.pre_softmax) {
      r.experts = select_experts(r.aux_probs);
      r.gates = r.aux_probs.gather(1, r.experts);
      if (moe_.normalize_topk && k > 1) r.gates = r.gates / r.gates.sum(-1, true);
    } else {
      r.experts = select_experts(r.logits);
      r.gates = at::softmax(r.logits.gather(1, r.experts), -1);
    }
  } else {
    at::Tensor scores = at::sigmoid(r.logits);
    r.aux_probs = scores / scores.sum(-1, true);
    r.experts = select_experts(scores);
    r.gates = scores.gather(1, r.experts);
    if (moe_.normalize_topk && k > 1) r.gates = r.gates / r.gates.sum(-1, true);
  }
  if (moe_.scaling_factor != 1.0) r.gates = r.gates * moe_.scaling_factor;
  return r;
}

MoeLayer::Assignments MoeLayer::assign(const Routing& r, int64_t t) const {
  const int64_t k = moe_.top_k, e = moe_.num_experts;
  Assignments a;
  // Sort the T*k (token, expert) assignments by expert, keeping token order inside an expert.
  at::Tensor flat = r.experts.reshape({-1});
  a.order = std::get<1>(at::sort(flat, /*stable=*/true, 0, /*descending=*/false));
  at::Tensor counts_t = at::bincount(flat, {}, e).cpu();
  a.counts.assign(counts_t.data_ptr<int64_t>(), counts_t.data_ptr<int64_t>() + e);
  if (moe_.capacity_factor > 0) {
    const auto capacity = static_cast<int64_t>(
        std::ceil(static_cast<double>(t * k) / static_cast<double>(e) * moe_.capacity_factor));
    at::Tensor gates_sorted =
        r.gates.reshape({-1}).index_select(0, a.order).detach().to(at::kDouble).cpu();
    std::vector<at::Tensor> keep;
    int64_t off = 0;
    for (int64_t i = 0; i < e; ++i) {
      const int64_t n = a.counts[i];
      at::Tensor seg = at::arange(off, off + n, at::kLong);
      if (n > capacity) {
        a.dropped += n - capacity;
        if (moe_.drop_policy == DropPolicy::kByPosition) {
          seg = seg.narrow(0, 0, capacity);
        } else {
          at::Tensor top = std::get<1>(at::topk(gates_sorted.narrow(0, off, n), capacity));
          seg = std::get<0>(at::sort(top)) + off;
        }
        a.counts[i] = capacity;
      }
      keep.push_back(seg);
      off += n;
    }
    a.order = a.order.index_select(0, at::cat(keep).to(a.order.device()));
  }
  a.token_of = at::div(a.order, k, "floor");  // [A] source token per assignment
  return a;
}

// Expert i (local index) over rows `x`: SwiGLU with this rank's slice of its FFN.
at::Tensor MoeLayer::expert(int64_t i, const at::Tensor& x, const at::Tensor& w1,
                            const at::Tensor& w2) const {
  return parallel::linear(ops::swiglu(parallel::linear(x, w1[i])), w2[i]);
}

at::Tensor MoeLayer::dispatch_and_compute(const at::Tensor& x2d, const Routing& r,
                                          int64_t* dropped) const {
  const auto dt = x2d.scalar_type();
  const Assignments a = assign(r, x2d.size(0));
  *dropped = a.dropped;
  if (ep_.enabled()) return dispatch_expert_parallel(x2d, r, a);
  at::Tensor gate_of = r.gates.reshape({-1}).index_select(0, a.order).to(dt);  // [A]
  at::Tensor xs = x2d.index_select(0, a.token_of);                             // [A, h]
  at::Tensor w1 = fc1_weight.to(dt), w2 = fc2_weight.to(dt);
  std::vector<at::Tensor> outs;
  int64_t off = 0;
  for (int64_t i = 0; i < moe_.num_experts; ++i) {
    if (a.counts[i] == 0) continue;  // an idle expert: no compute, no gradient
    outs.push_back(expert(i, xs.narrow(0, off, a.counts[i]), w1, w2));
    off += a.counts[i];
  }
  at::Tensor y = at::zeros_like(x2d);
  if (outs.empty()) return y;
  at::Tensor ys = at::cat(outs) * gate_of.unsqueeze(1);
  return y.index_add(0, a.token_of, ys);
}

// Note: expert parallelism (parallel/expert_parallel.h), steps 2-5.
at::Tensor MoeLayer::dispatch_expert_parallel(const at::Tensor& x2d, const Routing& r,
                                              const Assignments& a) const {
  comm::Communicator& c = *ep_.comm;
  const int g = c.size();
  const int64_t local = moe_.num_experts / ep_.ep, h = x2d.size(1);
  const auto dt = x2d.scalar_type();
  const auto lopts = at::TensorOptions().dtype(at::kLong);
  // This rank's kept rows, sorted by expert, hence by ep index: ep index q owns rows
  // [start[q], start[q] + rows[q]).
  std::vector<int64_t> start(static_cast<size_t>(ep_.ep), 0), rows(static_cast<size_t>(ep_.ep), 0);
  for (int64_t i = 0; i < moe_.num_experts; ++i)
    rows[static_cast<size_t>(i / local)] += a.counts[i];
  for (int q = 1; q < ep_.ep; ++q) start[q] = start[q - 1] + rows[q - 1];
  // 2. Counts: to member d, this rank's counts of d's local experts; back, each source's counts of
  // this rank's.
  at::Tensor cnt_send = at::empty({g, local}, lopts);
  auto cs = cnt_send.accessor<int64_t, 2>();
  std::vector<int64_t> send(static_cast<size_t>(g)), recv(static_cast<size_t>(g));
  std::vector<at::Tensor> blocks, back_index;
  const at::Tensor xs = x2d.index_select(0, a.token_of);  // [A, h]
  for (int d = 0; d < g; ++d) {
    const int q = ep_.member_ep[static_cast<size_t>(d)];
    for (int64_t j = 0; j < local; ++j) cs[d][j] = a.counts[q * local + j];
    send[d] = rows[q];
    blocks.push_back(xs.narrow(0, start[q], rows[q]));
    back_index.push_back(at::arange(start[q], start[q] + rows[q], lopts));
  }
  at::Tensor cnt_recv = at::empty({g, local}, lopts);
  {
    at::Tensor in = cnt_send.to(c.device()), out = at::empty({g, local}, in.options());
    c.all_to_all(out, in);
    cnt_recv = out.cpu();
  }
  auto cr = cnt_recv.accessor<int64_t, 2>();
  for (int s = 0; s < g; ++s) {
    recv[s] = 0;
    for (int64_t j = 0; j < local; ++j) recv[s] += cr[s][j];
  }
  // 3. The rows out (each source's block arrives sorted by local expert).
  const at::Tensor rx = parallel::all_to_all_rows(at::cat(blocks), send, recv, c);
  // 4. Expert-major order: expert j's rows from every source, then one pass per local expert.
  std::vector<int64_t> perm;
  std::vector<int64_t> per_expert(static_cast<size_t>(local), 0);
  {
    std::vector<int64_t> src_start(static_cast<size_t>(g), 0);
    for (int s = 1; s < g; ++s) src_start[s] = src_start[s - 1] + recv[s - 1];
    for (int64_t j = 0; j < local; ++j) {
      for (int s = 0; s < g; ++s) {
        int64_t off = src_start[s];
        for (int64_t i = 0; i < j; ++i) off += cr[s][i];
        for (int64_t n = 0; n < cr[s][j]; ++n) perm.push_back(off + n);
        per_expert[j] += cr[s][j];
      }
    }
  }
  const int64_t total = static_cast<int64_t>(perm.size());
  const at::Tensor perm_host = at::tensor(perm, lopts), perm_t = perm_host.to(rx.device());
  const at::Tensor xe = rx.index_select(0, perm_t);
  const at::Tensor w1 = fc1_weight.to(dt), w2 = fc2_weight.to(dt);
  std::vector<at::Tensor> outs;
  int64_t off = 0;
  for (int64_t j = 0; j < local; ++j) {
    // An expert no row reached still runs, on no rows (its gradient is zeros): every rank's graph
    // then has the same shape whatever the routing, so its gradient hooks, and the DP bucket
    // launches they drive, come in the same order on every rank relative to the exchanges'
    // backward all-to-alls (which NCCL needs across communicators). A rank without rows keeps both
    // exchanges in its graph this way too, and takes part in their reverse all-to-alls.
    outs.push_back(expert(j, xe.narrow(0, off, per_expert[j]), w1, w2));
    off += per_expert[j];
  }
  at::Tensor ye = at::cat(outs);
  // Back to source-major order, and home (5.).
  at::Tensor inverse = at::empty({total}, lopts);
  inverse.index_put_({perm_host}, at::arange(total, lopts));
  const at::Tensor ry = ye.index_select(0, inverse.to(ye.device()));
  const at::Tensor back = parallel::all_to_all_rows(ry, recv, send, c);  // in `blocks` order
  // The expert_tp ranks of an ep index returned partial sums of the same rows: add them.
  const at::Tensor out = at::zeros({a.token_of.size(0), h}, back.options())
                             .index_add(0, at::cat(back_index).to(back.device()), back);
  const at::Tensor gate_of = r.gates.reshape({-1}).index_select(0, a.order).to(dt);
  return at::zeros_like(x2d).index_add(0, a.token_of, out * gate_of.unsqueeze(1));
}

// [Note: balance losses]
// With p[t, e] the router's distribution over all experts (Note: router), c_e the real tokens that
// chose e (before drops) and T real tokens, the Switch balance loss of a set of tokens is
//   L = coeff * E / k * sum_e f_e P_e,   f_e = c_e / T,   P_e = sum_t p[t, e] / T.
// model.moe.aux_loss_type picks the set:
//   MICRO_BATCH: the micro-batch. Under CP the counts and T are summed over the CP ranks and each
//     rank adds its own tokens' part of P (Note: MoE under context parallelism).
//   SEQUENCE: each sequence of the micro-batch (a packed document, else a row), L averaged over
//     the micro-batch's sequences; under CP a sequence's counts and T are summed over CP likewise.
//   GLOBAL_BATCH: the counts are summed over the data-parallel domain (dp x cp of the stage) in
//     every training forward and accumulated over the step's micro-batches: micro-batch m of the
//     step uses f_e = C_e(1..m) / T(1..m), the counts and real tokens of slots 1..m (slot m: the
//     m-th micro-batch of every DP rank), and this rank's tokens' P against the step's tokens:
//     L_rank = coeff * E / k * sum_e f_e * M_all * sum_{t here} p[t, e] / N
//     (M_all micro-batches and N tokens in the step, over every DP rank). With the objective's
//     1 / M_all per micro-batch (Note: loss scaling) the sum over ranks is
//     coeff * E / k * sum_m sum_e f_e(1..m) sum_{t in slot m} p[t, e] / N, a per-token mean over
//     the step: with one micro-batch per step, exactly the loss of the whole global batch as one
//     process computes it (Qwen's global-batch balance; Megatron's global_aux_loss likewise, for
//     equal micro-batches). A layer used without the step's figures scales by slots / T(m).
//     Every DP rank must run the same number of training micro-batches (DOCUMENTS mode pads the
//     shorter plans with empty ones). Evaluation forwards use MICRO_BATCH.
// Padding positions count nowhere.
at::Tensor MoeLayer::balance_loss(const Routing& r, const at::Tensor& real,
                                  const at::Tensor& counts, const ForwardContext& ctx, int64_t t,
                                  int64_t b, at::Tensor* balance, at::Tensor* micro_counts,
                                  double* micro_tokens) {
  const int64_t e = moe_.num_experts, k = moe_.top_k;
  const auto dt = r.aux_probs.scalar_type();
  const double coeff = moe_.aux_loss_coeff * static_cast<double>(e) / static_cast<double>(k);
  const at::Tensor probs = real.defined() ? r.aux_probs * real.unsqueeze(1) : r.aux_probs;
  const double local_tokens = real.defined() ? real.sum().item<double>() : static_cast<double>(t);
  comm::Communicator* sc = stats_comm(ctx);
  if (moe_.aux_loss_type == AuxLossType::kGlobalBatch && ctx.training) {
    at::Tensor used = ctx.moe_balance;  // recomputation: the first forward's
    if (!used.defined()) {
      at::Tensor sums = at::cat({counts.to(at::kDouble),
                                 at::full({1}, local_tokens, counts.options().dtype(at::kDouble))});
      if (domain_.comm && domain_.comm->size() > 1) comm::all_reduce_host(sums, domain_.comm.get());
      sums = sums.cpu();
      const double slot_tokens = sums[e].item<double>();
      if (!global_counts_.defined()) global_counts_ = at::zeros({e}, at::kDouble);
      global_counts_ += sums.narrow(0, 0, e);
      global_tokens_ += slot_tokens;
      // P against the step's tokens: each micro-batch's share of the objective is aux / M_all
      // (Note: loss scaling), so M_all / N per token sums to a per-token mean over the step
      // whatever the micro-batches hold (padded DOCUMENTS plans too). Without the step's figures
      // (a layer used on its own): slots / T(m), the same when the slots are equal.
      const double scale = step_tokens_ > 0
                               ? step_micro_batches_ / step_tokens_
                               : static_cast<double>(domain_.slots) / std::max(slot_tokens, 1.0);
      used = at::cat(
          {global_counts_ / std::max(global_tokens_, 1.0), at::full({1}, scale, at::kDouble)});
      *micro_counts = sums.narrow(0, 0, e);
    }
    *balance = used;
    const at::Tensor f = used.narrow(0, 0, e).to(probs.device(), dt);
    return (probs.sum(0) * f).sum() * (coeff * used[e].item<double>());
  }
  if (moe_.aux_loss_type == AuxLossType::kSequence) {
    // Sequence of token t ([s, b] order): its row and document, keyed row * D + doc.
    at::Tensor doc;  // [T] document ids in token order, or undefined (a row is one sequence)
    int64_t docs = 1;
    if (ctx.doc_ids.defined()) {
      // Under local routing this shard's positions (Note: expert parallelism with tensor
      // parallelism); the documents are counted on the whole micro-batch, the same on every rank.
      const at::Tensor ids =
          local_routing_ ? ctx.doc_ids.narrow(1, static_cast<int64_t>(tp_.rank()) * (t / b), t / b)
                         : ctx.doc_ids;
      doc = ids.t().reshape({t}).to(at::kLong);
      docs = (ctx.cp_doc.defined() ? ctx.cp_doc.max() : ctx.doc_ids.max()).item<int64_t>() + 1;
    }
    const at::Tensor row = at::arange(t, counts.options().dtype(at::kLong)).remainder(b);
    const at::Tensor key = doc.defined() ? row * docs + doc.to(row.device()) : row;  // [T]
    const int64_t n = b * docs;
    const at::Tensor w = real.defined() ? real : at::ones({t}, probs.options());
    at::Tensor c = at::zeros({n * e + n}, probs.options());  // per-sequence counts, then tokens
    c.index_add_(0, (key.repeat_interleave(k) * e + r.experts.reshape({-1})),
                 w.repeat_interleave(k));
    c.narrow(0, n * e, n).index_add_(0, key, w);
    if (sc) comm::all_reduce_host(c, sc);
    const at::Tensor cs = c.narrow(0, 0, n * e).view({n, e}), ts = c.narrow(0, n * e, n);
    const at::Tensor psum = at::zeros({n, e}, probs.options()).index_add_(0, key, probs);
    const double sequences = std::max(ts.gt(0).sum().item<double>(), 1.0);
    *micro_tokens = ts.sum().item<double>();
    const at::Tensor per = (psum * cs).sum(1) / ts.clamp_min(1).pow(2);  // [n]
    *micro_counts = cs.sum(0);
    return per.sum() * (coeff / sequences);
  }
  // MICRO_BATCH (and GLOBAL_BATCH outside training).
  at::Tensor micro = counts;
  double tokens = local_tokens;
  if (sc) {
    at::Tensor sums = at::cat(
        {counts.to(at::kDouble), at::full({1}, tokens, counts.options().dtype(at::kDouble))});
    comm::all_reduce_host(sums, sc);
    micro = sums.narrow(0, 0, e);
    tokens = sums[e].item<double>();
  }
  *micro_counts = micro;
  *micro_tokens = tokens;
  tokens = std::max(tokens, 1.0);
  return (probs.sum(0) * micro.to(dt)).sum() * (coeff / (tokens * tokens));
}

// The micro-batch's ranks (stats_comm_), or under hybrid data parallelism the group its sequence
// runs on (ForwardContext::cp), which holds the other parts of the micro-batch's tokens.
comm::Communicator* MoeLayer::stats_comm(const ForwardContext& ctx) const {
  if (ctx.cp != nullptr && !local_routing_) return ctx.cp->enabled() ? ctx.cp->comm.get() : nullptr;
  return stats_comm_.get();
}

MoeLayer::Output MoeLayer::forward(const at::Tensor& input, const ForwardContext& ctx) {
  // Every token of the micro-batch; under EP with TP, this rank's sequence shard (Note: expert
  // parallelism with tensor parallelism).
  const at::Tensor x = local_routing_ ? input : parallel::enter_tp_region(input, tp_);
  comm::Communicator* sc = stats_comm(ctx);
  const int64_t s = x.size(0), b = x.size(1), h = x.size(2);
  const int64_t t = s * b;
  at::Tensor x2d = x.reshape({t, h});
  Routing r = route(x2d);
  int64_t dropped = 0;
  at::Tensor y = dispatch_and_compute(x2d, r, &dropped);
  if (local_routing_) {
    if (shared) {  // tensor-parallel over the gathered micro-batch, back to this shard
      const at::Tensor full = parallel::enter_tp_region(input, tp_);
      const at::Tensor ys = shared->partial(full.reshape({-1, h})).view(full.sizes());
      y = y + parallel::leave_tp_region(ys, tp_).reshape({t, h});
    }
  } else {
    if (shared) y = y + (tp_.enabled() ? shared->partial(x2d) : shared->forward(x2d));
    if (tp_.enabled()) y = parallel::leave_tp_region(y.view({s, b, h}), tp_);
  }

  // This shard's positions of the micro-batch's [b, s] token tensors under local routing.
  auto mine = [&](const at::Tensor& full) {
    return local_routing_ ? full.narrow(1, static_cast<int64_t>(tp_.rank()) * s, s) : full;
  };
  // Padding positions (Batch::padding) are routed but count in no statistic: the balance and z
  // losses and the expert counts are those of the real tokens, whatever a row was padded to.
  at::Tensor real;  // [T] 1 = a real token, in [s, b] order; undefined = all
  if (ctx.padding.defined()) {
    real = mine(ctx.padding).logical_not().t().reshape({t}).to(r.logits.scalar_type());
  }
  const at::Tensor counts =
      real.defined() ? at::bincount(r.experts.reshape({-1}), real.repeat_interleave(moe_.top_k),
                                    moe_.num_experts)
                     : at::bincount(r.experts.reshape({-1}), {}, moe_.num_experts)
                           .to(r.logits.scalar_type());  // [E] this rank's real assignments
  if (ctx.training && ctx.record_stats) {                // the step's loads (Note: balance losses)
    const at::Tensor c = counts.detach().to(at::kDouble);  // on the device: no sync here
    step_loads_ = step_loads_.defined() ? step_loads_ + c : c;
    // [Note: expert specialisation] With blended data (DataSource::source_names), each training
    // forward adds its real (token, expert) assignments, before drops, to a [sources, E] table by
    // the source of the token (Batch::source, sharded with the tokens: CP, and the SP shard under
    // local routing). end_moe_step sums the tables over the data-parallel domain with the loads,
    // so the step's table covers the whole global batch, as one process would count it. The
    // metrics turn it into each source's share per expert and the mutual information between
    // source and expert (train/metrics.h).
    if (sources_ > 1 && ctx.source.defined()) {
      const int64_t k = moe_.top_k, e = moe_.num_experts;
      const at::Tensor src = mine(ctx.source).t().reshape({t}).to(r.experts.device(), at::kLong);
      const at::Tensor key = src.repeat_interleave(k) * e + r.experts.reshape({-1});
      const at::Tensor w = real.defined()
                               ? real.repeat_interleave(k).to(at::kDouble)
                               : at::ones({t * k}, r.logits.options().dtype(at::kDouble));
      const at::Tensor table =
          at::zeros({sources_ * e}, w.options()).index_add_(0, key, w).view({sources_, e});
      step_sources_ = step_sources_.defined() ? step_sources_ + table : table;
    }
  }
  // [Note: MoE under context parallelism] A CP rank routes its share of the micro-batch's tokens.
  // The balance loss of the whole micro-batch, sum_e P_e c_e x E / (k T^2), is a sum over tokens
  // of P_e given the micro-batch's counts c_e: each CP rank adds its tokens' P_e against the
  // counts summed over CP (constants), with T the micro-batch's tokens, and the gradient sum over
  // dp-cp adds the parts. Likewise the z-loss's mean over T. (Capacity drops apply per CP rank.)
  at::Tensor aux = at::zeros({}, r.logits.options());
  at::Tensor balance, micro_counts = counts;
  double aux_value = 0, z_value = 0;
  double micro_tokens = -1;  // the micro-batch's real tokens over CP, once some sum computed them
  if (moe_.aux_loss_coeff > 0) {
    at::Tensor bl =
        balance_loss(r, real, counts, ctx, t, b, &balance, &micro_counts, &micro_tokens);
    aux = aux + bl;
    if (ctx.record_stats) aux_value = bl.item<double>();
  }
  if (moe_.z_loss_coeff > 0) {
    double tokens = micro_tokens;
    if (tokens < 0) {
      tokens = real.defined() ? real.sum().item<double>() : static_cast<double>(t);
      if (sc) tokens = comm::all_reduce_scalar(tokens, sc);
    }
    at::Tensor z2 = at::logsumexp(r.logits, -1).pow(2);
    if (real.defined()) z2 = z2 * real;
    at::Tensor z = z2.sum() * (moe_.z_loss_coeff / std::max(tokens, 1.0));
    aux = aux + z;
    if (ctx.record_stats) z_value = z.item<double>();
  }
  // Each TP rank computed the same losses of the same tokens: once their input gradients are
  // summed by the region, they count once. Under local routing each has its own tokens' part.
  if (tp_.enabled() && !local_routing_) aux = parallel::scale_gradient(aux, 1.0 / tp_.size());
  if (ctx.training && ctx.record_stats) {  // this rank's parts of the step's figures
    step_dropped_ += static_cast<double>(dropped);
    step_assignments_ += static_cast<double>(t * moe_.top_k);
    step_balance_ += aux_value;
    step_z_ += z_value;
  }
  if (ctx.record_stats) {
    if (sc) {  // the micro-batch's figures, as the single process logs them
      at::Tensor sums = at::tensor({aux_value, z_value, static_cast<double>(dropped)}, at::kDouble);
      comm::all_reduce_host(sums, sc);  // to the communicator's device and back
      aux_value = sums[0].item<double>();
      z_value = sums[1].item<double>();
      dropped = static_cast<int64_t>(sums[2].item<double>() + 0.5);
      if (moe_.aux_loss_coeff == 0) {
        micro_counts = micro_counts.to(at::kDouble);
        comm::all_reduce_host(micro_counts, sc);
      }
    }
    stats_.tokens_per_expert = micro_counts.detach().round().to(at::kCPU, at::kLong);
    stats_.dropped = dropped;
    stats_.aux_loss = aux_value;
    stats_.z_loss = z_value;
  }
  return {(tp_.enabled() && !local_routing_) ? y : y.view({s, b, h}), aux, balance};
}

void MoeLayer::begin_step(double micro_batches, double tokens) {
  step_micro_batches_ = micro_batches;
  step_tokens_ = tokens;
  global_counts_ = at::Tensor();
  global_tokens_ = 0;
  step_loads_ = at::Tensor();
  step_sources_ = at::Tensor();
  step_dropped_ = step_assignments_ = step_balance_ = step_z_ = 0;
}

void MoeLayer::end_step(const at::Tensor& domain_loads) {
  if (!expert_bias.defined()) return;
  // b_e += rate * sign(mean load - load_e): underloaded experts become likelier, overloaded ones
  // less (DeepSeek-V3), from the loads of the whole step over the data-parallel domain.
  const at::Tensor loads = domain_loads.to(at::kCPU, at::kDouble);
  const at::Tensor step = at::sign(loads.mean() - loads) * moe_.bias_update_rate;
  at::NoGradGuard no_grad;
  expert_bias.add_(step.to(expert_bias.device(), at::kFloat));
}

void begin_moe_step(const std::vector<MoeLayer*>& layers, double micro_batches, double tokens) {
  for (MoeLayer* m : layers) m->begin_step(micro_batches, tokens);
}

std::vector<MoeStepStats> end_moe_step(const std::vector<MoeLayer*>& layers) {
  if (layers.empty()) return {};
  // One buffer: per layer [E loads | sources x E (with 2+ sources) | 4 sums]. Every rank of the
  // domain has the same layers with the same source count, so the buffers line up; a layer that
  // saw nothing this step contributes zeros.
  std::vector<at::Tensor> parts;
  for (MoeLayer* m : layers) {
    const int64_t e = m->spec().num_experts;
    parts.push_back(m->step_loads().defined() ? m->step_loads().to(at::kCPU)
                                              : at::zeros({e}, at::kDouble));
    if (m->sources() > 1) {
      parts.push_back(m->step_sources().defined() ? m->step_sources().to(at::kCPU).reshape({-1})
                                                  : at::zeros({m->sources() * e}, at::kDouble));
    }
    parts.push_back(at::tensor(m->step_sums(), at::kDouble));
  }
  at::Tensor all = at::cat(parts);
  const auto& comm = layers.front()->domain().comm;
  if (comm && comm->size() > 1) comm::all_reduce_host(all, comm.get());
  std::vector<MoeStepStats> out;
  int64_t at = 0;
  for (MoeLayer* m : layers) {
    const int64_t e = m->spec().num_experts;
    MoeStepStats st;
    st.loads = all.narrow(0, at, e).clone();
    at += e;
    if (m->sources() > 1) {
      st.sources = all.narrow(0, at, m->sources() * e).view({m->sources(), e}).clone();
      at += m->sources() * e;
    }
    const double* sums = all.data_ptr<double>() + at;  // dropped, assignments, balance, z
    at += 4;
    st.dropped_fraction = sums[1] > 0 ? sums[0] / sums[1] : 0.0;
    const double micro = m->step_micro_batches() > 0 ? m->step_micro_batches() : 1.0;
    st.balance_loss = sums[2] / micro;
    st.z_loss = sums[3] / micro;
    m->end_step(st.loads);
    out.push_back(std::move(st));
  }
  return out;
}

}  // namespace loom::model
