#include "loom/model/layers.h"

#include <torch/version.h>

#include "loom/core/error.h"
#include "loom/ops/context_attention.h"
#include "loom/ops/functional.h"
#include "loom/parallel/weight_grad_store.h"

namespace loom::model {

at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  const auto dt = x.scalar_type();
  return parallel::linear(x, weight.to(dt), bias.defined() ? bias.to(dt) : at::Tensor());
}

at::Tensor column_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                         const parallel::TensorParallel& tp) {
  const auto dt = x.scalar_type();
  return parallel::column_parallel_linear(x, weight.to(dt),
                                          bias.defined() ? bias.to(dt) : at::Tensor(), tp);
}

namespace {
// A parameter replicated over TP; its gradient is partial when it acts on a sequence shard.
TpShard replicated(bool partial_grad) {
  TpShard s;
  s.partial_grad = partial_grad;
  return s;
}
TpShard split(int dim, int64_t blocks = 1) {
  TpShard s;
  s.dim = dim;
  s.blocks = blocks;
  return s;
}
}  // namespace

Norm::Norm(const ModelSpec& spec, const ParameterFactory& f, const parallel::TensorParallel& tp)
    : kind_(spec.norm), eps_(spec.norm_eps) {
  weight = f.make("weight", {spec.hidden}, Init::kOnes, 0.0, -1, replicated(tp.sp()));
  if (kind_ == NormKind::kLayerNorm)
    bias = f.make("bias", {spec.hidden}, Init::kZeros, 0.0, -1, replicated(tp.sp()));
}

at::Tensor Norm::forward(const at::Tensor& x) const {
  return kind_ == NormKind::kRmsNorm ? ops::rms_norm(x, weight, eps_)
                                     : ops::layer_norm(x, weight, bias, eps_);
}

Attention::Attention(const ModelSpec& spec, const ParameterFactory& f,
                     const parallel::TensorParallel& tp, const parallel::ContextParallel& cp)
    : nh_(spec.num_heads / tp.size()),
      nkv_(spec.num_kv_heads / tp.size()),
      d_(spec.head_dim),
      rope_(spec.rope),
      block_(spec.attention_block),
      tp_(tp),
      cp_(cp) {
  spec.check_tensor_parallel(tp.size());
  if (cp.enabled()) {
    LOOM_CHECK_CONFIG(block_ != -1,
                      "model.attention_block_size = -1 (full attention) cannot run under "
                      "parallel.cp = {}: context parallelism attends blockwise",
                      cp.size());
    parallel::check_cp_heads(nh_, nkv_, cp.a2a_size(), tp.size());
  }
  const int64_t qkv_rows = (spec.num_heads + 2 * spec.num_kv_heads) * d_;
  qkv_weight =
      f.make("qkv.weight", {qkv_rows, spec.hidden}, Init::kNormal, spec.init_std, -1, split(0));
  if (spec.bias) qkv_bias = f.make("qkv.bias", {qkv_rows}, Init::kZeros, 0.0, -1, split(0));
  out_weight = f.make("out.weight", {spec.hidden, spec.num_heads * d_}, Init::kNormal,
                      spec.output_init_std, -1, split(1));
  if (spec.bias)
    out_bias = f.make("out.bias", {spec.hidden}, Init::kZeros, 0.0, -1, replicated(tp.sp()));
}

at::Tensor Attention::forward(const at::Tensor& input, const ForwardContext& ctx) const {
  // [s, b, nkv, group + 2, d] over the whole sequence (gathered under SP): per KV group, its query
  // heads, then K, then V.
  at::Tensor qkv = column_linear(input, qkv_weight, qkv_bias, tp_);
  const int64_t s = qkv.size(0), b = qkv.size(1);
  const int64_t group = nh_ / nkv_;
  qkv = qkv.view({s, b, nkv_, group + 2, d_});
  at::Tensor q = qkv.narrow(3, 0, group).reshape({s, b, nh_, d_});
  at::Tensor k = qkv.select(3, group);      // [s, b, nkv, d]
  at::Tensor v = qkv.select(3, group + 1);  // [s, b, nkv, d]
  if (rope_) {
    q = ops::apply_rope(q, ctx.rope_cos, ctx.rope_sin);
    k = ops::apply_rope(k, ctx.rope_cos, ctx.rope_sin);
  }
  // -> [b, heads, s, d]
  at::Tensor o =
      attend(q.permute({1, 2, 0, 3}), k.permute({1, 2, 0, 3}), v.permute({1, 2, 0, 3}), ctx);
  o = o.permute({2, 0, 1, 3}).reshape({s, b, nh_ * d_});
  if (!tp_.enabled()) return model::linear(o, out_weight, out_bias);
  at::Tensor y = parallel::leave_tp_region(model::linear(o, out_weight), tp_);
  return out_bias.defined() ? y + out_bias.to(y.scalar_type()) : y;
}

