// The resolved, validated shape of a model: config::ModelConfig with every "from arch" field
// decided, derived sizes filled in, and the parameter and FLOP counts that metrics need.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <string>

#include "loom/config.pb.h"

namespace loom::model {

enum class NormKind { kRmsNorm, kLayerNorm };
enum class ScoreFunction { kSoftmax, kSigmoid };
enum class DropPolicy { kByProbs, kByPosition };
enum class AuxLossType { kMicroBatch, kSequence, kGlobalBatch };

struct MoeSpec {
  int64_t num_experts = 0;  // 0: dense
  int64_t top_k = 2;
  int64_t layer_freq = 1;
  int64_t first_dense_layers = 0;
  int64_t expert_ffn = 0;
  int64_t num_shared_experts = 0;
  int64_t shared_ffn = 0;  // per shared expert
  ScoreFunction score = ScoreFunction::kSoftmax;
  bool pre_softmax = false;
  bool normalize_topk = true;
  double scaling_factor = 1.0;
  double aux_loss_coeff = 0.01;
  double z_loss_coeff = 0.0;
  double capacity_factor = 0.0;  // 0: dropless
  DropPolicy drop_policy = DropPolicy::kByProbs;
  double router_init_std = 0.02;
  AuxLossType aux_loss_type = AuxLossType::kMicroBatch;
  int64_t num_groups = 0;  // group-limited routing: groups (0 or 1: off)
  int64_t topk_groups = 0;
  double bias_update_rate = 0.0;  // aux-loss-free expert bias (0: no bias)
};

struct ModelSpec {
  int64_t vocab_size = 0;
  int64_t hidden = 0;
  int64_t num_layers = 0;
  int64_t num_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;
  int64_t ffn = 0;
  int64_t max_seq_len = 0;
  NormKind norm = NormKind::kRmsNorm;
  double norm_eps = 1e-5;
  bool rope = true;  // else learned absolute positions
  double rope_theta = 10000;
  bool swiglu = true;  // else GELU (tanh approximation)
  bool tie_embeddings = false;
  bool bias = false;
  double init_std = 0.02;
  double output_init_std = 0.02;              // attention out and FFN down projections
  at::ScalarType param_dtype = at::kFloat;    // master weights (tests use kDouble)
  at::ScalarType compute_dtype = at::kFloat;  // kBFloat16 for mixed precision
  bool recompute = false;
  int64_t attention_block = 0;  // model.attention_block_size
  MoeSpec moe;

  // Resolves and validates; errors are kConfig and name the field ("model.num_kv_heads").
  static ModelSpec from_config(const config::ModelConfig& c);

  // Refuses (kConfig, naming the field) a tensor-parallel size that does not divide the attention
  // heads, the KV heads (GQA groups stay whole on a rank), or the dense, expert or shared-expert
  // FFN width. The hidden size is never split (only heads, FFN columns and, under sequence
  // parallelism, the sequence are), so it needs no divisibility.
  void check_tensor_parallel(int tp) const;
  // The vocabulary rounded up to a multiple of `divisible_by` x tp when tp > 1 (Megatron's
  // make_vocab_size_divisible_by); tp = 1 keeps it exact.
  int64_t padded_vocab(int tp, int64_t divisible_by) const;

  bool is_moe() const { return moe.num_experts > 0; }
  bool is_moe_layer(int64_t layer) const;
  int64_t num_moe_layers() const;

  // Parameter counts: all, the input embedding table (and learned positions), and the ones one
  // token actually meets (top_k of E routed experts).
  int64_t num_parameters() const;
  int64_t num_embedding_parameters() const;
  int64_t num_active_parameters() const;
  // The same counts in doubles, by part, for sizes too large to build (the memory estimate).
  struct ParameterSplit {
    double embedding = 0;  // input table (and learned positions)
    double layers = 0;     // every transformer block
    double experts = 0;    // the routed experts' weights (part of `layers`)
    double final_norm = 0;
    double head = 0;  // the output projection when untied (0 when tied)
    double total() const { return embedding + layers + final_norm + head; }
  };
  ParameterSplit parameter_split() const;

  // Training FLOPs per token at sequence length `seq_len`, counted as Megatron-LM and TorchTitan
  // do: 6 x (matmul weights every token multiplies by: projections, top_k routed experts, shared
  // experts, router, output head; not norms, biases or embedding lookups)
  // + 12 x layers x heads x head_dim x seq_len for the attention scores and their use (the full
  // square, not halved for the causal mask). See docs/model.md.
  double flops_per_token(int64_t seq_len) const;
  // Training FLOPs of a step of `tokens` tokens whose attention sequences (windows, or packed
  // documents' pieces) have lengths s_i: 6 x matmul weights x tokens + 12 x layers x heads x
  // head_dim x sum(s_i^2) (`sequence_tokens_sq`). Equals tokens x flops_per_token(s) when every
  // sequence is s long.
  double step_flops(double tokens, double sequence_tokens_sq) const;

  std::string summary() const;
};

}  // namespace loom::model
