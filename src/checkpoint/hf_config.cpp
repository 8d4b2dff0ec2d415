#include "loom/checkpoint/hf_config.h"

#include <climits>
#include <cmath>
#include <nlohmann/json.hpp>

#include "loom/core/error.h"

namespace loom::checkpoint {
namespace {

using Json = nlohmann::json;

// Typed reads: a key of the wrong JSON type or range is a kIO error naming it. (Before, a string
// where a number belongs escaped as a raw nlohmann exception, and 1e300 overflowed the conversion
// to int, which is undefined behaviour; fuzz_hf_config keeps it so.)
int int_of(const Json& v, const char* key) {
  const bool integral =
      v.is_number_integer() || (v.is_number_float() && std::isfinite(v.get<double>()) &&
                                std::floor(v.get<double>()) == v.get<double>());
  LOOM_CHECK_KIND(ErrorKind::kIO, integral, "config.json '{}' is not an integer: {}", key,
                  v.dump());
  const double d = v.is_number_float() ? v.get<double>() : 0.0;
  const bool fits = v.is_number_unsigned()  ? v.get<uint64_t>() <= static_cast<uint64_t>(INT_MAX)
                    : v.is_number_integer() ? v.get<int64_t>() >= 0 && v.get<int64_t>() <= INT_MAX
                                            : d >= 0 && d <= INT_MAX;
  LOOM_CHECK_KIND(ErrorKind::kIO, fits, "config.json '{}' is {}, outside [0, {}]", key, v.dump(),
                  INT_MAX);
  return v.is_number_float() ? static_cast<int>(d) : static_cast<int>(v.get<int64_t>());
}

int required_int(const Json& j, const char* key) {
  LOOM_CHECK_KIND(ErrorKind::kIO, j.contains(key) && j[key].is_number(),
                  "config.json has no number '{}'", key);
  return int_of(j[key], key);
}

bool present(const Json& j, const char* key) { return j.contains(key) && !j[key].is_null(); }

int int_or(const Json& j, const char* key, int fallback) {
  return present(j, key) ? int_of(j[key], key) : fallback;
}

double double_or(const Json& j, const char* key, double fallback) {
  if (!present(j, key)) return fallback;
  LOOM_CHECK_KIND(ErrorKind::kIO, j[key].is_number() && std::isfinite(j[key].get<double>()),
                  "config.json '{}' is not a finite number: {}", key, j[key].dump());
  return j[key].get<double>();
}

std::string string_or(const Json& j, const char* key, const std::string& fallback) {
  if (!present(j, key)) return fallback;
  LOOM_CHECK_KIND(ErrorKind::kIO, j[key].is_string(), "config.json '{}' is not a string: {}", key,
                  j[key].dump());
  return j[key].get<std::string>();
}

bool bool_or(const Json& j, const char* key, bool fallback) {
  if (!present(j, key)) return fallback;
  LOOM_CHECK_KIND(ErrorKind::kIO, j[key].is_boolean(), "config.json '{}' is not true or false: {}",
                  key, j[key].dump());
  return j[key].get<bool>();
}

config::ModelConfig read(const Json& j) {
  LOOM_CHECK_KIND(ErrorKind::kIO, j.is_object(), "config.json is not a JSON object");
  const std::string type = string_or(j, "model_type", "");
  LOOM_CHECK_KIND(ErrorKind::kUnsupported,
                  type == "llama" || type == "mistral" || type == "mixtral",
                  "config.json model_type '{}' is not llama, mistral or mixtral", type);
  config::ModelConfig c;
  c.set_arch(config::ModelConfig::LLAMA);
  c.set_vocab_size(required_int(j, "vocab_size"));
  c.set_hidden_size(required_int(j, "hidden_size"));
  c.set_num_layers(required_int(j, "num_hidden_layers"));
  c.set_num_heads(required_int(j, "num_attention_heads"));
  c.set_num_kv_heads(int_or(j, "num_key_value_heads", c.num_heads()));
  if (present(j, "head_dim")) {
    const int head_dim = int_of(j["head_dim"], "head_dim");
    LOOM_CHECK_KIND(ErrorKind::kUnsupported,
                    static_cast<int64_t>(head_dim) * c.num_heads() == c.hidden_size(),
                    "config.json head_dim {} x heads {} != hidden_size {} (Loom derives head_dim)",
                    head_dim, c.num_heads(), c.hidden_size());
  }
  // The MLP's activation: Loom's LLaMA-style models use SwiGLU, i.e. silu on the gate.
  const std::string act = string_or(j, "hidden_act", "silu");
  LOOM_CHECK_KIND(ErrorKind::kUnsupported, act == "silu" || act == "swish",
                  "config.json hidden_act is '{}'; Loom's LLaMA-style MLP is SwiGLU (silu)", act);
  c.set_max_seq_len(int_or(j, "max_position_embeddings", 4096));
  c.set_norm_eps(double_or(j, "rms_norm_eps", 1e-5));
  // RoPE: transformers >= 5 writes {"rope_parameters": {"rope_type": "default", "rope_theta": ...}}
  // and no top-level rope_theta; older versions write rope_theta (and rope_scaling for variants).
  double theta = 10000.0;
  if (j.contains("rope_parameters") && j["rope_parameters"].is_object()) {
    const auto& rp = j["rope_parameters"];
    const std::string rope_type = string_or(rp, "rope_type", "default");
    LOOM_CHECK_KIND(ErrorKind::kUnsupported, rope_type == "default",
                    "config.json rope_parameters.rope_type is '{}'; Loom implements plain RoPE "
                    "('default') only",
                    rope_type);
    LOOM_CHECK_KIND(ErrorKind::kIO, rp.contains("rope_theta") && rp["rope_theta"].is_number(),
                    "config.json rope_parameters has no number 'rope_theta'");
    theta = double_or(rp, "rope_theta", theta);
  } else {
    theta = double_or(j, "rope_theta", theta);
  }
  c.set_rope_theta(theta);
  LOOM_CHECK_KIND(ErrorKind::kUnsupported, !present(j, "sliding_window"),
                  "config.json sets sliding_window ({}); Loom's attention is full causal attention",
                  j.contains("sliding_window") ? j["sliding_window"].dump() : "");
  c.set_tie_embeddings(bool_or(j, "tie_word_embeddings", false) ? config::ModelConfig::ON
                                                                : config::ModelConfig::OFF);
  LOOM_CHECK_KIND(
      ErrorKind::kUnsupported,
      !bool_or(j, "attention_bias", false) && !bool_or(j, "mlp_bias", false),
      "config.json has attention_bias or mlp_bias: Loom's LLaMA-style models have no biases");
  LOOM_CHECK_KIND(ErrorKind::kUnsupported, !present(j, "rope_scaling"),
                  "config.json uses rope_scaling, which Loom does not implement yet");
  c.set_ffn_hidden_size(required_int(j, "intermediate_size"));
  if (type == "mixtral") {
    auto* m = c.mutable_moe();
    m->set_num_experts(required_int(j, "num_local_experts"));
    m->set_top_k(required_int(j, "num_experts_per_tok"));
    m->set_expert_ffn_hidden_size(c.ffn_hidden_size());
    m->set_aux_loss_coeff(double_or(j, "router_aux_loss_coef", 0.01));
  }
  return c;
}

}  // namespace

config::ModelConfig model_config_from_hf(const std::string& text) {
  Json j;
  try {
    j = Json::parse(text);
  } catch (const std::exception& e) {
    LOOM_THROW(ErrorKind::kIO, "config.json is not valid JSON: {}", e.what());
  }
  try {
    return read(j);
  } catch (const Json::exception& e) {  // a type this reader did not expect: still named
    LOOM_THROW(ErrorKind::kIO, "config.json: {}", e.what());
  }
}

}  // namespace loom::checkpoint
