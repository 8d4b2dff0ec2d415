// The decoder-only transformer (dense or MoE): embedding, blocks, final norm, output head, loss.
#pragma once

#include <ATen/ATen.h>

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "loom/model/batch.h"
#include "loom/model/layers.h"
#include "loom/model/model_spec.h"
#include "loom/model/moe.h"
#include "loom/model/parameter.h"

namespace loom::model {

// One pre-norm block: x + attn(norm1(x)), then + mlp(norm2(x)) (or the MoE layer).
class Block {
 public:
  Block(const ModelSpec& spec, const ParameterFactory& f, int64_t index, const parallel::TensorParallel& tp = {});

  struct Output {
    at::Tensor hidden;  // [s, b, h]
    at::Tensor aux;     // scalar MoE auxiliary loss (zero for a dense block)
  };
  Output forward(const at::Tensor& x, const ForwardContext& ctx);

  // This block's parameters in registration order (what recomputation differentiates).
  const std::vector<at::Tensor>& parameters() const { return params_; }
  MoeLayer* moe() { return moe_.get(); }

 private:
  Norm norm1_, norm2_;
  Attention attn_;
  std::unique_ptr<Mlp> mlp_;
  std::unique_ptr<MoeLayer> moe_;
  std::vector<at::Tensor> params_;
};

struct ModelOutput {
  at::Tensor loss_sum;     // scalar fp32: sum of per-token cross-entropy over loss positions
  int64_t num_tokens = 0;  // loss positions in the batch
  at::Tensor aux_loss;     // scalar: sum over MoE layers (zero for dense models)
};

class GptModel {
 public:
  // Parameters are created on `device` in spec.param_dtype, initialised from `seed` by name: the
  // full tensor is drawn and, with tensor parallelism, this rank's shard kept, so every layout starts
  // from the same model. With tp > 1 the vocabulary is padded to a multiple of
  // `vocab_divisible_by` x tp (zero rows, masked out of the softmax: the same function).
  GptModel(const ModelSpec& spec, uint64_t seed, at::Device device = at::kCPU,
           const parallel::TensorParallel& tp = {}, int64_t vocab_divisible_by = 128);

  // Loss pieces for one micro-batch (the caller normalises: see train/ and Note: loss scaling).
  ModelOutput forward(const Batch& batch);

  // Logits [b, s, V] in fp32 (fp64 for an fp64 model), for evaluation and tests (with TP, gathered:
  // every rank gets the whole vocabulary).
  at::Tensor logits(const Batch& batch);

  const ModelSpec& spec() const { return spec_; }
  const parallel::TensorParallel& tensor_parallel() const { return tp_; }
  int64_t padded_vocab() const { return padded_vocab_; }
  const std::vector<Parameter>& parameters() const { return *params_; }
  std::vector<Parameter>& parameters() { return *params_; }
  const Parameter* find(const std::string& name) const;
  int64_t num_parameters() const;
  // MoE statistics of the latest forward, one entry per MoE layer (empty for dense models).
  std::vector<std::pair<int64_t, MoeStats>> moe_stats() const;
  void zero_grad();

 private:
  at::Tensor hidden_states(const Batch& batch, at::Tensor* aux);  // -> final-normed [s, b, h] (SP: shard)
  at::Tensor local_logits(const at::Tensor& h);  // [s, b, V / tp]: this rank's vocabulary columns

  ModelSpec spec_;
  parallel::TensorParallel tp_;
  int64_t padded_vocab_ = 0;
  std::shared_ptr<std::vector<Parameter>> params_;
  at::Tensor embedding_;   // [V, h]
  at::Tensor positions_;   // [max_seq, h] (learned positions)
  std::vector<std::unique_ptr<Block>> blocks_;
  std::unique_ptr<Norm> final_norm_;
  at::Tensor head_;        // [V, h] (the embedding when tied)
};

}  // namespace loom::model
