// Hugging Face interoperability for LLaMA-style (LlamaForCausalLM) and Mixtral-style
// (MixtralForCausalLM) models: parameter-name mapping both ways and config.json.
//
// [Note: HF conventions]
// - Loom's RoPE pairs dimension i with i + d/2 ("rotate half"), which is what transformers' LLaMA
//   implementation does, so q_proj / k_proj rows map one to one. (The q/k permutation people talk
//   about converts Meta's original interleaved-pair checkpoints into this layout; a Loom checkpoint
//   needs none.)
// - Loom fuses Q, K, V into one weight grouped by KV head (Note: fused QKV layout); HF keeps
//   q_proj [nh d, h], k_proj [nkv d, h], v_proj [nkv d, h] with heads in order. Loom's SwiGLU fc1
//   is [gate | up]; HF has gate_proj and up_proj (Mixtral experts: w1 = gate, w3 = up, w2 = down).
// - Tied embeddings: HF omits lm_head.weight and sets tie_word_embeddings.
// - HF LLaMA/Mixtral linears have no biases (attention_bias false); the router is
//   block_sparse_moe.gate.weight [E, h] with softmax -> top-k -> renormalise, which is Loom's
//   default router (top-k of logits, softmax over k) exactly.
// Other model shapes (GPT-2 style, shared experts, sigmoid routers, MoE only in some layers) are
// refused with a message naming the field.
#pragma once

#include <ATen/ATen.h>

#include <map>
#include <string>

#include "loom/checkpoint/hf_config.h"
#include "loom/config.pb.h"
#include "loom/model/model_spec.h"

namespace loom::checkpoint {

using TensorMap = std::map<std::string, at::Tensor>;

// Throws kUnsupported naming the field when `spec` has no HF counterpart.
void check_hf_compatible(const model::ModelSpec& spec);

TensorMap to_hf(const model::ModelSpec& spec, const TensorMap& loom);
TensorMap from_hf(const model::ModelSpec& spec, const TensorMap& hf);

// config.json for the spec (torch_dtype names the dtype the tensors are written in).
std::string hf_config_json(const model::ModelSpec& spec, const std::string& torch_dtype);

// Whole-directory conversions. A Loom checkpoint directory (model.safetensors + state.safetensors
// with its config) -> an HF directory (model.safetensors + config.json); and back, as a step-0 Loom
// checkpoint (zero optimizer state) that `train.resume` can start from.
void export_hf(const std::string& loom_checkpoint, const std::string& hf_dir);
void import_hf(const std::string& hf_dir, const std::string& loom_checkpoint);

// The fp32 logits [b, s, V] of the model in a Loom checkpoint directory for `tokens` [b, s] (int64,
// positions 0..s-1): what `convert_hf --logits` writes so a conversion can be checked against
// transformers (tools/check_hf_logits.py).
at::Tensor checkpoint_logits(const std::string& loom_checkpoint, const at::Tensor& tokens);

}  // namespace loom::checkpoint
