// The dense building blocks of a transformer layer. Activations are [s, b, h] (sequence first, as
// Megatron-Core lays them out, so sequence parallelism later splits the contiguous dim 0).
// Weights are fp32 (or fp64) masters; each forward casts them to the compute dtype.
//
// [Note: tensor-parallel layers]
// Every layer takes the model's TensorParallel group. With a group of one nothing changes.
// Otherwise (Megatron's column/row pairs): QKV and fc1 are column-parallel (rows split: whole
// KV-head groups, and SwiGLU's gate and up halves split alike), the attention output projection and
// fc2 are row-parallel (columns split). A layer's input enters the TP region (copy_to_tp, or the
// sequence all-gather under SP) and its output leaves it (all-reduce, or the sequence
// reduce-scatter) before the replicated output bias is added. Under sequence parallelism the norms
// and biases outside the regions see a sequence shard, so their gradients are partial sums
// (TpShard::partial_grad) that the trainer all-reduces over TP.
#pragma once

#include <ATen/ATen.h>

#include "loom/model/model_spec.h"
#include "loom/model/parameter.h"
#include "loom/parallel/context_parallel.h"
#include "loom/parallel/tensor_parallel.h"

namespace loom::model {

// What every layer of one forward pass shares.
struct ForwardContext {
  at::Tensor rope_cos;  // [s, b, head_dim/2] (RoPE models)
  at::Tensor rope_sin;
  at::Tensor doc_ids;   // [b, s] or undefined (see Note: packed sequences)
  at::Tensor cp_index;  // [cp, b, s] every CP rank's tokens (Batch::cp_index), or undefined
  at::Tensor cp_doc;
  at::Tensor padding;        // [b, s] bool (Batch::padding), or undefined
  at::Tensor source;         // [b, s] int64 (Batch::source), or undefined
  bool record_stats = true;  // false while activations are recomputed
  // A training forward (gradients will flow; false for evaluation): only these take part in the
  // step's MoE balance buffers and collectives over the data-parallel domain.
  bool training = false;
  // The recomputed forward of a block (Note: activation recomputation) gets the GLOBAL_BATCH
  // balance its first forward used (Block::Output::moe_balance), so it neither communicates nor
  // counts again.
  at::Tensor moe_balance;
  // The context-parallel group of this micro-batch when it is not the model's (Batch::cp_group:
  // hybrid data parallelism's group of the step); null: the layers' own.
  const parallel::ContextParallel* cp = nullptr;
};

// x @ w^T + b with w (and b) cast to x's dtype.
at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias = {});
// parallel::column_parallel_linear with the weight and bias cast to x's dtype (enter the TP region,
// then the local columns; the plain linear without TP).
at::Tensor column_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                         const parallel::TensorParallel& tp);

class Norm {
 public:
  Norm(const ModelSpec& spec, const ParameterFactory& f, const parallel::TensorParallel& tp = {});
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
  Attention(const ModelSpec& spec, const ParameterFactory& f,
            const parallel::TensorParallel& tp = {}, const parallel::ContextParallel& cp = {});
  // x [s, b, h] -> [s, b, h] (under SP: this rank's [s/tp, b, h] shard in and out)
  at::Tensor forward(const at::Tensor& x, const ForwardContext& ctx) const;

  // Shapes are global; with TP each rank holds rows (qkv) or columns (out) of its heads.
  at::Tensor qkv_weight;  // [(nh + 2 nkv) d, h]
  at::Tensor qkv_bias;    // [(nh + 2 nkv) d] (bias models)
  at::Tensor out_weight;  // [h, nh d]
  at::Tensor out_bias;    // [h]

 private:
  // Self-attention of q [b, nh, s, d], k, v [b, nkv, s, d]: context-parallel, blockwise or full
  // (model.attention_block_size).
  at::Tensor attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const ForwardContext& ctx) const;

  int64_t nh_, nkv_, d_;  // this rank's query and KV heads
  bool rope_;
  int64_t block_;
  parallel::TensorParallel tp_;
  parallel::ContextParallel cp_;
};

// SwiGLU (fc1 = [gate | up] rows, [2f, h]) or GELU (fc1 [f, h]) feed-forward.
class Mlp {
 public:
  Mlp(const ModelSpec& spec, const ParameterFactory& f, int64_t ffn,
      const parallel::TensorParallel& tp = {});
  at::Tensor forward(const at::Tensor& x) const;  // [..., h] -> [..., h] (SP: sequence shards)
  // This rank's partial output for an input already inside the TP region, without fc2's bias (the
  // MoE layer's shared experts, whose region the MoE layer opens and closes).
  at::Tensor partial(const at::Tensor& x) const;

  at::Tensor fc1_weight, fc1_bias;  // [2f or f, h], [2f or f]
  at::Tensor fc2_weight, fc2_bias;  // [h, f], [h]

 private:
  bool swiglu_;
  parallel::TensorParallel tp_;
};

}  // namespace loom::model
