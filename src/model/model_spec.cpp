#include "loom/model/model_spec.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "loom/core/error.h"

namespace loom::model {

namespace {
using config::ModelConfig;

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
}  // namespace

void ModelSpec::check_tensor_parallel(int tp) const {
  if (tp <= 1) return;
  auto check = [tp](int64_t v, const char* field, const char* what) {
    LOOM_CHECK_CONFIG(v % tp == 0,
                      "{} ({} = {}) is not divisible by the tensor-parallel size parallel.tp = {}",
                      what, field, v, tp);
  };
  check(num_heads, "model.num_heads", "the number of attention heads");
  check(num_kv_heads, "model.num_kv_heads",
        "the number of KV heads (each TP rank needs whole GQA groups)");
  if (num_moe_layers() < num_layers) check(ffn, "model.ffn_hidden_size", "the FFN width");
  if (is_moe()) {
    check(moe.expert_ffn, "model.moe.expert_ffn_hidden_size", "the expert FFN width");
    if (moe.num_shared_experts > 0) {
      check(moe.num_shared_experts * moe.shared_ffn,
            "model.moe.num_shared_experts x shared_expert_ffn_hidden_size",
            "the shared experts' FFN width");
    }
  }
}

int64_t ModelSpec::padded_vocab(int tp, int64_t divisible_by) const {
  if (tp <= 1) return vocab_size;
  const int64_t m = std::max<int64_t>(1, divisible_by) * tp;
  return (vocab_size + m - 1) / m * m;
}

ModelSpec ModelSpec::from_config(const ModelConfig& c) {
  ModelSpec s;
  const bool llama = c.arch() == ModelConfig::LLAMA;
  auto positive = [](const char* field, int64_t v) {
    LOOM_CHECK_CONFIG(v >= 1, "field 'model.{}' must be >= 1, got {}", field, v);
  };
  positive("vocab_size", c.vocab_size());
  positive("hidden_size", c.hidden_size());
  positive("num_layers", c.num_layers());
  positive("num_heads", c.num_heads());
  positive("max_seq_len", c.max_seq_len());
  LOOM_CHECK_CONFIG(c.num_kv_heads() >= 0,
                    "field 'model.num_kv_heads' must be >= 0 (0 = num_heads), got {}",
                    c.num_kv_heads());
  LOOM_CHECK_CONFIG(c.ffn_hidden_size() >= 0,
                    "field 'model.ffn_hidden_size' must be >= 0 (0 = from arch), got {}",
                    c.ffn_hidden_size());
  s.vocab_size = c.vocab_size();
  s.hidden = c.hidden_size();
  s.num_layers = c.num_layers();
  s.num_heads = c.num_heads();
  s.num_kv_heads = c.num_kv_heads() == 0 ? c.num_heads() : c.num_kv_heads();
  LOOM_CHECK_CONFIG(s.hidden % s.num_heads == 0,
                    "field 'model.num_heads' ({}) must divide model.hidden_size ({})", s.num_heads,
                    s.hidden);
  LOOM_CHECK_CONFIG(s.num_heads % s.num_kv_heads == 0,
                    "field 'model.num_kv_heads' ({}) must divide model.num_heads ({})",
                    s.num_kv_heads, s.num_heads);
  s.head_dim = s.hidden / s.num_heads;
  s.max_seq_len = c.max_seq_len();

  s.norm = c.norm() == ModelConfig::NORM_FROM_ARCH
               ? (llama ? NormKind::kRmsNorm : NormKind::kLayerNorm)
               : (c.norm() == ModelConfig::RMSNORM ? NormKind::kRmsNorm : NormKind::kLayerNorm);
  LOOM_CHECK_CONFIG(c.norm_eps() > 0, "field 'model.norm_eps' must be > 0, got {}", c.norm_eps());
  s.norm_eps = c.norm_eps();
  s.rope =
      c.position() == ModelConfig::POSITION_FROM_ARCH ? llama : c.position() == ModelConfig::ROPE;
  s.rope_theta = c.rope_theta();
  if (s.rope) {
    LOOM_CHECK_CONFIG(s.head_dim % 2 == 0,
                      "RoPE needs an even head dimension, but model.hidden_size / model.num_heads "
                      "= {} / {} = {}",
                      s.hidden, s.num_heads, s.head_dim);
    LOOM_CHECK_CONFIG(s.rope_theta > 0, "field 'model.rope_theta' must be > 0, got {}",
                      s.rope_theta);
  }
  s.swiglu = c.activation() == ModelConfig::ACTIVATION_FROM_ARCH
                 ? llama
                 : c.activation() == ModelConfig::SWIGLU;
  s.tie_embeddings =
      c.tie_embeddings() == ModelConfig::FROM_ARCH ? !llama : c.tie_embeddings() == ModelConfig::ON;
  s.bias = c.bias() == ModelConfig::FROM_ARCH ? !llama : c.bias() == ModelConfig::ON;
  if (c.ffn_hidden_size() > 0) {
    s.ffn = c.ffn_hidden_size();
  } else {
    s.ffn = s.swiglu ? round_up(8 * s.hidden / 3, 256) : 4 * s.hidden;
  }
  LOOM_CHECK_CONFIG(c.init_std() > 0, "field 'model.init_std' must be > 0, got {}", c.init_std());
  s.init_std = c.init_std();
  s.output_init_std =
      c.scaled_output_init() ? c.init_std() / std::sqrt(2.0 * s.num_layers) : c.init_std();
  s.compute_dtype = c.precision() == ModelConfig::BF16 ? at::kBFloat16 : at::kFloat;
  s.recompute = c.recompute() == ModelConfig::FULL;
  s.attention_block = c.attention_block_size();
  LOOM_CHECK_CONFIG(s.attention_block >= -1,
                    "field 'model.attention_block_size' is {}: -1 (full attention), 0 (auto) or a "
                    "tile size in tokens",
                    s.attention_block);

  const auto& m = c.moe();
  LOOM_CHECK_CONFIG(m.num_experts() >= 0, "field 'model.moe.num_experts' must be >= 0, got {}",
                    m.num_experts());
  s.moe.num_experts = m.num_experts();
  if (s.moe.num_experts > 0) {
    LOOM_CHECK_CONFIG(m.top_k() >= 1 && m.top_k() <= m.num_experts(),
                      "field 'model.moe.top_k' must be in [1, model.moe.num_experts = {}], got {}",
                      m.num_experts(), m.top_k());
    LOOM_CHECK_CONFIG(m.layer_freq() >= 1, "field 'model.moe.layer_freq' must be >= 1, got {}",
                      m.layer_freq());
    LOOM_CHECK_CONFIG(m.first_dense_layers() >= 0 && m.first_dense_layers() < c.num_layers(),
                      "field 'model.moe.first_dense_layers' must be in [0, model.num_layers = {}), "
                      "got {} (no layer would be MoE)",
                      c.num_layers(), m.first_dense_layers());
    LOOM_CHECK_CONFIG(m.expert_ffn_hidden_size() >= 0 && m.shared_expert_ffn_hidden_size() >= 0 &&
                          m.num_shared_experts() >= 0,
                      "fields 'model.moe.expert_ffn_hidden_size', 'shared_expert_ffn_hidden_size' "
                      "and 'num_shared_experts' must be >= 0");
    LOOM_CHECK_CONFIG(m.capacity_factor() >= 0,
                      "field 'model.moe.capacity_factor' must be >= 0 (0 = dropless), got {}",
                      m.capacity_factor());
    LOOM_CHECK_CONFIG(m.aux_loss_coeff() >= 0 && m.z_loss_coeff() >= 0,
                      "fields 'model.moe.aux_loss_coeff' ({}) and 'z_loss_coeff' ({}) must be >= 0",
                      m.aux_loss_coeff(), m.z_loss_coeff());
    LOOM_CHECK_CONFIG(m.router_scaling_factor() > 0,
                      "field 'model.moe.router_scaling_factor' must be > 0, got {}",
                      m.router_scaling_factor());
    LOOM_CHECK_CONFIG(!(m.pre_softmax() && m.score_function() == config::MoeConfig::SIGMOID),
                      "field 'model.moe.pre_softmax' applies to score_function SOFTMAX only");
    s.moe.top_k = m.top_k();
    s.moe.layer_freq = m.layer_freq();
    s.moe.first_dense_layers = m.first_dense_layers();
    s.moe.expert_ffn = m.expert_ffn_hidden_size() > 0 ? m.expert_ffn_hidden_size() : s.ffn;
    s.moe.num_shared_experts = m.num_shared_experts();
    s.moe.shared_ffn = m.shared_expert_ffn_hidden_size() > 0 ? m.shared_expert_ffn_hidden_size()
                                                             : s.moe.expert_ffn;
    s.moe.score = m.score_function() == config::MoeConfig::SIGMOID ? ScoreFunction::kSigmoid
                                                                   : ScoreFunction::kSoftmax;
    s.moe.pre_softmax = m.pre_softmax();
    s.moe.normalize_topk = m.normalize_topk();
    s.moe.scaling_factor = m.router_scaling_factor();
    s.moe.aux_loss_coeff = m.aux_loss_coeff();
    s.moe.z_loss_coeff = m.z_loss_coeff();
    s.moe.capacity_factor = m.capacity_factor();
    s.moe.drop_policy = m.drop_policy() == config::MoeConfig::DROP_BY_POSITION
                            ? DropPolicy::kByPosition
                            : DropPolicy::kByProbs;
    s.moe.router_init_std = m.router_init_std() > 0 ? m.router_init_std() : s.init_std;
    s.moe.aux_loss_type = m.aux_loss_type() == config::MoeConfig::SEQUENCE ? AuxLossType::kSequence
                          : m.aux_loss_type() == config::MoeConfig::GLOBAL_BATCH
                              ? AuxLossType::kGlobalBatch
                              : AuxLossType::kMicroBatch;
    const int64_t groups = m.num_groups(), topk_groups = m.topk_groups();
    if (groups > 1) {
      LOOM_CHECK_CONFIG(m.num_experts() % groups == 0,
                        "model.moe.num_groups = {} does not divide model.moe.num_experts = {} ({} "
                        "% {} = {}): the groups must be equal",
                        groups, m.num_experts(), m.num_experts(), groups, m.num_experts() % groups);
      LOOM_CHECK_CONFIG(topk_groups >= 1 && topk_groups <= groups,
                        "model.moe.topk_groups must be in [1, model.moe.num_groups = {}], got {}",
                        groups, topk_groups);
      LOOM_CHECK_CONFIG(
          m.top_k() % topk_groups == 0 && m.top_k() / topk_groups <= m.num_experts() / groups,
          "group-limited routing scores a group by its best top_k / topk_groups "
          "experts: model.moe.top_k = {} must be a multiple of topk_groups = {} "
          "and top_k / topk_groups = {} at most the {} experts of a group",
          m.top_k(), topk_groups, m.top_k() / topk_groups, m.num_experts() / groups);
      LOOM_CHECK_CONFIG(m.top_k() <= topk_groups * (m.num_experts() / groups),
                        "model.moe.top_k = {} experts do not fit in topk_groups = {} groups of {}",
                        m.top_k(), topk_groups, m.num_experts() / groups);
    } else {
      // One group (some published configs say num_groups = topk_groups = 1) is no limit.
      LOOM_CHECK_CONFIG(groups >= 0 && topk_groups >= 0 &&
                            topk_groups <= std::max<int64_t>(groups, 1) &&
                            (topk_groups == 0 || groups == 1),
                        "model.moe.topk_groups = {} needs model.moe.num_groups > 1 (it is {})",
                        topk_groups, groups);
    }
    s.moe.num_groups = groups > 1 ? groups : 0;
    s.moe.topk_groups = groups > 1 ? topk_groups : 0;
    LOOM_CHECK_CONFIG(
        m.bias_update_rate() >= 0 && std::isfinite(m.bias_update_rate()),
        "field 'model.moe.bias_update_rate' must be >= 0 (0 = no expert bias), got {}",
        m.bias_update_rate());
    s.moe.bias_update_rate = m.bias_update_rate();
    LOOM_CHECK_CONFIG(s.swiglu,
                      "MoE experts are SwiGLU: set model.activation to SWIGLU (or arch LLAMA)");
  }
  return s;
}

bool ModelSpec::is_moe_layer(int64_t layer) const {
  if (!is_moe() || layer < moe.first_dense_layers) return false;
  return (layer - moe.first_dense_layers) % moe.layer_freq == 0;
}

int64_t ModelSpec::num_moe_layers() const {
  int64_t n = 0;
  for (int64_t i = 0; i < num_layers; ++i) n += is_moe_layer(i) ? 1 : 0;
  return n;
}

namespace {
// Weights and biases of one layer's parts. `active` counts only what one token uses. Doubles: the
// up-front memory check must count models far too large to build without overflowing (exact up to
// 2^53 parameters).
struct LayerCount {
  double params = 0;
  double active = 0;
  double matmul = 0;  // weights one token multiplies by (no norms, biases or lookups)
};

double mlp_params(const ModelSpec& s, double ffn) {
  const double h = static_cast<double>(s.hidden);
  double in = (s.swiglu ? 2 : 1) * ffn * h + (s.bias ? (s.swiglu ? 2 : 1) * ffn : 0);
  double out = ffn * h + (s.bias ? h : 0);
  return in + out;
}

LayerCount layer_count(const ModelSpec& s, int64_t layer) {
  const double h = static_cast<double>(s.hidden);
  const double norm = s.norm == NormKind::kLayerNorm ? 2 * h : h;
  const double qkv_out = static_cast<double>(s.num_heads + 2 * s.num_kv_heads) * s.head_dim;
  const double attn_out = static_cast<double>(s.num_heads) * s.head_dim;
  double attn = qkv_out * h + attn_out * h;
  if (s.bias) attn += qkv_out + h;
  LayerCount c;
  c.params = 2 * norm + attn;
  c.active = c.params;
  c.matmul = qkv_out * h + attn_out * h;
  if (s.is_moe_layer(layer)) {
    const double expert = 3.0 * s.moe.expert_ffn * h;
    const double shared =
        s.moe.num_shared_experts > 0 ? 3.0 * s.moe.shared_ffn * s.moe.num_shared_experts * h : 0;
    const double router = s.moe.num_experts * h;
    c.params += router + s.moe.num_experts * expert + shared;
    c.active += router + s.moe.top_k * expert + shared;
    c.matmul += router + s.moe.top_k * expert + shared;
  } else {
    const double ffn = static_cast<double>(s.ffn);
    c.params += mlp_params(s, ffn);
    c.active += mlp_params(s, ffn);
    c.matmul += (s.swiglu ? 3 : 2) * ffn * h;
  }
  return c;
}
}  // namespace

namespace {
// A count as int64, saturated: a double above 2^63 does not convert (undefined behaviour), and only
// a model refused by the memory check gets near it.
int64_t saturate(double n) {
  return n >= 9.2e18 ? std::numeric_limits<int64_t>::max() : static_cast<int64_t>(n);
}
}  // namespace

ModelSpec::ParameterSplit ModelSpec::parameter_split() const {
  const double h = static_cast<double>(hidden);
  ParameterSplit p;
  p.embedding =
      static_cast<double>(vocab_size) * h + (rope ? 0 : static_cast<double>(max_seq_len) * h);
  for (int64_t i = 0; i < num_layers; ++i) {
    p.layers += layer_count(*this, i).params;
    if (is_moe_layer(i)) p.experts += 3.0 * moe.expert_ffn * h * moe.num_experts;
  }
  p.final_norm = norm == NormKind::kLayerNorm ? 2 * h : h;
  p.head = tie_embeddings ? 0 : static_cast<double>(vocab_size) * h;
  return p;
}

int64_t ModelSpec::num_embedding_parameters() const {
  return saturate(parameter_split().embedding);
}

int64_t ModelSpec::num_parameters() const { return saturate(parameter_split().total()); }

int64_t ModelSpec::num_active_parameters() const {
  ParameterSplit p = parameter_split();
  double n = p.embedding + p.final_norm + p.head;
  for (int64_t i = 0; i < num_layers; ++i) n += layer_count(*this, i).active;
  return saturate(n);
}

namespace {
// Weights a token multiplies by: every layer's matmuls (top_k of the routed experts) and the output
// head, which is a real matmul even when it shares the embedding's storage.
double matmul_weights(const ModelSpec& spec) {
  double matmul = static_cast<double>(spec.vocab_size) * static_cast<double>(spec.hidden);
  for (int64_t i = 0; i < spec.num_layers; ++i) matmul += layer_count(spec, i).matmul;
  return matmul;
}
}  // namespace

double ModelSpec::flops_per_token(int64_t seq_len) const {
  const double attention = 12.0 * num_layers * num_heads * head_dim * static_cast<double>(seq_len);
  return 6.0 * matmul_weights(*this) + attention;
}

double ModelSpec::step_flops(double tokens, double sequence_tokens_sq) const {
  return 6.0 * matmul_weights(*this) * tokens +
         12.0 * num_layers * num_heads * head_dim * sequence_tokens_sq;
}

std::string ModelSpec::summary() const {
  std::string s = fmt::format(
      "{} layers, hidden {}, heads {} (kv {}), head_dim {}, ffn {}, vocab {}, {}, {}, {}, "
      "{} embeddings, {} params",
      num_layers, hidden, num_heads, num_kv_heads, head_dim, ffn, vocab_size,
      norm == NormKind::kRmsNorm ? "RMSNorm" : "LayerNorm", rope ? "RoPE" : "learned positions",
      swiglu ? "SwiGLU" : "GELU", tie_embeddings ? "tied" : "untied", num_parameters());
  if (is_moe()) {
    s += fmt::format(
        "; MoE {} of {} layers: {} experts top-{} (ffn {}), {} shared, {} active params",
        num_moe_layers(), num_layers, moe.num_experts, moe.top_k, moe.expert_ffn,
        moe.num_shared_experts, num_active_parameters());
  }
  return s;
}

}  // namespace loom::model