at::Tensor Attention::attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const ForwardContext& ctx) const {
  constexpr int64_t kDefaultBlock = 512;
  const parallel::ContextParallel& cp = ctx.cp != nullptr ? *ctx.cp : cp_;
  if (cp.enabled()) {
    LOOM_CHECK(ctx.cp_index.defined() && ctx.cp_doc.defined(),
               "attention under parallel.cp = {}: the batch was not split (model::cp_shard)",
               cp.size());
    return ops::context_attention(q, k, v, ctx.cp_index, ctx.cp_doc, cp,
                                  block_ > 0 ? block_ : kDefaultBlock);
  }
  const int64_t b = q.size(0), s = q.size(2);
  // Auto: blockwise when the full score matrix of the micro-batch would pass 256 MiB in fp32, and
  // where full attention is the explicit [s, s] form (no fused SDPA: LibTorch 1.x, fp64) from
  // 1024 tokens, where blockwise measured faster on CPU (benchmarks/README.md, cp_bench).
  const bool big = static_cast<double>(b) * static_cast<double>(q.size(1)) *
                       static_cast<double>(s) * static_cast<double>(s) * 4.0 >
                   256.0 * (1 << 20);
#if TORCH_VERSION_MAJOR >= 2
  const bool fused = q.scalar_type() != at::kDouble;
#else
  const bool fused = false;
#endif
  if (block_ > 0 || (block_ == 0 && (big || (!fused && s >= 1024)))) {
    return ops::blockwise_attention(q, k, v, ops::row_tokens(b, s, ctx.doc_ids, q.device()),
                                    block_ > 0 ? block_ : kDefaultBlock);
  }
  return ops::causal_attention(q, k, v, ctx.doc_ids);
}

Mlp::Mlp(const ModelSpec& spec, const ParameterFactory& f, int64_t ffn,
         const parallel::TensorParallel& tp)
    : swiglu_(spec.swiglu), tp_(tp) {
  LOOM_CHECK_CONFIG(ffn % tp.size() == 0,
                    "'{}': the FFN width {} is not divisible by the tensor-parallel size {}",
                    f.prefix(), ffn, tp.size());
  const int64_t rows = swiglu_ ? 2 * ffn : ffn;
  const int64_t blocks = swiglu_ ? 2 : 1;
  fc1_weight =
      f.make("fc1.weight", {rows, spec.hidden}, Init::kNormal, spec.init_std, -1, split(0, blocks));
  if (spec.bias) fc1_bias = f.make("fc1.bias", {rows}, Init::kZeros, 0.0, -1, split(0, blocks));
  fc2_weight =
      f.make("fc2.weight", {spec.hidden, ffn}, Init::kNormal, spec.output_init_std, -1, split(1));
  if (spec.bias)
    fc2_bias = f.make("fc2.bias", {spec.hidden}, Init::kZeros, 0.0, -1, replicated(tp.sp()));
}

at::Tensor Mlp::partial(const at::Tensor& x) const {
  at::Tensor h = model::linear(x, fc1_weight, fc1_bias);
  h = swiglu_ ? ops::swiglu(h) : at::gelu(h, "tanh");
  return model::linear(h, fc2_weight);
}

at::Tensor Mlp::forward(const at::Tensor& x) const {
  if (!tp_.enabled()) {
    at::Tensor h = model::linear(x, fc1_weight, fc1_bias);
    h = swiglu_ ? ops::swiglu(h) : at::gelu(h, "tanh");
    return model::linear(h, fc2_weight, fc2_bias);
  }
  at::Tensor h = column_linear(x, fc1_weight, fc1_bias, tp_);
  h = swiglu_ ? ops::swiglu(h) : at::gelu(h, "tanh");
  at::Tensor y = parallel::leave_tp_region(model::linear(h, fc2_weight), tp_);
  return fc2_bias.defined() ? y + fc2_bias.to(y.scalar_type()) : y;
}

}  // namespace loom::model
