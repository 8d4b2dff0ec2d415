#include "loom/model/layers.h"

#include "loom/core/error.h"
#include "loom/ops/functional.h"

namespace loom::model {

at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  const auto dt = x.scalar_type();
  return at::linear(x, weight.to(dt), bias.defined() ? bias.to(dt) : at::Tensor());
}

Norm::Norm(const ModelSpec& spec, const ParameterFactory& f) : kind_(spec.norm), eps_(spec.norm_eps) {
  weight = f.make("weight", {spec.hidden}, Init::kOnes);
  if (kind_ == NormKind::kLayerNorm) bias = f.make("bias", {spec.hidden}, Init::kZeros);
}

at::Tensor Norm::forward(const at::Tensor& x) const {
  return kind_ == NormKind::kRmsNorm ? ops::rms_norm(x, weight, eps_)
                                     : ops::layer_norm(x, weight, bias, eps_);
}

Attention::Attention(const ModelSpec& spec, const ParameterFactory& f)
    : nh_(spec.num_heads), nkv_(spec.num_kv_heads), d_(spec.head_dim), rope_(spec.rope) {
  const int64_t qkv_rows = (nh_ + 2 * nkv_) * d_;
  qkv_weight = f.make("qkv.weight", {qkv_rows, spec.hidden}, Init::kNormal, spec.init_std);
  if (spec.bias) qkv_bias = f.make("qkv.bias", {qkv_rows}, Init::kZeros);
  out_weight = f.make("out.weight", {spec.hidden, nh_ * d_}, Init::kNormal, spec.output_init_std);
  if (spec.bias) out_bias = f.make("out.bias", {spec.hidden}, Init::kZeros);
}

at::Tensor Attention::forward(const at::Tensor& x, const ForwardContext& ctx) const {
  const int64_t s = x.size(0), b = x.size(1);
  const int64_t group = nh_ / nkv_;
  // [s, b, nkv, group + 2, d]: per KV group, its query heads, then K, then V.
  at::Tensor qkv = model::linear(x, qkv_weight, qkv_bias).view({s, b, nkv_, group + 2, d_});
  at::Tensor q = qkv.narrow(3, 0, group).reshape({s, b, nh_, d_});
  at::Tensor k = qkv.select(3, group);      // [s, b, nkv, d]
  at::Tensor v = qkv.select(3, group + 1);  // [s, b, nkv, d]
  if (rope_) {
    q = ops::apply_rope(q, ctx.rope_cos, ctx.rope_sin);
    k = ops::apply_rope(k, ctx.rope_cos, ctx.rope_sin);
  }
  // -> [b, heads, s, d]
  at::Tensor o = ops::causal_attention(q.permute({1, 2, 0, 3}), k.permute({1, 2, 0, 3}),
                                       v.permute({1, 2, 0, 3}), ctx.doc_ids);
  o = o.permute({2, 0, 1, 3}).reshape({s, b, nh_ * d_});
  return model::linear(o, out_weight, out_bias);
}

Mlp::Mlp(const ModelSpec& spec, const ParameterFactory& f, int64_t ffn) : swiglu_(spec.swiglu) {
  const int64_t rows = swiglu_ ? 2 * ffn : ffn;
  fc1_weight = f.make("fc1.weight", {rows, spec.hidden}, Init::kNormal, spec.init_std);
  if (spec.bias) fc1_bias = f.make("fc1.bias", {rows}, Init::kZeros);
  fc2_weight = f.make("fc2.weight", {spec.hidden, ffn}, Init::kNormal, spec.output_init_std);
  if (spec.bias) fc2_bias = f.make("fc2.bias", {spec.hidden}, Init::kZeros);
}

at::Tensor Mlp::forward(const at::Tensor& x) const {
  at::Tensor h = model::linear(x, fc1_weight, fc1_bias);
  h = swiglu_ ? ops::swiglu(h) : at::gelu(h, "tanh");
  return model::linear(h, fc2_weight, fc2_bias);
}

}  // namespace loom::model
