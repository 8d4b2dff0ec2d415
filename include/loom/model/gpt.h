// The decoder-only transformer (dense or MoE): embedding, blocks, final norm, output head, loss.
#pragma once

#include <ATen/ATen.h>

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "loom/config.pb.h"
#include "loom/model/batch.h"
#include "loom/model/layers.h"
#include "loom/model/model_spec.h"
#include "loom/model/moe.h"
#include "loom/model/parameter.h"

namespace loom::model {

// One pre-norm block: x + attn(norm1(x)), then + mlp(norm2(x)) (or the MoE layer).
class Block {
 public:
  Block(const ModelSpec& spec, const ParameterFactory& f, int64_t index,
        const parallel::TensorParallel& tp = {}, const parallel::ContextParallel& cp = {},
        const parallel::ExpertParallel& ep = {});

  struct Output {
    at::Tensor hidden;       // [s, b, h]
    at::Tensor aux;          // scalar MoE auxiliary loss (zero for a dense block)
    at::Tensor moe_balance;  // MoeLayer::Output::balance (GLOBAL_BATCH training forwards)
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

// [Note: pipeline stages]
// A GptModel can hold one contiguous piece of the model: the layers [first_layer, first_layer +
// num_layers) under their global names and indices (so initialisation, MoE placement and
// checkpoints match the whole model), the embedding when `pre_process` and the final norm, head and
// loss when `post_process`. Chained, the pieces compute the whole model's function exactly. With
// tied embeddings a last stage without the embedding holds its own copy of `embedding.weight` as
// the head (initialised identically); the trainer keeps the copies equal by all-reducing their
// gradients over the embedding group (first and last stage), as Megatron-Core does.
struct StageLayout {
  int64_t first_layer = 0;
  int64_t num_layers = -1;  // -1: every layer from first_layer on
  bool pre_process = true;
  bool post_process = true;
};

// Layers of each virtual pipeline stage, in pipeline order (virtual stage s = chunk * pp + rank, as
// in [Note: pipeline schedule tables]). `first` / `last` (-1 = even share) fix the layers of
// virtual stage 0, which also holds the embedding, and of the last one, which holds the head and
// the loss; the other layers are split evenly over the remaining virtual stages. kConfig errors
// name model.num_layers / parallel.pp_first_stage_layers / parallel.pp_last_stage_layers with the
// arithmetic when the split is not exact or leaves a virtual stage with nothing to do.
std::vector<StageLayout> partition_stages(int64_t num_layers, int pp, int vp, int64_t first = -1,
                                          int64_t last = -1);

class GptModel {
 public:
  // Parameters are created on `device` in spec.param_dtype, initialised from `seed` by name: the
  // full tensor is drawn and, with tensor parallelism, this rank's shard kept, so every layout
  // starts from the same model. With tp > 1 the vocabulary is padded to a multiple of
  // `vocab_divisible_by` x tp (zero rows, masked out of the softmax: the same function).
  GptModel(const ModelSpec& spec, uint64_t seed, at::Device device = at::kCPU,
           const parallel::TensorParallel& tp = {}, int64_t vocab_divisible_by = 128,
           const StageLayout& stage = {}, const parallel::ContextParallel& cp = {},
           const parallel::ExpertParallel& ep = {});

  // Loss pieces for one micro-batch (the caller normalises: see train/ and Note: loss scaling).
  // The whole model only (pre_process and post_process).
  ModelOutput forward(const Batch& batch);

  // One pipeline stage's forward. `input`: the previous stage's hidden states [s, b, h] (SP: this
  // rank's [s/tp, b, h] chunk) in the compute dtype; ignored (may be undefined) on a pre_process
  // stage, which embeds batch.tokens. Every stage reads the batch's positions and document ids.
  struct StageOutput {
    at::Tensor hidden;  // [s, b, h] to send on (not post_process)
    ModelOutput loss;   // loss_sum and num_tokens (post_process); aux_loss: this stage's MoE layers
  };
  StageOutput forward_stage(const Batch& batch, const at::Tensor& input);
  const StageLayout& stage() const { return stage_; }

  // Logits [b, s, V] in fp32 (fp64 for an fp64 model), for evaluation and tests (with TP, gathered:
  // every rank gets the whole vocabulary).
  at::Tensor logits(const Batch& batch);

  const ModelSpec& spec() const { return spec_; }
  const parallel::TensorParallel& tensor_parallel() const { return tp_; }
  const parallel::ContextParallel& context_parallel() const { return cp_; }
  int64_t padded_vocab() const { return padded_vocab_; }
  const std::vector<Parameter>& parameters() const { return *params_; }
  std::vector<Parameter>& parameters() { return *params_; }
  const Parameter* find(const std::string& name) const;
  int64_t num_parameters() const;
  // MoE statistics of the latest forward, one entry per MoE layer (empty for dense models).
  std::vector<std::pair<int64_t, MoeStats>> moe_stats() const;
  // This chunk's MoE layers in order (empty for dense models).
  std::vector<MoeLayer*> moe_layers() const;
  void zero_grad();

 private:
  // -> [s, b, h] (SP: shard) after this stage's blocks, final-normed when post_process.
  at::Tensor hidden_states(const Batch& batch, at::Tensor* aux, const at::Tensor& input = {});
  ModelOutput loss_of(const Batch& batch, const at::Tensor& h);
  at::Tensor local_logits(const at::Tensor& h);  // [s, b, V / tp]: this rank's vocabulary columns

  ModelSpec spec_;
  parallel::TensorParallel tp_;
  parallel::ContextParallel cp_;
  StageLayout stage_;
  int64_t padded_vocab_ = 0;
  std::shared_ptr<std::vector<Parameter>> params_;
  at::Tensor embedding_;  // [V, h]
  at::Tensor positions_;  // [max_seq, h] (learned positions)
  std::vector<std::unique_ptr<Block>> blocks_;
  std::unique_ptr<Norm> final_norm_;
  at::Tensor head_;  // [V, h] (the embedding when tied)
};

// This pipeline rank's model chunks for a job's config (chunk c is virtual stage c * pp + pp_rank,
// of parallel.virtual_pp chunks per rank): the stage split of partition_stages with
// parallel.pp_first_stage_layers / pp_last_stage_layers, the vocabulary padded for
// parallel.vocab_divisible_by, every chunk's parameters initialised from the config's seed (so a
// layer's values do not depend on the layout).
std::vector<std::unique_ptr<GptModel>> build_chunks(const ModelSpec& spec,
                                                    const config::JobConfig& job, at::Device device,
                                                    const parallel::TensorParallel& tp, int pp,
                                                    int pp_rank,
                                                    const parallel::ContextParallel& cp = {},
                                                    const parallel::ExpertParallel& ep = {});

}  // namespace loom::model
