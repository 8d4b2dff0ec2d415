#include "loom/model/gpt.h"

#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>

#include <unordered_set>

#include "loom/core/error.h"
#include "loom/model/offload.h"
#include "loom/ops/functional.h"

namespace loom::model {

Block::Block(const ModelSpec& spec, const ParameterFactory& f, int64_t index,
             const parallel::TensorParallel& tp, const parallel::ContextParallel& cp,
             const parallel::ExpertParallel& ep)
    : norm1_(spec, f.child("attn_norm"), tp),
      norm2_(spec, f.child("ffn_norm"), tp),
      attn_(spec, f.child("attn"), tp, cp) {
  if (spec.is_moe_layer(index)) {
    moe_ = std::make_unique<MoeLayer>(spec, f.child("moe"), tp, cp, ep);
  } else {
    mlp_ = std::make_unique<Mlp>(spec, f.child("mlp"), spec.ffn, tp);
  }
  for (const at::Tensor* t : {&norm1_.weight, &norm1_.bias, &attn_.qkv_weight, &attn_.qkv_bias,
                              &attn_.out_weight, &attn_.out_bias, &norm2_.weight, &norm2_.bias}) {
    if (t->defined()) params_.push_back(*t);
  }
  if (mlp_) {
    for (const at::Tensor* t :
         {&mlp_->fc1_weight, &mlp_->fc1_bias, &mlp_->fc2_weight, &mlp_->fc2_bias}) {
      if (t->defined()) params_.push_back(*t);
    }
  } else {
    params_.push_back(moe_->router_weight);
    params_.push_back(moe_->fc1_weight);
    params_.push_back(moe_->fc2_weight);
    if (moe_->shared) {
      params_.push_back(moe_->shared->fc1_weight);
      params_.push_back(moe_->shared->fc2_weight);
    }
  }
}

Block::Output Block::forward(const at::Tensor& x, const ForwardContext& ctx) {
  at::Tensor h = x + attn_.forward(norm1_.forward(x), ctx);
  at::Tensor n = norm2_.forward(h);
  if (mlp_) {
    return {h + mlp_->forward(n), at::zeros({}, x.options().dtype(at::kFloat))};
  }
  MoeLayer::Output m = moe_->forward(n, ctx);
  return {h + m.y, m.aux, m.balance};
}

namespace {

// [Note: activation recomputation]
// Full recomputation of a block: forward runs without building a graph and keeps only the block's
// input; backward re-runs the block's forward with a graph and differentiates it. The block's
// parameters are explicit inputs of the function so their gradients flow out of backward. The
// model has no dropout, so the recomputed forward is the same function; MoE statistics are only
// recorded by the first pass.
struct RecomputedBlock : public torch::autograd::Function<RecomputedBlock> {
  static torch::autograd::variable_list forward(
      torch::autograd::AutogradContext* ctx, const at::Tensor& x, at::TensorList params,
      const c10::optional<at::Tensor>& cos_opt, const c10::optional<at::Tensor>& sin_opt,
      const c10::optional<at::Tensor>& doc_opt, const c10::optional<at::Tensor>& cp_index_opt,
      const c10::optional<at::Tensor>& cp_doc_opt, const c10::optional<at::Tensor>& padding_opt,
      const c10::optional<at::Tensor>& source_opt, Block* block,
      const parallel::ContextParallel* cp) {
    // Optional tensors: an undefined one (no RoPE, no document mask) is not an autograd input.
    const at::Tensor cos = cos_opt.value_or(at::Tensor());
    const at::Tensor sin = sin_opt.value_or(at::Tensor());
    const at::Tensor doc_ids = doc_opt.value_or(at::Tensor());
    const at::Tensor cp_index = cp_index_opt.value_or(at::Tensor());
    const at::Tensor cp_doc = cp_doc_opt.value_or(at::Tensor());
    const at::Tensor padding = padding_opt.value_or(at::Tensor());
    ctx->save_for_backward({x, cos, sin, doc_ids, cp_index, cp_doc, padding});
    ctx->saved_data["block"] = reinterpret_cast<int64_t>(block);
    ctx->saved_data["num_params"] = static_cast<int64_t>(params.size());
    // The micro-batch's group (Batch::cp_group) lives until the step's backward is done.
    ctx->saved_data["cp"] = reinterpret_cast<int64_t>(cp);
    // The source tags feed statistics only, which the first pass records: not saved.
    ForwardContext fctx{cos,
                        sin,
                        doc_ids,
                        cp_index,
                        cp_doc,
                        padding,
                        source_opt.value_or(at::Tensor()),
                        /*record_stats=*/true};
    fctx.training = true;  // recomputation runs only when gradients will flow
    fctx.cp = cp;
    Block::Output out = block->forward(x, fctx);
    if (out.moe_balance.defined()) ctx->saved_data["moe_balance"] = out.moe_balance;
    return {out.hidden, out.aux};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    auto* block = reinterpret_cast<Block*>(ctx->saved_data["block"].toInt());
    const int64_t num_params = ctx->saved_data["num_params"].toInt();
    at::Tensor x = saved[0].detach().requires_grad_(true);
    ForwardContext fctx{saved[1],
                        saved[2],
                        saved[3],
                        saved[4],
                        saved[5],
                        saved[6],
                        at::Tensor(),
                        /*record_stats=*/false};
    fctx.training = true;
    fctx.cp = reinterpret_cast<const parallel::ContextParallel*>(ctx->saved_data["cp"].toInt());
    if (ctx->saved_data.count("moe_balance")) {
      fctx.moe_balance = ctx->saved_data["moe_balance"].toTensor();
    }
    Block::Output out;
    {
      at::AutoGradMode enable(true);
      out = block->forward(x, fctx);
    }
    std::vector<at::Tensor> outputs{out.hidden};
    std::vector<at::Tensor> grad_outputs{grads[0]};
    if (out.aux.requires_grad()) {
      outputs.push_back(out.aux);
      grad_outputs.push_back(grads[1].defined() ? grads[1] : at::zeros_like(out.aux));
    }
    std::vector<at::Tensor> inputs{x};
    for (const auto& p : block->parameters()) inputs.push_back(p);
    LOOM_INTERNAL_CHECK(static_cast<int64_t>(inputs.size()) == num_params + 1,
                        "recomputed block: parameter count changed");
    auto g = torch::autograd::grad(outputs, inputs, grad_outputs, /*retain_graph=*/false,
                                   /*create_graph=*/false, /*allow_unused=*/true);
    // One gradient per forward input: x, each parameter, cos, sin, doc_ids, cp_index, cp_doc,
    // padding, source, block, cp.
    g.resize(g.size() + 9);
    return g;
  }
};

}  // namespace

std::vector<StageLayout> partition_stages(int64_t num_layers, int pp, int vp, int64_t first,
                                          int64_t last) {
  LOOM_CHECK_CONFIG(pp >= 1 && vp >= 1,
                    "parallel.pp = {} and parallel.virtual_pp = {} must be at least 1", pp, vp);
  const int64_t stages = static_cast<int64_t>(pp) * vp;
  std::vector<StageLayout> out(static_cast<size_t>(stages));
  if (stages == 1) {
    LOOM_CHECK_CONFIG(
        (first < 0 || first == num_layers) && (last < 0 || last == num_layers),
        "parallel.pp_first_stage_layers / pp_last_stage_layers need more than one pipeline stage");
    out[0].num_layers = num_layers;
    return out;
  }
  LOOM_CHECK_CONFIG(first >= -1 && last >= -1,
                    "parallel.pp_first_stage_layers = {} and pp_last_stage_layers = {}: "
                    "-1 (an even share) or a number of layers",
                    first, last);
  const int64_t fixed = (first >= 0 ? first : 0) + (last >= 0 ? last : 0);
  const int64_t free_stages = stages - (first >= 0 ? 1 : 0) - (last >= 0 ? 1 : 0);
  LOOM_CHECK_CONFIG(
      fixed <= num_layers,
      "parallel.pp_first_stage_layers + pp_last_stage_layers = {} exceed model.num_layers = {}",
      fixed, num_layers);
  const int64_t rest = num_layers - fixed;
  int64_t each = 0;
  if (free_stages > 0) {
    LOOM_CHECK_CONFIG(rest % free_stages == 0,
                      "model.num_layers = {} does not split over the pipeline: {} layers left "
                      "after the first/last "
                      "stage's {} for {} virtual stages (parallel.pp = {} x parallel.virtual_pp = "
                      "{}{}), {} % {} = {}",
                      num_layers, rest, fixed, free_stages, pp, vp,
                      fixed > 0 ? " minus the fixed ones" : "", rest, free_stages,
                      rest % free_stages);
    each = rest / free_stages;
  } else {
    LOOM_CHECK_CONFIG(
        rest == 0,
        "model.num_layers = {}: the first and last stage hold {} layers and there is no other "
        "stage for the remaining {}",
        num_layers, fixed, rest);
  }
  int64_t next = 0;
  for (int64_t s = 0; s < stages; ++s) {
    StageLayout& st = out[static_cast<size_t>(s)];
    st.first_layer = next;
    st.num_layers = (s == 0 && first >= 0) ? first : (s == stages - 1 && last >= 0) ? last : each;
    st.pre_process = s == 0;
    st.post_process = s == stages - 1;
    next += st.num_layers;
    LOOM_CHECK_CONFIG(st.num_layers > 0 || st.pre_process || st.post_process,
                      "virtual pipeline stage {} of {} would hold no layers (model.num_layers = "
                      "{}, parallel.pp = {}, "
                      "parallel.virtual_pp = {}): use fewer stages or more layers",
                      s, stages, num_layers, pp, vp);
  }
  return out;
}

GptModel::GptModel(const ModelSpec& spec, uint64_t seed, at::Device device,
                   const parallel::TensorParallel& tp, int64_t vocab_divisible_by,
                   const StageLayout& stage, const parallel::ContextParallel& cp,
                   const parallel::ExpertParallel& ep)
    : spec_(spec),
      tp_(tp),
      cp_(cp),
      stage_(stage),
      params_(std::make_shared<std::vector<Parameter>>()) {
  spec.check_tensor_parallel(tp.size());
  if (stage_.num_layers < 0) stage_.num_layers = spec.num_layers - stage_.first_layer;
  LOOM_CHECK(stage_.first_layer >= 0 && stage_.first_layer + stage_.num_layers <= spec.num_layers,
             "pipeline stage: layers [{}, {}) outside the model's {}", stage_.first_layer,
             stage_.first_layer + stage_.num_layers, spec.num_layers);
  padded_vocab_ = spec.padded_vocab(tp.size(), vocab_divisible_by);
  ParameterFactory f(params_, seed, at::TensorOptions().dtype(spec.param_dtype).device(device), "",
                     tp.size(), tp.rank());
  // [Note: vocab-parallel embedding and head] Rows of the (padded) vocabulary are split over TP.
  TpShard vocab_rows;
  vocab_rows.dim = 0;
  vocab_rows.padded = padded_vocab_;
  // The last stage of a tied model keeps its own copy of the embedding as its head.
  if (stage_.pre_process || (stage_.post_process && spec.tie_embeddings)) {
    embedding_ = f.make("embedding.weight", {spec.vocab_size, spec.hidden}, Init::kNormal,
                        spec.init_std, -1, vocab_rows);
    params_->back().pipeline_copy = !stage_.pre_process;
  }
  if (!spec.rope && stage_.pre_process) {
    TpShard positions;
    positions.partial_grad = tp.sp();  // added to this rank's sequence shard
    positions_ = f.make("position_embedding.weight", {spec.max_seq_len, spec.hidden}, Init::kNormal,
                        spec.init_std, -1, positions);
  }
  for (int64_t i = stage_.first_layer; i < stage_.first_layer + stage_.num_layers; ++i) {
    blocks_.push_back(
        std::make_unique<Block>(spec, f.child("layers." + std::to_string(i)), i, tp, cp, ep));
  }
  if (stage_.post_process) {
    final_norm_ = std::make_unique<Norm>(spec, f.child("final_norm"), tp);
    head_ = spec.tie_embeddings ? embedding_
                                : f.make("output.weight", {spec.vocab_size, spec.hidden},
                                         Init::kNormal, spec.init_std, -1, vocab_rows);
  }
  // Embedding rows are looked up, not multiplied: Megatron and TorchTitan decay them anyway
  // (they are 2-D); so does Loom.
}

at::Tensor GptModel::hidden_states(const Batch& batch, at::Tensor* aux, const at::Tensor& input) {
  LOOM_CHECK(batch.tokens.dim() == 2 && batch.targets.sizes() == batch.tokens.sizes(),
             "batch: tokens and targets must both be [b, s], got {} and {}", batch.tokens.sizes(),
             batch.targets.sizes());
  const int64_t b = batch.batch_size(), s = batch.seq_len();
  if (!batch.position_ids.defined()) {
    LOOM_CHECK(s <= spec_.max_seq_len, "batch: sequence length {} exceeds model.max_seq_len {}", s,
               spec_.max_seq_len);
  } else if (batch.position_ids.is_cpu()) {
    // Packed rows may be longer than the context; each document's positions must fit in it
    // (Note: packed sequences). (On a GPU this check would synchronise the host; skipped.)
    const int64_t last = batch.position_ids.max().item<int64_t>();
    LOOM_CHECK(last < spec_.max_seq_len,
               "batch: position {} of a packed document reaches model.max_seq_len {}", last,
               spec_.max_seq_len);
  }
  LOOM_CHECK_CONFIG(
      !tp_.sp() || s % tp_.size() == 0,
      "sequence parallelism splits the sequence over parallel.tp = {} ranks: the sequence length "
      "{} is not divisible by it",
      tp_.size(), s);
  const auto compute = spec_.param_dtype == at::kDouble ? at::kDouble : spec_.compute_dtype;
  at::Tensor tokens = batch.tokens.t();  // [s, b]
  at::Tensor pos = batch.position_ids.defined()
                       ? batch.position_ids.t()
                       : at::arange(s, batch.tokens.options()).unsqueeze(1).expand({s, b});
  at::Tensor x;
  if (!stage_.pre_process) {
    const int64_t rows = tp_.sp() ? s / tp_.size() : s;
    LOOM_CHECK(
        input.defined() && input.dim() == 3 && input.size(0) == rows && input.size(1) == b &&
            input.size(2) == spec_.hidden,
        "pipeline stage {}: expected the previous stage's hidden states [{}, {}, {}], got {}",
        stage_.first_layer, rows, b, spec_.hidden,
        input.defined() ? input.sizes() : at::IntArrayRef{});
    x = input;
  } else if (!tp_.enabled()) {
    x = at::embedding(embedding_, tokens);  // [s, b, h]
    if (!spec_.rope) x = x + at::embedding(positions_, pos);
  } else {
    // Each rank looks up the ids in its vocabulary rows (others give zeros); the sum over TP (or
    // its sequence reduce-scatter under SP) is the embedding.
    const int64_t rows = padded_vocab_ / tp_.size(), start = rows * tp_.rank();
    at::Tensor mine = tokens.ge(start).logical_and(tokens.lt(start + rows));
    at::Tensor local = at::where(mine, tokens - start, at::zeros_like(tokens));
    x = at::embedding(embedding_, local) * mine.unsqueeze(-1).to(embedding_.scalar_type());
    x = tp_.sp() ? parallel::reduce_scatter_to_sp(x, tp_) : parallel::reduce_from_tp(x, tp_);
    if (!spec_.rope) {
      at::Tensor p = tp_.sp() ? pos.chunk(tp_.size(), 0)[tp_.rank()] : pos;
      x = x + at::embedding(positions_, p);
    }
  }
  x = x.to(compute);

  ForwardContext ctx;
  ctx.doc_ids = batch.doc_ids;
  ctx.cp_index = batch.cp_index;
  ctx.cp_doc = batch.cp_doc;
  ctx.padding = batch.padding;
  ctx.source = batch.source;
  ctx.training = at::GradMode::is_enabled();  // evaluation runs under NoGradGuard
  ctx.cp = batch.cp_group.get();
  const parallel::ContextParallel& cp = ctx.cp != nullptr ? *ctx.cp : cp_;
  LOOM_CHECK(batch.cp_index.defined() == cp.enabled() &&
                 (!cp.enabled() || batch.cp_index.size(0) == cp.size()),
             "batch: {} for a model under parallel.cp = {} (split micro-batches with "
             "model::cp_shard)",
             batch.cp_index.defined()
                 ? fmt::format("split over {} CP ranks", batch.cp_index.size(0))
                 : std::string("not split"),
             cp.size());
  if (spec_.rope) {
    std::tie(ctx.rope_cos, ctx.rope_sin) =
        ops::rope_tables(pos, spec_.head_dim, spec_.rope_theta, spec_.param_dtype);
  }
  *aux =
      at::zeros({}, x.options().dtype(spec_.param_dtype == at::kDouble ? at::kDouble : at::kFloat));
  // Note: activation offload. The first blocks' saved tensors go to host memory, each block's
  // store prefetching the one before it when backward reaches it.
  const int64_t offloaded =
      at::GradMode::is_enabled()
          ? offloaded_layers(batch.offload, static_cast<int64_t>(blocks_.size()))
          : 0;
  // What stays: the parameters (and their casts and views) and the inputs every block shares.
  std::shared_ptr<OffloadKeep> keep;
  if (offloaded > 0) {
    keep = std::make_shared<OffloadKeep>();
    auto impls = std::make_shared<std::unordered_set<const c10::TensorImpl*>>();
    for (const auto& p : *params_) impls->insert(p.tensor.unsafeGetTensorImpl());
    keep->parameters = std::move(impls);
    for (const at::Tensor* t : {&ctx.rope_cos, &ctx.rope_sin, &ctx.doc_ids, &ctx.cp_index,
                                &ctx.cp_doc, &ctx.padding, &ctx.source}) {
      if (t->defined()) keep->inputs.push_back(t->unsafeGetTensorImpl());
    }
  }
  std::shared_ptr<OffloadStore> previous_store;
  for (size_t i = 0; i < blocks_.size(); ++i) {
    auto& block = blocks_[i];
    std::optional<OffloadScope> offload;
    if (static_cast<int64_t>(i) < offloaded) {
      previous_store = std::make_shared<OffloadStore>(previous_store, keep);
      offload.emplace(previous_store);
    }
    at::Tensor block_aux;
    if (spec_.recompute && at::GradMode::is_enabled()) {
      auto opt = [](const at::Tensor& t) {
        return t.defined() ? c10::optional<at::Tensor>(t) : c10::optional<at::Tensor>();
      };
      auto out = RecomputedBlock::apply(x, at::TensorList(block->parameters()), opt(ctx.rope_cos),
                                        opt(ctx.rope_sin), opt(ctx.doc_ids), opt(ctx.cp_index),
                                        opt(ctx.cp_doc), opt(ctx.padding), opt(ctx.source),
                                        block.get(), ctx.cp);
      x = out[0];
      block_aux = out[1];
    } else {
      Block::Output out = block->forward(x, ctx);
      x = out.hidden;
      block_aux = out.aux;
    }
    if (block->moe()) *aux = *aux + block_aux.to(aux->scalar_type());
  }
  return stage_.post_process ? final_norm_->forward(x) : x;
}

at::Tensor GptModel::local_logits(const at::Tensor& h) {
  // Column-parallel head: the whole sequence in (gathered under SP), this rank's vocabulary out.
  return column_linear(h, head_, at::Tensor(), tp_);
}

at::Tensor GptModel::logits(const Batch& batch) {
  LOOM_CHECK(stage_.pre_process && stage_.post_process,
             "logits() needs the whole model, not a pipeline stage");
  at::Tensor aux;
  at::Tensor h = hidden_states(batch, &aux);  // [s, b, h]
  const auto out = spec_.param_dtype == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor l = local_logits(h);
  if (tp_.enabled()) l = parallel::gather_last_dim(l, tp_).narrow(2, 0, spec_.vocab_size);
  return l.to(out).transpose(0, 1);  // [b, s, V]
}

ModelOutput GptModel::forward(const Batch& batch) {
  LOOM_CHECK(stage_.pre_process && stage_.post_process,
             "forward() needs the whole model; a pipeline stage runs forward_stage()");
  return forward_stage(batch, at::Tensor()).loss;
}

GptModel::StageOutput GptModel::forward_stage(const Batch& batch, const at::Tensor& input) {
  StageOutput out;
  at::Tensor h = hidden_states(batch, &out.loss.aux_loss, input);
  if (!stage_.post_process) {
    out.hidden = h;
    return out;
  }
  at::Tensor aux = out.loss.aux_loss;
  out.loss = loss_of(batch, h);
  out.loss.aux_loss = aux;
  return out;
}

ModelOutput GptModel::loss_of(const Batch& batch, const at::Tensor& h) {
  ModelOutput out;
  const int64_t s = batch.seq_len(), b = batch.batch_size();
  at::Tensor logits = local_logits(h);
  logits = logits.view({s * b, logits.size(2)});  // rows in [s, b] order
  at::Tensor targets = batch.targets.t().reshape({s * b});
  const int64_t start = padded_vocab_ / tp_.size() * tp_.rank();
  at::Tensor losses = tp_.enabled() ? parallel::vocab_parallel_cross_entropy(logits, targets, start,
                                                                             spec_.vocab_size, tp_)
                                    : ops::cross_entropy(logits, targets);  // [s*b] fp32
  if (batch.loss_mask.defined()) {
    losses = losses * batch.loss_mask.t().reshape({s * b}).to(losses.scalar_type());
  }
  out.loss_sum = losses.sum();
  out.num_tokens = batch.num_loss_tokens();
  return out;
}

const Parameter* GptModel::find(const std::string& name) const {
  for (const auto& p : *params_) {
    if (p.name == name) return &p;
  }
  return nullptr;
}

int64_t GptModel::num_parameters() const {
  int64_t n = 0;
  for (const auto& p : *params_) n += p.tensor.numel();
  return n;
}

std::vector<MoeLayer*> GptModel::moe_layers() const {
  std::vector<MoeLayer*> out;
  for (const auto& b : blocks_) {
    if (auto* m = b->moe()) out.push_back(m);
  }
  return out;
}

std::vector<std::pair<int64_t, MoeStats>> GptModel::moe_stats() const {
  std::vector<std::pair<int64_t, MoeStats>> out;
  for (size_t i = 0; i < blocks_.size(); ++i) {
    if (auto* m = blocks_[i]->moe()) out.emplace_back(static_cast<int64_t>(i), m->stats());
  }
  return out;
}

void GptModel::zero_grad() {
  for (auto& p : *params_) {
    if (p.tensor.grad().defined()) p.tensor.mutable_grad().reset();
  }
}

std::vector<std::unique_ptr<GptModel>> build_chunks(const ModelSpec& spec,
                                                    const config::JobConfig& job, at::Device device,
                                                    const parallel::TensorParallel& tp, int pp,
                                                    int pp_rank,
                                                    const parallel::ContextParallel& cp,
                                                    const parallel::ExpertParallel& ep) {
  const auto& par = job.parallel();
  const int vp = par.virtual_pp();
  const auto layouts = partition_stages(spec.num_layers, pp, vp, par.pp_first_stage_layers(),
                                        par.pp_last_stage_layers());
  std::vector<std::unique_ptr<GptModel>> chunks;
  for (int c = 0; c < vp; ++c) {
    chunks.push_back(
        std::make_unique<GptModel>(spec, job.seed(), device, tp, par.vocab_divisible_by(),
                                   layouts[static_cast<size_t>(c * pp + pp_rank)], cp, ep));
  }
  return chunks;
}

}  // namespace loom::model
