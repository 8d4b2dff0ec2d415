#include "loom/checkpoint/hf.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/grad_mode.h>
#include <fmt/format.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "loom/checkpoint/checkpoint.h"
#include "loom/checkpoint/safetensors.h"
#include "loom/core/config.h"
#include "loom/core/error.h"
#include "loom/core/fs.h"
#include "loom/model/gpt.h"

namespace loom::checkpoint {

namespace {
namespace fs = std::filesystem;

const at::Tensor& get(const TensorMap& m, const std::string& name, const char* side) {
  auto it = m.find(name);
  LOOM_CHECK_KIND(ErrorKind::kIO, it != m.end(), "{} tensors have no '{}'", side, name);
  return it->second;
}
}  // namespace

void check_hf_compatible(const model::ModelSpec& s) {
  auto need = [](bool ok, const char* what) {
    LOOM_CHECK_KIND(ErrorKind::kUnsupported, ok,
                    "Hugging Face export/import covers LLaMA/Mixtral-style models: {}", what);
  };
  need(s.norm == model::NormKind::kRmsNorm, "model.norm must be RMSNORM");
  need(s.rope, "model.position must be ROPE");
  need(s.swiglu, "model.activation must be SWIGLU");
  need(!s.bias, "model.bias must be OFF");
  if (s.is_moe()) {
    need(s.moe.first_dense_layers == 0 && s.moe.layer_freq == 1,
         "every layer must be MoE (Mixtral)");
    need(s.moe.num_shared_experts == 0, "model.moe.num_shared_experts must be 0");
    need(s.moe.score == model::ScoreFunction::kSoftmax && !s.moe.pre_softmax,
         "the router must be softmax over the top-k logits (score_function SOFTMAX, pre_softmax "
         "false)");
    need(s.moe.scaling_factor == 1.0, "model.moe.router_scaling_factor must be 1");
    need(s.moe.num_groups <= 1,
         "model.moe.num_groups must be 0: HF Mixtral routes without group limits");
    need(s.moe.bias_update_rate == 0.0,
         "model.moe.bias_update_rate must be 0: HF Mixtral selects experts without the "
         "aux-loss-free bias, so the exported model would route differently");
    need(s.moe.capacity_factor == 0.0,
         "model.moe.capacity_factor must be 0 (dropless): HF Mixtral never drops tokens, so a "
         "model trained with a capacity would compute other logits there");
  }
}

TensorMap to_hf(const model::ModelSpec& s, const TensorMap& loom) {
  check_hf_compatible(s);
  const char* side = "Loom";
  TensorMap hf;
  const int64_t nh = s.num_heads, nkv = s.num_kv_heads, d = s.head_dim, g = nh / nkv;
  hf["model.embed_tokens.weight"] = get(loom, "embedding.weight", side);
  for (int64_t l = 0; l < s.num_layers; ++l) {
    const std::string p = fmt::format("layers.{}.", l), q = fmt::format("model.layers.{}.", l);
    hf[q + "input_layernorm.weight"] = get(loom, p + "attn_norm.weight", side);
    hf[q + "post_attention_layernorm.weight"] = get(loom, p + "ffn_norm.weight", side);
    at::Tensor qkv = get(loom, p + "attn.qkv.weight", side).view({nkv, g + 2, d, s.hidden});
    hf[q + "self_attn.q_proj.weight"] =
        qkv.narrow(1, 0, g).reshape({nh * d, s.hidden}).contiguous();
    hf[q + "self_attn.k_proj.weight"] = qkv.select(1, g).reshape({nkv * d, s.hidden}).contiguous();
    hf[q + "self_attn.v_proj.weight"] =
        qkv.select(1, g + 1).reshape({nkv * d, s.hidden}).contiguous();
    hf[q + "self_attn.o_proj.weight"] = get(loom, p + "attn.out.weight", side);
    if (s.is_moe_layer(l)) {
      hf[q + "block_sparse_moe.gate.weight"] = get(loom, p + "moe.router.weight", side);
      at::Tensor fc1 = get(loom, p + "moe.experts.fc1.weight", side);
      at::Tensor fc2 = get(loom, p + "moe.experts.fc2.weight", side);
      const int64_t f = s.moe.expert_ffn;
      for (int64_t e = 0; e < s.moe.num_experts; ++e) {
        const std::string x = fmt::format("{}block_sparse_moe.experts.{}.", q, e);
        hf[x + "w1.weight"] = fc1[e].narrow(0, 0, f).contiguous();
        hf[x + "w3.weight"] = fc1[e].narrow(0, f, f).contiguous();
        hf[x + "w2.weight"] = fc2[e].contiguous();
      }
    } else {
      at::Tensor fc1 = get(loom, p + "mlp.fc1.weight", side);
      hf[q + "mlp.gate_proj.weight"] = fc1.narrow(0, 0, s.ffn).contiguous();
      hf[q + "mlp.up_proj.weight"] = fc1.narrow(0, s.ffn, s.ffn).contiguous();
      hf[q + "mlp.down_proj.weight"] = get(loom, p + "mlp.fc2.weight", side);
    }
  }
  hf["model.norm.weight"] = get(loom, "final_norm.weight", side);
  if (!s.tie_embeddings) hf["lm_head.weight"] = get(loom, "output.weight", side);
  return hf;
}

TensorMap from_hf(const model::ModelSpec& s, const TensorMap& hf) {
  check_hf_compatible(s);
  const char* side = "Hugging Face";
  auto shaped = [&](const std::string& name, std::vector<int64_t> shape) {
    const at::Tensor& t = get(hf, name, side);
    LOOM_CHECK_KIND(ErrorKind::kIO, t.sizes().vec() == shape,
                    "Hugging Face tensor '{}' has shape {}, the config needs {}", name, t.sizes(),
                    at::IntArrayRef(shape));
    return t.to(at::kFloat);
  };
  TensorMap loom;
  const int64_t nh = s.num_heads, nkv = s.num_kv_heads, d = s.head_dim, g = nh / nkv, h = s.hidden;
  loom["embedding.weight"] = shaped("model.embed_tokens.weight", {s.vocab_size, h});
  for (int64_t l = 0; l < s.num_layers; ++l) {
    const std::string p = fmt::format("layers.{}.", l), q = fmt::format("model.layers.{}.", l);
    loom[p + "attn_norm.weight"] = shaped(q + "input_layernorm.weight", {h});
    loom[p + "ffn_norm.weight"] = shaped(q + "post_attention_layernorm.weight", {h});
    at::Tensor wq = shaped(q + "self_attn.q_proj.weight", {nh * d, h}).view({nkv, g, d, h});
    at::Tensor wk = shaped(q + "self_attn.k_proj.weight", {nkv * d, h}).view({nkv, 1, d, h});
    at::Tensor wv = shaped(q + "self_attn.v_proj.weight", {nkv * d, h}).view({nkv, 1, d, h});
    loom[p + "attn.qkv.weight"] = at::cat({wq, wk, wv}, 1).reshape({(nh + 2 * nkv) * d, h});
    loom[p + "attn.out.weight"] = shaped(q + "self_attn.o_proj.weight", {h, nh * d});
    if (s.is_moe_layer(l)) {
      const int64_t f = s.moe.expert_ffn;
      loom[p + "moe.router.weight"] =
          shaped(q + "block_sparse_moe.gate.weight", {s.moe.num_experts, h});
      std::vector<at::Tensor> fc1, fc2;
      for (int64_t e = 0; e < s.moe.num_experts; ++e) {
        const std::string x = fmt::format("{}block_sparse_moe.experts.{}.", q, e);
        fc1.push_back(
            at::cat({shaped(x + "w1.weight", {f, h}), shaped(x + "w3.weight", {f, h})}, 0));
        fc2.push_back(shaped(x + "w2.weight", {h, f}));
      }
      loom[p + "moe.experts.fc1.weight"] = at::stack(fc1);
      loom[p + "moe.experts.fc2.weight"] = at::stack(fc2);
    } else {
      loom[p + "mlp.fc1.weight"] = at::cat({shaped(q + "mlp.gate_proj.weight", {s.ffn, h}),
                                            shaped(q + "mlp.up_proj.weight", {s.ffn, h})},
                                           0);
      loom[p + "mlp.fc2.weight"] = shaped(q + "mlp.down_proj.weight", {h, s.ffn});
    }
  }
  loom["final_norm.weight"] = shaped("model.norm.weight", {h});
  if (!s.tie_embeddings) loom["output.weight"] = shaped("lm_head.weight", {s.vocab_size, h});
  return loom;
}

std::string hf_config_json(const model::ModelSpec& s, const std::string& torch_dtype) {
  check_hf_compatible(s);
  nlohmann::ordered_json j;
  j["architectures"] = {s.is_moe() ? "MixtralForCausalLM" : "LlamaForCausalLM"};
  j["model_type"] = s.is_moe() ? "mixtral" : "llama";
  j["vocab_size"] = s.vocab_size;
  j["hidden_size"] = s.hidden;
  j["intermediate_size"] = s.is_moe() ? s.moe.expert_ffn : s.ffn;
  j["num_hidden_layers"] = s.num_layers;
  j["num_attention_heads"] = s.num_heads;
  j["num_key_value_heads"] = s.num_kv_heads;
  j["head_dim"] = s.head_dim;
  j["hidden_act"] = "silu";
  j["max_position_embeddings"] = s.max_seq_len;
  j["rms_norm_eps"] = s.norm_eps;
  j["rope_theta"] = s.rope_theta;
  j["tie_word_embeddings"] = s.tie_embeddings;
  j["attention_bias"] = false;
  j["mlp_bias"] = false;
  if (s.is_moe()) {
    j["num_local_experts"] = s.moe.num_experts;
    j["num_experts_per_tok"] = s.moe.top_k;
    j["router_aux_loss_coef"] = s.moe.aux_loss_coeff;
    j["output_router_logits"] = false;
  }
  j["torch_dtype"] = torch_dtype;
  j["initializer_range"] = s.init_std;
  return j.dump(2);
}

void export_hf(const std::string& loom_checkpoint, const std::string& hf_dir) {
  CheckpointData data = load_checkpoint(loom_checkpoint);
  config::JobConfig job = stored_config(data, loom_checkpoint);
  model::ModelSpec spec = model::ModelSpec::from_config(job.model());
  TensorMap hf = to_hf(spec, data.model);
  const std::string json = hf_config_json(spec, "float32") + "\n";
  fs::create_directories(hf_dir);
  save_safetensors((fs::path(hf_dir) / "model.safetensors").string(), hf, {{"format", "pt"}});
  AtomicFile config_json((fs::path(hf_dir) / "config.json").string());
  config_json.write(json.data(), json.size());
  config_json.commit();
}

void import_hf(const std::string& hf_dir, const std::string& loom_checkpoint) {
  std::ifstream cfg(fs::path(hf_dir) / "config.json");
  LOOM_CHECK_KIND(ErrorKind::kIO, cfg.good(), "'{}' has no config.json", hf_dir);
  std::stringstream ss;
  ss << cfg.rdbuf();
  config::JobConfig job;
  *job.mutable_model() = model_config_from_hf(ss.str());
  model::ModelSpec spec = model::ModelSpec::from_config(job.model());
  TensorMap hf;
  for (const auto& e : fs::directory_iterator(hf_dir)) {
    if (e.path().extension() == ".safetensors") {
      for (auto& [k, v] : load_safetensors(e.path().string()).tensors) hf[k] = v;
    }
  }
  LOOM_CHECK_KIND(ErrorKind::kIO, !hf.empty(), "'{}' has no .safetensors files", hf_dir);
  CheckpointData data;
  data.model = from_hf(spec, hf);
  for (const auto& [name, t] : data.model) {
    data.state["optim." + name + ".exp_avg"] = at::zeros_like(t);
    data.state["optim." + name + ".exp_avg_sq"] = at::zeros_like(t);
  }
  data.state["rng.cpu"] = at::detail::getDefaultCPUGenerator().get_state();
  data.metadata = {{"format", kSingleProcessFormat},
                   {"step", "0"},
                   {"consumed_samples", "0"},
                   {"optimizer_step", "0"},
                   {"world_size", "1"},
                   {"config", config::to_text(job)},
                   {"source", "hugging face: " + hf_dir}};
  if (auto parent = fs::path(loom_checkpoint).parent_path(); !parent.empty())
    fs::create_directories(parent);
  write_checkpoint(loom_checkpoint, data);
}

at::Tensor checkpoint_logits(const std::string& loom_checkpoint, const at::Tensor& tokens) {
  CheckpointData data = load_checkpoint(loom_checkpoint);
  config::JobConfig job = stored_config(data, loom_checkpoint);
  job.mutable_model()->set_precision(config::ModelConfig::FP32);
  job.mutable_model()->set_recompute(config::ModelConfig::NO_RECOMPUTE);
  model::ModelSpec spec = model::ModelSpec::from_config(job.model());
  LOOM_CHECK_CONFIG(tokens.dim() == 2 && tokens.size(1) <= spec.max_seq_len,
                    "tokens must be [batch, seq] with seq <= model.max_seq_len ({}), got {}",
                    spec.max_seq_len, tokens.sizes());
  LOOM_CHECK_CONFIG(
      tokens.min().item<int64_t>() >= 0 && tokens.max().item<int64_t>() < spec.vocab_size,
      "token ids must lie in [0, {})", spec.vocab_size);
  model::GptModel model(spec, 0);
  at::NoGradGuard no_grad;
  for (auto& p : model.parameters()) {
    auto t = data.model.find(p.name);
    LOOM_CHECK_KIND(ErrorKind::kIO, t != data.model.end(), "checkpoint '{}' has no parameter '{}'",
                    loom_checkpoint, p.name);
    LOOM_CHECK_KIND(ErrorKind::kIO, t->second.sizes() == p.tensor.sizes(),
                    "checkpoint '{}': parameter '{}' has shape {}, the config needs {}",
                    loom_checkpoint, p.name, t->second.sizes(), p.tensor.sizes());
    p.tensor.copy_(t->second);
  }
  model::Batch batch;
  batch.tokens = tokens.to(at::kLong).contiguous();
  batch.targets = batch.tokens;  // unused by logits(); the batch's shape check wants them
  return model.logits(batch);
}

}  // namespace loom::checkpoint
