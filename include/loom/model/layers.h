// The dense building blocks of a transformer layer. Activations are [s, b, h] (sequence first, as
// Megatron-Core lays them out, so sequence parallelism later splits the contiguous dim 0).
// Weights are fp32 (or fp64) masters; each forward casts them to the compute dtype.
#pragma once

#include <ATen/ATen.h>

#include "loom/model/model_spec.h"
#include "loom/model/parameter.h"

namespace loom::model {

// What every layer of one forward pass shares.
struct ForwardContext {
  at::Tensor rope_cos;   // [s, b, head_dim/2] (RoPE models)
  at::Tensor rope_sin;
  at::Tensor doc_ids;    // [b, s] or undefined (see Note: packed sequences)
  bool record_stats = true;   // false while activations are recomputed
};

// x @ w^T + b with w (and b) cast to x's dtype.
at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias = {});

class Norm {
 public:
  Norm(const ModelSpec& spec, const ParameterFactory& f);
  at::Tensor forward(const at::Tensor& x) const;

  at::Tensor weight;  // [h]
  at::Tensor bias;    // [h] (LayerNorm only)

 private:
  NormKind kind_;
  double eps_;
};

// [Note: fused QKV layout]
// One weight [(nh + 2 * nkv) * d, h] holds Q, K and V grouped by KV head, as Megatron-Core does:
// for each KV head g: the nh/nkv query heads that share it, then K_g, then V_g. A contiguous split
// of the rows over tensor-parallel ranks therefore gives each rank whole groups (nkv % tp == 0).
class Attention {
 public:
  Attention(const ModelSpec& spec, const ParameterFactory& f);
  // x [s, b, h] -> [s, b, h]
  at::Tensor forward(const at::Tensor& x, const ForwardContext& ctx) const;

  at::Tensor qkv_weight;  // [(nh + 2 nkv) d, h]
  at::Tensor qkv_bias;    // [(nh + 2 nkv) d] (bias models)
  at::Tensor out_weight;  // [h, nh d]
  at::Tensor out_bias;    // [h]

 private:
  int64_t nh_, nkv_, d_;
  bool rope_;
};

// SwiGLU (fc1 = [gate | up] rows, [2f, h]) or GELU (fc1 [f, h]) feed-forward.
class Mlp {
 public:
  Mlp(const ModelSpec& spec, const ParameterFactory& f, int64_t ffn);
  at::Tensor forward(const at::Tensor& x) const;  // [..., h] -> [..., h]

  at::Tensor fc1_weight, fc1_bias;  // [2f or f, h], [2f or f]
  at::Tensor fc2_weight, fc2_bias;  // [h, f], [h]

 private:
  bool swiglu_;
};

}  // namespace loom::model
