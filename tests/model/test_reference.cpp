// The model against an independent, loop-level float64 reference written here (attention with GQA
// and document masks, RoPE, RMSNorm/LayerNorm, SwiGLU/GELU, learned positions, tied heads, the MoE
// router variants, capacity drops, shared experts, the balance and z losses), and its gradients
// against central finite differences in float64.
//
// Tolerances: the model and the reference both compute in float64 but in different orders (BLAS
// GEMMs vs scalar loops), so logits agree to ~1e-14 relative; 1e-10 absolute leaves a wide margin
// while any wrong index, sign or pairing (errors of order 1e-2..1) fails. Finite differences use
// h = 1e-6: truncation error ~h^2 * f''' ~ 1e-12 and rounding ~1e-16 / h ~ 1e-10, so agreement to
// 1e-6 relative (+1e-9 absolute) is required.
#include <gtest/gtest.h>
#include <torch/csrc/autograd/autograd.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <map>
#include <numeric>
#include <random>

#include "loom/core/config.h"
#include "loom/core/error.h"
#include "loom/model/gpt.h"
#include "loom/model/offload.h"

namespace {

using loom::model::Batch;
using loom::model::GptModel;
using loom::model::ModelSpec;
using Vec = std::vector<double>;

// ---------------------------------------------------------------------------------------------
// The reference.
struct Mat {
  int64_t rows = 0, cols = 0;
  Vec v;
  double operator()(int64_t r, int64_t c) const { return v[r * cols + c]; }
};

Vec to_vec(const at::Tensor& t) {
  at::Tensor c = t.detach().to(at::kDouble).contiguous();
  return Vec(c.data_ptr<double>(), c.data_ptr<double>() + c.numel());
}

Mat to_mat(const at::Tensor& t) {
  Mat m;
  m.rows = t.size(0);
  m.cols = t.size(1);
  m.v = to_vec(t);
  return m;
}

struct Ref {
  const GptModel& model;
  const ModelSpec& s;
  explicit Ref(const GptModel& m) : model(m), s(m.spec()) {}

  bool has(const std::string& name) const { return model.find(name) != nullptr; }
  at::Tensor t(const std::string& name) const {
    auto* p = model.find(name);
    EXPECT_NE(p, nullptr) << name;
    return p->tensor;
  }
  Mat mat(const std::string& name) const { return to_mat(t(name)); }
  Vec vec(const std::string& name) const { return to_vec(t(name)); }

  static Vec matvec(const Mat& w, const Vec& x, const Vec* bias = nullptr) {
    Vec y(w.rows, 0.0);
    for (int64_t r = 0; r < w.rows; ++r) {
      double acc = bias ? (*bias)[r] : 0.0;
      for (int64_t c = 0; c < w.cols; ++c) acc += w(r, c) * x[c];
      y[r] = acc;
    }
    return y;
  }

  Vec norm(const std::string& prefix, const Vec& x) const {
    const auto n = static_cast<double>(x.size());
    Vec w = vec(prefix + ".weight");
    Vec y(x.size());
    if (s.norm == loom::model::NormKind::kRmsNorm) {
      double ms = 0;
      for (double v : x) ms += v * v;
      const double inv = 1.0 / std::sqrt(ms / n + s.norm_eps);
      for (size_t i = 0; i < x.size(); ++i) y[i] = x[i] * inv * w[i];
    } else {
      Vec b = vec(prefix + ".bias");
      double mean = std::accumulate(x.begin(), x.end(), 0.0) / n;
      double var = 0;
      for (double v : x) var += (v - mean) * (v - mean);
      var /= n;
      const double inv = 1.0 / std::sqrt(var + s.norm_eps);
      for (size_t i = 0; i < x.size(); ++i) y[i] = (x[i] - mean) * inv * w[i] + b[i];
    }
    return y;
  }

  // Rotate-half RoPE of one head vector at position p.
  Vec rope(const Vec& x, int64_t p) const {
    const int64_t d = static_cast<int64_t>(x.size()), half = d / 2;
    Vec y(x.size());
    for (int64_t i = 0; i < half; ++i) {
      const double angle =
          static_cast<double>(p) * std::pow(s.rope_theta, -2.0 * i / static_cast<double>(d));
      const double c = std::cos(angle), sn = std::sin(angle);
      y[i] = x[i] * c - x[i + half] * sn;
      y[i + half] = x[i + half] * c + x[i] * sn;
    }
    return y;
  }

  static double silu(double v) { return v / (1.0 + std::exp(-v)); }
  static double gelu_tanh(double v) {
    const double k = std::sqrt(2.0 / M_PI);
    return 0.5 * v * (1.0 + std::tanh(k * (v + 0.044715 * v * v * v)));
  }

  // SwiGLU with fc1 rows [gate | up].
  static Vec swiglu_ffn(const Mat& fc1, const Mat& fc2, const Vec& x) {
    Vec h = matvec(fc1, x);
    const int64_t f = fc1.rows / 2;
    Vec a(f);
    for (int64_t i = 0; i < f; ++i) a[i] = silu(h[i]) * h[f + i];
    return matvec(fc2, a);
  }

  Vec mlp(const std::string& prefix, const Vec& x) const {
    if (s.swiglu) return swiglu_ffn(mat(prefix + ".fc1.weight"), mat(prefix + ".fc2.weight"), x);
    Vec b1, b2;
    if (s.bias) {
      b1 = vec(prefix + ".fc1.bias");
      b2 = vec(prefix + ".fc2.bias");
    }
    Vec h = matvec(mat(prefix + ".fc1.weight"), x, s.bias ? &b1 : nullptr);
    for (double& v : h) v = gelu_tanh(v);
    return matvec(mat(prefix + ".fc2.weight"), h, s.bias ? &b2 : nullptr);
  }

  // What the reference saw in an MoE layer: per-expert counts (before drops) and probability sums,
  // the tokens, and each token's sequence key (row, document).
  struct MoeRecord {
    Vec counts, psum;
    double tokens = 0;
    std::vector<std::vector<int64_t>> chosen;  // [T][k] each token's experts
  };
  mutable std::map<std::string, MoeRecord> record;

  Vec expert_bias(const std::string& prefix) const {
    for (auto* layer : model.moe_layers()) {
      if (layer->name() == prefix && layer->expert_bias.defined())
        return to_vec(layer->expert_bias);
    }
    return Vec(static_cast<size_t>(s.moe.num_experts), 0.0);
  }

  // MoE over all tokens of the batch; `xs` in flat token order t = s_index * B + b_index; `seq`:
  // each token's sequence (the SEQUENCE balance loss).
  std::vector<Vec> moe(const std::string& prefix, const std::vector<Vec>& xs, double* aux,
                       const std::vector<int64_t>& seq) const {
    const auto& m = s.moe;
    const int64_t T = static_cast<int64_t>(xs.size()), E = m.num_experts, k = m.top_k;
    const Vec bias = expert_bias(prefix);
    Mat router = mat(prefix + ".router.weight");
    at::Tensor fc1 = t(prefix + ".experts.fc1.weight"), fc2 = t(prefix + ".experts.fc2.weight");
    std::vector<Mat> w1, w2;
    for (int64_t e = 0; e < E; ++e) {
      w1.push_back(to_mat(fc1[e]));
      w2.push_back(to_mat(fc2[e]));
    }
    std::vector<std::vector<int64_t>> chosen(T);
    std::vector<Vec> gates(T);
    std::vector<Vec> probs(T, Vec(E));
    Vec count(E, 0.0);
    double z = 0;
    for (int64_t t = 0; t < T; ++t) {
      Vec l = matvec(router, xs[t]);
      double mx = *std::max_element(l.begin(), l.end());
      double se = 0;
      for (double v : l) se += std::exp(v - mx);
      const double lse = mx + std::log(se);
      z += lse * lse;
      Vec score(E);
      if (m.score == loom::model::ScoreFunction::kSoftmax) {
        for (int64_t e = 0; e < E; ++e) probs[t][e] = std::exp(l[e] - lse);
        score = m.pre_softmax ? probs[t] : l;
      } else {
        double sum = 0;
        for (int64_t e = 0; e < E; ++e) {
          score[e] = 1.0 / (1.0 + std::exp(-l[e]));
          sum += score[e];
        }
        for (int64_t e = 0; e < E; ++e) probs[t][e] = score[e] / sum;
      }
      // Selection: score + bias, inside the best groups when group-limited; gates from the score.
      Vec sel(E);
      for (int64_t e = 0; e < E; ++e) sel[e] = score[e] + bias[e];
      std::vector<bool> allowed(E, true);
      if (m.num_groups > 1) {
        const int64_t per = E / m.num_groups;
        std::vector<std::pair<double, int64_t>> gs;  // (group score, group)
        for (int64_t g = 0; g < m.num_groups; ++g) {
          Vec in(sel.begin() + g * per, sel.begin() + (g + 1) * per);
          std::sort(in.begin(), in.end(), std::greater<double>());
          gs.emplace_back(std::accumulate(in.begin(), in.begin() + k / m.topk_groups, 0.0), g);
        }
        std::stable_sort(gs.begin(), gs.end(),
                         [](const auto& a, const auto& b) { return a.first > b.first; });
        for (int64_t e = 0; e < E; ++e) allowed[e] = false;
        for (int64_t j = 0; j < m.topk_groups; ++j) {
          for (int64_t e = 0; e < per; ++e) allowed[gs[j].second * per + e] = true;
        }
      }
      std::vector<int64_t> idx;
      for (int64_t e = 0; e < E; ++e) {
        if (allowed[e]) idx.push_back(e);
      }
      std::stable_sort(idx.begin(), idx.end(),
                       [&](int64_t a, int64_t b) { return sel[a] > sel[b]; });
      idx.resize(k);
      chosen[t] = idx;
      Vec g(k);
      for (int64_t j = 0; j < k; ++j) g[j] = score[idx[j]];
      if (m.score == loom::model::ScoreFunction::kSoftmax && !m.pre_softmax) {
        double gm = *std::max_element(g.begin(), g.end()), gs = 0;
        for (double& v : g) gs += std::exp(v - gm);
        for (double& v : g) v = std::exp(v - gm) / gs;
      } else if (m.normalize_topk && k > 1) {
        double gs = std::accumulate(g.begin(), g.end(), 0.0);
        for (double& v : g) v /= gs;
      }
      for (double& v : g) v *= m.scaling_factor;
      gates[t] = g;
      for (int64_t e : idx) count[e] += 1;
    }
    // Capacity: per expert, the assignments in token order; keep the first C or the C largest.
    std::vector<std::vector<bool>> keep(T, std::vector<bool>(k, true));
    if (m.capacity_factor > 0) {
      const auto cap =
          static_cast<int64_t>(std::ceil(static_cast<double>(T * k) / E * m.capacity_factor));
      for (int64_t e = 0; e < E; ++e) {
        std::vector<std::pair<int64_t, int64_t>> a;  // (token, slot)
        for (int64_t t = 0; t < T; ++t) {
          for (int64_t j = 0; j < k; ++j) {
            if (chosen[t][j] == e) a.emplace_back(t, j);
          }
        }
        if (static_cast<int64_t>(a.size()) <= cap) continue;
        std::vector<std::pair<int64_t, int64_t>> kept = a;
        if (m.drop_policy == loom::model::DropPolicy::kByProbs) {
          std::stable_sort(kept.begin(), kept.end(), [&](auto x, auto y) {
            return gates[x.first][x.second] > gates[y.first][y.second];
          });
        }
        kept.resize(cap);
        for (auto [tt, j] : a) {
          keep[tt][j] = std::find(kept.begin(), kept.end(), std::make_pair(tt, j)) != kept.end();
        }
      }
    }
    std::vector<Vec> out(T, Vec(s.hidden, 0.0));
    const bool shared = m.num_shared_experts > 0;
    Mat s1, s2;
    if (shared) {
      s1 = mat(prefix + ".shared.fc1.weight");
      s2 = mat(prefix + ".shared.fc2.weight");
    }
    for (int64_t t = 0; t < T; ++t) {
      for (int64_t j = 0; j < k; ++j) {
        if (!keep[t][j]) continue;
        Vec y = swiglu_ffn(w1[chosen[t][j]], w2[chosen[t][j]], xs[t]);
        for (int64_t i = 0; i < s.hidden; ++i) out[t][i] += gates[t][j] * y[i];
      }
      if (shared) {
        Vec y = swiglu_ffn(s1, s2, xs[t]);
        for (int64_t i = 0; i < s.hidden; ++i) out[t][i] += y[i];
      }
    }
    MoeRecord rec;
    rec.counts = count;
    rec.chosen = chosen;
    rec.psum.assign(E, 0.0);
    rec.tokens = static_cast<double>(T);
    for (int64_t t = 0; t < T; ++t) {
      for (int64_t e = 0; e < E; ++e) rec.psum[e] += probs[t][e];
    }
    record[prefix] = rec;
    double balance = 0;
    if (m.aux_loss_type == loom::model::AuxLossType::kSequence) {
      // Each sequence's own loss, averaged over the sequences.
      std::map<int64_t, std::pair<Vec, Vec>> per;  // key -> (counts, psum)
      std::map<int64_t, double> tokens;
      for (int64_t t = 0; t < T; ++t) {
        auto& [c, ps] = per[seq[t]];
        c.resize(E, 0.0);
        ps.resize(E, 0.0);
        for (int64_t e : chosen[t]) c[e] += 1;
        for (int64_t e = 0; e < E; ++e) ps[e] += probs[t][e];
        tokens[seq[t]] += 1;
      }
      for (const auto& [key, cp] : per) {
        double sum = 0;
        for (int64_t e = 0; e < E; ++e) sum += cp.first[e] * cp.second[e];
        balance += sum / (tokens[key] * tokens[key]) / static_cast<double>(per.size());
      }
    } else {
      for (int64_t e = 0; e < E; ++e)
        balance += rec.psum[e] * count[e] / (static_cast<double>(T) * T);
    }
    *aux += m.aux_loss_coeff * E / static_cast<double>(k) * balance + m.z_loss_coeff * z / T;
    return out;
  }

  // Logits [B][S][V] and the summed MoE auxiliary loss for a batch.
  std::vector<std::vector<Vec>> logits(const Batch& batch, double* aux) const {
    const int64_t B = batch.batch_size(), S = batch.seq_len();
    auto tok = batch.tokens.accessor<int64_t, 2>();
    auto pos_at = [&](int64_t b, int64_t t) {
      return batch.position_ids.defined() ? batch.position_ids[b][t].item<int64_t>() : t;
    };
    auto doc_at = [&](int64_t b, int64_t t) {
      return batch.doc_ids.defined() ? batch.doc_ids[b][t].item<int64_t>() : 0;
    };
    Mat emb = mat("embedding.weight");
    std::vector<std::vector<Vec>> h(B, std::vector<Vec>(S));
    Mat pemb;
    if (!s.rope) pemb = mat("position_embedding.weight");
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t t = 0; t < S; ++t) {
        h[b][t] =
            Vec(emb.v.begin() + tok[b][t] * s.hidden, emb.v.begin() + (tok[b][t] + 1) * s.hidden);
        if (!s.rope) {
          for (int64_t i = 0; i < s.hidden; ++i) h[b][t][i] += pemb(pos_at(b, t), i);
        }
      }
    }
    const int64_t nh = s.num_heads, nkv = s.num_kv_heads, d = s.head_dim, grp = nh / nkv;
    *aux = 0;
    for (int64_t l = 0; l < s.num_layers; ++l) {
      const std::string p = "layers." + std::to_string(l);
      Mat wqkv = mat(p + ".attn.qkv.weight"), wo = mat(p + ".attn.out.weight");
      Vec bqkv, bo;
      if (s.bias) {
        bqkv = vec(p + ".attn.qkv.bias");
        bo = vec(p + ".attn.out.bias");
      }
      for (int64_t b = 0; b < B; ++b) {
        // Per position: q[head], k[kv head], v[kv head].
        std::vector<std::vector<Vec>> q(S, std::vector<Vec>(nh)), k(S, std::vector<Vec>(nkv)),
            v(S, std::vector<Vec>(nkv));
        for (int64_t t = 0; t < S; ++t) {
          Vec qkv = matvec(wqkv, norm(p + ".attn_norm", h[b][t]), s.bias ? &bqkv : nullptr);
          for (int64_t g = 0; g < nkv; ++g) {
            const int64_t base = g * (grp + 2) * d;
            for (int64_t j = 0; j < grp; ++j) {
              q[t][g * grp + j] = Vec(qkv.begin() + base + j * d, qkv.begin() + base + (j + 1) * d);
            }
            k[t][g] = Vec(qkv.begin() + base + grp * d, qkv.begin() + base + (grp + 1) * d);
            v[t][g] = Vec(qkv.begin() + base + (grp + 1) * d, qkv.begin() + base + (grp + 2) * d);
            if (s.rope) k[t][g] = rope(k[t][g], pos_at(b, t));
          }
          if (s.rope) {
            for (int64_t hh = 0; hh < nh; ++hh) q[t][hh] = rope(q[t][hh], pos_at(b, t));
          }
        }
        std::vector<Vec> attn_out(S, Vec(nh * d, 0.0));
        for (int64_t t = 0; t < S; ++t) {
          for (int64_t hh = 0; hh < nh; ++hh) {
            const int64_t g = hh / grp;
            Vec sc;
            std::vector<int64_t> us;
            for (int64_t u = 0; u <= t; ++u) {
              if (doc_at(b, u) != doc_at(b, t)) continue;
              double dot = 0;
              for (int64_t i = 0; i < d; ++i) dot += q[t][hh][i] * k[u][g][i];
              sc.push_back(dot / std::sqrt(static_cast<double>(d)));
              us.push_back(u);
            }
            const double mx = *std::max_element(sc.begin(), sc.end());
            double se = 0;
            for (double& x : sc) se += (x = std::exp(x - mx));
            for (size_t j = 0; j < us.size(); ++j) {
              for (int64_t i = 0; i < d; ++i)
                attn_out[t][hh * d + i] += sc[j] / se * v[us[j]][g][i];
            }
          }
        }
        for (int64_t t = 0; t < S; ++t) {
          Vec o = matvec(wo, attn_out[t], s.bias ? &bo : nullptr);
          for (int64_t i = 0; i < s.hidden; ++i) h[b][t][i] += o[i];
        }
      }
      if (s.is_moe_layer(l)) {
        std::vector<Vec> xs;
        std::vector<int64_t> seq;
        for (int64_t t = 0; t < S; ++t) {
          for (int64_t b = 0; b < B; ++b) {
            xs.push_back(norm(p + ".ffn_norm", h[b][t]));
            seq.push_back(b * (S + 1) + doc_at(b, t));
          }
        }
        std::vector<Vec> ys = moe(p + ".moe", xs, aux, seq);
        for (int64_t t = 0; t < S; ++t) {
          for (int64_t b = 0; b < B; ++b) {
            for (int64_t i = 0; i < s.hidden; ++i) h[b][t][i] += ys[t * B + b][i];
          }
        }
      } else {
        for (int64_t b = 0; b < B; ++b) {
          for (int64_t t = 0; t < S; ++t) {
            Vec y = mlp(p + ".mlp", norm(p + ".ffn_norm", h[b][t]));
            for (int64_t i = 0; i < s.hidden; ++i) h[b][t][i] += y[i];
          }
        }
      }
    }
    Mat head = s.tie_embeddings ? emb : mat("output.weight");
    std::vector<std::vector<Vec>> out(B, std::vector<Vec>(S));
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t t = 0; t < S; ++t) out[b][t] = matvec(head, norm("final_norm", h[b][t]));
    }
    return out;
  }
};

// ---------------------------------------------------------------------------------------------
// Fixtures.
loom::config::ModelConfig tiny_config(const std::string& kind) {
  loom::config::ModelConfig c;
  c.set_vocab_size(13);
  c.set_hidden_size(8);
  c.set_num_layers(2);
  c.set_num_heads(4);
  c.set_num_kv_heads(2);
  c.set_ffn_hidden_size(12);
  c.set_max_seq_len(16);
  c.set_init_std(0.3);  // large enough that every part moves the logits visibly
  if (kind == "gpt2") {
    c.set_arch(loom::config::ModelConfig::GPT2);
    c.set_num_kv_heads(0);
  } else if (kind.rfind("moe", 0) == 0) {
    auto* m = c.mutable_moe();
    m->set_num_experts(4);
    m->set_top_k(2);
    m->set_expert_ffn_hidden_size(6);
    m->set_first_dense_layers(0);
    m->set_layer_freq(1);
    m->set_aux_loss_coeff(0.1);
    m->set_z_loss_coeff(0.01);
    if (kind == "moe_shared") {
      m->set_num_shared_experts(2);
      m->set_shared_expert_ffn_hidden_size(3);
      m->set_first_dense_layers(1);
    }
    if (kind == "moe_sigmoid") {
      m->set_score_function(loom::config::MoeConfig::SIGMOID);
      m->set_router_scaling_factor(2.5);
    }
    if (kind == "moe_presoftmax") {
      m->set_pre_softmax(true);
      m->set_top_k(3);
    }
    if (kind == "moe_groups") {  // 8 experts in 4 groups, 2 groups kept, top 2 (DeepSeek-V3)
      m->set_num_experts(8);
      m->set_num_groups(4);
      m->set_topk_groups(2);
      m->set_score_function(loom::config::MoeConfig::SIGMOID);
    }
    if (kind == "moe_groups_sum") {  // 2 groups of 4, 1 kept: a group scores its best 2 summed
      m->set_num_experts(8);
      m->set_num_groups(2);
      m->set_topk_groups(1);
    }
    if (kind == "moe_sequence") m->set_aux_loss_type(loom::config::MoeConfig::SEQUENCE);
    if (kind == "moe_bias") m->set_bias_update_rate(0.5);
    if (kind == "moe_capacity_probs" || kind == "moe_capacity_position") {
      m->set_capacity_factor(0.5);
      m->set_drop_policy(kind == "moe_capacity_probs" ? loom::config::MoeConfig::DROP_BY_PROBS
                                                      : loom::config::MoeConfig::DROP_BY_POSITION);
    }
  }
  return c;
}

ModelSpec f64_spec(const loom::config::ModelConfig& c) {
  ModelSpec s = ModelSpec::from_config(c);
  s.param_dtype = at::kDouble;
  return s;
}

Batch random_batch(int64_t b, int64_t s, int64_t vocab, uint64_t seed) {
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  Batch batch;
  batch.tokens = at::randint(vocab, {b, s}, gen, at::kLong);
  batch.targets = at::randint(vocab, {b, s}, gen, at::kLong);
  return batch;
}

double max_diff(const at::Tensor& logits, const std::vector<std::vector<Vec>>& ref) {
  double m = 0;
  auto a = logits.accessor<double, 3>();
  for (size_t b = 0; b < ref.size(); ++b) {
    for (size_t t = 0; t < ref[b].size(); ++t) {
      for (size_t v = 0; v < ref[b][t].size(); ++v)
        m = std::max(m, std::abs(a[b][t][v] - ref[b][t][v]));
    }
  }
  return m;
}

class ReferenceForward : public ::testing::TestWithParam<std::string> {};

TEST_P(ReferenceForward, LogitsAndAuxLossMatchLoopReference) {
  GptModel model(f64_spec(tiny_config(GetParam())), /*seed=*/7);
  Batch batch = random_batch(2, 6, 13, 11);
  at::Tensor logits = model.logits(batch);
  ASSERT_EQ(logits.scalar_type(), at::kDouble);
  double aux_ref = 0;
  auto ref = Ref(model).logits(batch, &aux_ref);
  EXPECT_LT(max_diff(logits, ref), 1e-10);
  // The logits are far from trivial (a broken layer could not hide in a tolerance).
  EXPECT_GT(logits.abs().max().item<double>(), 0.1);
  // Loss: per-token cross-entropy summed, and the auxiliary losses.
  loom::model::ModelOutput out = model.forward(batch);
  double ce = 0;
  auto tg = batch.targets.accessor<int64_t, 2>();
  for (size_t b = 0; b < ref.size(); ++b) {
    for (size_t t = 0; t < ref[b].size(); ++t) {
      const Vec& l = ref[b][t];
      double mx = *std::max_element(l.begin(), l.end()), se = 0;
      for (double v : l) se += std::exp(v - mx);
      ce += mx + std::log(se) - l[tg[b][t]];
    }
  }
  EXPECT_NEAR(out.loss_sum.item<double>(), ce, 1e-9);
  EXPECT_EQ(out.num_tokens, 12);
  if (model.spec().is_moe()) {
    EXPECT_GT(aux_ref, 0.0);
    EXPECT_NEAR(out.aux_loss.item<double>(), aux_ref, 1e-12);
  }
}

INSTANTIATE_TEST_SUITE_P(Arch, ReferenceForward,
                         ::testing::Values("llama", "gpt2", "moe", "moe_shared", "moe_sigmoid",
                                           "moe_presoftmax", "moe_groups", "moe_groups_sum",
                                           "moe_sequence", "moe_capacity_probs",
                                           "moe_capacity_position"));

TEST(ReferenceForward, CapacityActuallyDropsTokens) {
  GptModel model(f64_spec(tiny_config("moe_capacity_probs")), 7);
  (void)model.forward(random_batch(2, 6, 13, 11));
  int64_t dropped = 0;
  for (const auto& [layer, st] : model.moe_stats()) dropped += st.dropped;
  EXPECT_GT(dropped, 0);  // capacity 0.5: 24 assignments over 4 experts, 3 slots each
}

TEST(PackedSequences, DocumentMaskEqualsSeparateDocuments) {
  for (const std::string kind : {"llama", "gpt2"}) {
    GptModel model(f64_spec(tiny_config(kind)), 3);
    Batch full = random_batch(1, 9, 13, 5);
    Batch packed = loom::model::packed_batch(full.tokens, full.targets, {{0, 4, 6, 9}});
    at::Tensor lp = model.logits(packed);
    double aux = 0;
    EXPECT_LT(max_diff(lp, Ref(model).logits(packed, &aux)), 1e-10) << kind;
    const std::vector<std::pair<int64_t, int64_t>> docs = {{0, 4}, {4, 2}, {6, 3}};
    for (auto [start, len] : docs) {
      Batch alone;
      alone.tokens = full.tokens.narrow(1, start, len);
      alone.targets = full.targets.narrow(1, start, len);
      at::Tensor la = model.logits(alone);
      EXPECT_LT((la - lp.narrow(1, start, len)).abs().max().item<double>(), 1e-12)
          << kind << " doc at " << start;
    }
  }
}

TEST(PackedSequences, BadCuSeqlensAreRefused) {
  Batch b = random_batch(1, 6, 13, 1);
  EXPECT_THROW(loom::model::packed_batch(b.tokens, b.targets, {{0, 3, 5}}), loom::Error);
  EXPECT_THROW(loom::model::packed_batch(b.tokens, b.targets, {{0, 3, 3, 6}}), loom::Error);
  EXPECT_THROW(loom::model::packed_batch(b.tokens, b.targets, {{0, 6}, {0, 6}}), loom::Error);
}

TEST(ModelSpec, ParameterCountMatchesModel) {
  for (const std::string kind : {"llama", "gpt2", "moe", "moe_shared"}) {
    GptModel model(f64_spec(tiny_config(kind)), 1);
    EXPECT_EQ(model.num_parameters(), model.spec().num_parameters()) << kind;
  }
}

TEST(ModelSpec, InitialisationDependsOnlyOnSeedAndName) {
  auto c = tiny_config("llama");
  c.set_scaled_output_init(false);  // else the output projections' std depends on num_layers
  ModelSpec a = f64_spec(c);
  c.set_num_layers(3);  // one more layer: the shared parameters must not change
  ModelSpec b = f64_spec(c);
  GptModel ma(a, 9), mb(b, 9), mc(a, 10);
  for (const auto& p : ma.parameters()) {
    const auto* q = mb.find(p.name);
    ASSERT_NE(q, nullptr) << p.name;
    EXPECT_TRUE(at::equal(p.tensor, q->tensor)) << p.name;
  }
  EXPECT_FALSE(at::equal(ma.find("layers.0.attn.qkv.weight")->tensor,
                         mc.find("layers.0.attn.qkv.weight")->tensor));
  // fp32 and fp64 models hold the same numbers (drawn in fp32, then cast).
  ModelSpec f32 = a;
  f32.param_dtype = at::kFloat;
  GptModel m32(f32, 9);
  EXPECT_TRUE(at::equal(m32.parameters()[0].tensor.to(at::kDouble), ma.parameters()[0].tensor));
}

// ---------------------------------------------------------------------------------------------
// Gradients.
double total_loss(GptModel& model, const Batch& batch) {
  loom::model::ModelOutput out = model.forward(batch);
  return (out.loss_sum / static_cast<double>(out.num_tokens) + out.aux_loss).item<double>();
}

class FiniteDifferences : public ::testing::TestWithParam<std::string> {};

TEST_P(FiniteDifferences, GradientsMatchCentralDifferences) {
  GptModel model(f64_spec(tiny_config(GetParam())), 5);
  Batch batch = random_batch(2, 5, 13, 17);
  model.zero_grad();
  loom::model::ModelOutput out = model.forward(batch);
  (out.loss_sum / static_cast<double>(out.num_tokens) + out.aux_loss).backward();
  std::mt19937_64 rng(3);
  const double h = 1e-6;
  int checked = 0;
  for (auto& p : model.parameters()) {
    at::Tensor flat = p.tensor.detach().view({-1});
    at::Tensor grad =
        p.tensor.grad().defined() ? p.tensor.grad().reshape({-1}) : at::zeros_like(flat);
    for (int r = 0; r < 3; ++r) {
      const int64_t i = static_cast<int64_t>(rng() % static_cast<uint64_t>(flat.numel()));
      const double orig = flat[i].item<double>();
      flat[i] = orig + h;
      const double up = total_loss(model, batch);
      flat[i] = orig - h;
      const double down = total_loss(model, batch);
      flat[i] = orig;
      const double fd = (up - down) / (2 * h);
      const double ad = grad[i].item<double>();
      EXPECT_NEAR(ad, fd, 1e-6 * std::abs(fd) + 1e-9) << p.name << "[" << i << "]";
      ++checked;
    }
  }
  EXPECT_GT(checked, 30);
}

INSTANTIATE_TEST_SUITE_P(Arch, FiniteDifferences,
                         ::testing::Values("llama", "gpt2", "moe_shared", "moe_sigmoid"));

// Every parameter of `a` and `b` has a gradient, or neither, and they differ by less than `tol`.
void expect_same_grads(const GptModel& a, const GptModel& b, const std::string& what, double tol) {
  for (size_t i = 0; i < a.parameters().size(); ++i) {
    const auto& ga = a.parameters()[i].tensor.grad();
    const auto& gb = b.parameters()[i].tensor.grad();
    ASSERT_EQ(ga.defined(), gb.defined()) << what << " " << a.parameters()[i].name;
    if (ga.defined()) {
      EXPECT_LT((ga - gb).abs().max().item<double>(), tol) << what << " " << a.parameters()[i].name;
    }
  }
}

TEST(Recompute, SameLossAndGradientsAsStoredActivations) {
  for (const std::string kind : {"llama", "moe_shared"}) {
    ModelSpec plain = f64_spec(tiny_config(kind));
    ModelSpec recompute = plain;
    recompute.recompute = true;
    GptModel a(plain, 4), b(recompute, 4);
    Batch batch = random_batch(2, 6, 13, 2);
    for (GptModel* m : {&a, &b}) {
      m->zero_grad();
      auto out = m->forward(batch);
      (out.loss_sum / 12.0 + out.aux_loss).backward();
    }
    // The same ops on the same inputs: equal up to BLAS rounding (float64).
    expect_same_grads(a, b, kind, 1e-13);
  }
}

// ---- activation offload (Note: activation offload) ----

TEST(ActivationOffload, SameLossAndGradientsAsActivationsKeptOnTheDevice) {
  // The offloaded blocks' saved tensors are host copies that come back for backward: the same
  // numbers, so the same loss and gradients (float64; the same ops on bit-identical inputs, up to
  // BLAS rounding at most). The counters prove the tensors went through the store.
  for (const std::string kind : {"llama", "moe_shared"}) {
    for (const bool recompute : {false, true}) {
      for (const double r : {0.5, 1.0}) {
        ModelSpec spec = f64_spec(tiny_config(kind));
        spec.recompute = recompute;
        const std::string what = kind + (recompute ? " recompute" : "") + " r " + std::to_string(r);
        GptModel a(spec, 4), b(spec, 4);
        Batch batch = random_batch(2, 6, 13, 2);
        Batch offloaded = batch;
        offloaded.offload = r;
        a.zero_grad();
        b.zero_grad();
        auto out_a = a.forward(batch);
        (out_a.loss_sum / 12.0 + out_a.aux_loss).backward();
        const auto before = loom::model::offload_counters();
        auto out_b = b.forward(offloaded);
        const auto packed = loom::model::offload_counters();
        (out_b.loss_sum / 12.0 + out_b.aux_loss).backward();
        const auto after = loom::model::offload_counters();
        // Some of the blocks' saved tensors went to the host, each came back once, the parameters
        // stayed.
        EXPECT_GT(packed.packed - before.packed, recompute ? 0 : 10) << what;
        if (recompute) {  // a recomputed block saves its input; the RoPE tables stay
          EXPECT_EQ(packed.packed - before.packed,
                    loom::model::offloaded_layers(r, spec.num_layers))
              << what;
        }
        EXPECT_GT(packed.packed_bytes - before.packed_bytes, 0) << what;
        if (!recompute) {  // a recomputed block saves no parameter
          EXPECT_GT(packed.kept - before.kept, 0) << what;
        }
        EXPECT_EQ(after.reloaded - before.reloaded, packed.packed - before.packed) << what;
        EXPECT_EQ(after.packed, packed.packed) << what << ": backward saved into a store";
        EXPECT_EQ(out_a.loss_sum.item<double>(), out_b.loss_sum.item<double>()) << what;
        expect_same_grads(a, b, what, 1e-13);
      }
    }
  }
  // Half the blocks move half as much as all of them (the first block of two; the same shapes).
  ModelSpec spec = f64_spec(tiny_config("llama"));
  ASSERT_EQ(spec.num_layers, 2);
  GptModel m(spec, 4);
  auto packed_by = [&](double r) {
    Batch batch = random_batch(2, 6, 13, 2);
    batch.offload = r;
    const auto before = loom::model::offload_counters();
    auto out = m.forward(batch);
    const auto after = loom::model::offload_counters();
    if (out.loss_sum.requires_grad()) out.loss_sum.backward();
    return after.packed - before.packed;
  };
  EXPECT_EQ(2 * packed_by(0.5), packed_by(1.0));
  EXPECT_EQ(packed_by(0.0), 0);
  {
    // Evaluation keeps nothing for backward, so nothing moves.
    at::NoGradGuard no_grad;
    EXPECT_EQ(packed_by(1.0), 0);
  }
  EXPECT_EQ(loom::model::offloaded_layers(0.25, 2), 1);  // rounded to the nearest, halves up
  EXPECT_EQ(loom::model::offloaded_layers(0.2, 2), 0);
  EXPECT_EQ(loom::model::offloaded_layers(0.7, 10), 7);
  EXPECT_THROW(loom::model::offloaded_layers(1.5, 2), std::exception);
}

TEST(ActivationOffload, ParametersTheirCastsAndViewsAndSharedInputsStay) {
  loom::model::OffloadKeep keep;
  at::Tensor w = at::randn({4, 3}, at::kDouble).requires_grad_(true);
  at::Tensor rope = at::randn({6, 2}, at::kDouble);
  keep.parameters = std::make_shared<std::unordered_set<const c10::TensorImpl*>>(
      std::unordered_set<const c10::TensorImpl*>{w.unsafeGetTensorImpl()});
  keep.inputs = {rope.unsafeGetTensorImpl()};
  EXPECT_TRUE(keep.keeps(w));
  EXPECT_TRUE(keep.keeps(w.select(0, 1)));                    // an expert's slice
  EXPECT_TRUE(keep.keeps(w.to(at::kFloat)));                  // a weight in the compute dtype
  EXPECT_TRUE(keep.keeps(w.to(at::kFloat).narrow(0, 1, 2)));  // a view of the cast
  EXPECT_TRUE(keep.keeps(rope));
  EXPECT_TRUE(keep.keeps(rope.narrow(0, 0, 3)));
  // Activations move: computed ones, and a pipeline stage's received input (a leaf that requires
  // grad, but not a parameter).
  EXPECT_FALSE(keep.keeps(w * 2));
  EXPECT_FALSE(keep.keeps((w * 2).to(at::kFloat)));
  EXPECT_FALSE(keep.keeps(at::randn({4, 3}, at::kDouble).requires_grad_(true)));
  EXPECT_FALSE(keep.keeps(at::randn({4, 3}, at::kDouble)));

  // A later pipeline stage under recomputation: its one block's checkpoint is the received input,
  // which moves (and the gradient that reaches it is the same).
  ModelSpec spec = f64_spec(tiny_config("llama"));
  spec.recompute = true;
  loom::model::StageLayout last{1, 1, /*pre_process=*/false, /*post_process=*/true};
  GptModel stage(spec, 4, at::kCPU, {}, 128, last);
  Batch batch = random_batch(2, 6, 13, 2);
  at::Tensor input = at::randn({6, 2, spec.hidden}, at::kDouble).requires_grad_(true);
  at::Tensor grads[2];
  for (const double r : {0.0, 1.0}) {
    batch.offload = r;
    const auto before = loom::model::offload_counters();
    auto out = stage.forward_stage(batch, input);
    EXPECT_EQ(loom::model::offload_counters().packed - before.packed, r > 0 ? 1 : 0);
    input.mutable_grad() = at::Tensor();
    out.loss.loss_sum.backward();
    grads[r > 0] = input.grad().clone();
  }
  EXPECT_LT((grads[0] - grads[1]).abs().max().item<double>(), 1e-13);
}

TEST(ActivationOffload, StoreHoldsCopiesSharesRepeatsAndPrefetchesTheBlockBefore) {
  using loom::model::OffloadScope;
  using loom::model::OffloadStore;
  at::Tensor w = at::randn({5}, at::kDouble).requires_grad_(true);
  at::Tensor x = at::randn({5}, at::kDouble);
  auto earlier = std::make_shared<OffloadStore>();
  auto later = std::make_shared<OffloadStore>(earlier);  // backward reaches `earlier` next
  at::Tensor h, y;
  {
    OffloadScope scope(earlier);
    h = at::tanh(w * x);  // saves x (the factor of w; a leaf without grad: copied) and h
  }
  {
    OffloadScope scope(later);
    y = (h * h).sum();  // saves h twice: one copy
  }
  EXPECT_EQ(later->size(), 1u);
  EXPECT_EQ(earlier->size(), 2u);
  const at::Tensor h_before = h.detach().clone();
  const at::Tensor x0 = x.clone();
  // The graph holds copies: overwriting the tensors the forward made does not reach backward
  // (without offload this in-place change would be an autograd error).
  h.detach().zero_();
  x.zero_();
  const auto before = loom::model::offload_counters();
  y.backward();
  const auto after = loom::model::offload_counters();
  // d/dw sum tanh(w x)^2 = 2 tanh(w x) (1 - tanh(w x)^2) x, from the saved values.
  const at::Tensor expected = 2 * h_before * (1 - h_before * h_before) * x0;
  EXPECT_TRUE(at::allclose(w.grad(), expected, 1e-10, 1e-12));
  EXPECT_EQ(after.reloaded - before.reloaded,
            static_cast<int64_t>(later->size() + earlier->size()));
  EXPECT_EQ(after.prefetched - before.prefetched, static_cast<int64_t>(earlier->size()));
  // A tensor changed in place since it was saved is copied again, not shared.
  auto store = std::make_shared<OffloadStore>();
  at::Tensor t = at::ones({3}, at::kDouble);
  const size_t i0 = store->pack(t);
  EXPECT_EQ(store->pack(t), i0);
  t.add_(1);
  const size_t i1 = store->pack(t);
  EXPECT_NE(i1, i0);
  EXPECT_EQ(store->unpack(i0).sum().item<double>(), 3.0);
  EXPECT_EQ(store->unpack(i1).sum().item<double>(), 6.0);
  EXPECT_NE(store->unpack(i1).data_ptr(), t.data_ptr());
  EXPECT_EQ(store->host_bytes(), 2 * 3 * 8);
  EXPECT_THROW(store->pack(t.mul(2)), std::exception);  // saving after backward began
}

// ---- balance losses and the expert bias (Note: balance losses) ----

void expect_config_error(const loom::config::ModelConfig& c, const std::string& needle);

TEST(MoeBalance, SequenceLossOverPackedDocumentsMatchesReference) {
  GptModel model(f64_spec(tiny_config("moe_sequence")), 3);
  Batch full = random_batch(2, 9, 13, 5);
  // Row 0: documents of 4, 2 and 3 tokens; row 1: 1 and 8.
  Batch packed = loom::model::packed_batch(full.tokens, full.targets, {{0, 4, 6, 9}, {0, 1, 9}});
  double aux_ref = 0;
  const auto ref = Ref(model).logits(packed, &aux_ref);
  const auto out = model.forward(packed);
  EXPECT_LT(max_diff(model.logits(packed), ref), 1e-10);
  EXPECT_NEAR(out.aux_loss.item<double>(), aux_ref, 1e-12);
  // Per sequence, not per micro-batch: the micro-batch loss of the same model differs.
  auto c = tiny_config("moe");
  GptModel micro(f64_spec(c), 3);
  EXPECT_GT(std::abs(micro.forward(packed).aux_loss.item<double>() - aux_ref), 1e-6);
}

TEST(MoeBalance, ExpertBiasSelectsAndMovesByTheClosedForm) {
  GptModel model(f64_spec(tiny_config("moe_bias")), 9);
  const auto layers = model.moe_layers();
  ASSERT_EQ(layers.size(), 2U);
  const double rate = 0.5;
  std::vector<Vec> first_counts;
  for (int step = 0; step < 3; ++step) {
    Batch batch = random_batch(2, 6, 13, 40 + static_cast<uint64_t>(step));
    loom::model::begin_moe_step(layers);
    std::vector<Vec> bias_before;
    for (auto* m : layers) bias_before.push_back(to_vec(m->expert_bias));
    auto out = model.forward(batch);  // a training forward (gradient mode on)
    double aux_ref = 0;
    Ref ref(model);
    at::Tensor logits;
    {
      at::NoGradGuard no_grad;  // an evaluation forward: not counted in the step's loads
      logits = model.logits(batch);
    }
    EXPECT_LT(max_diff(logits, ref.logits(batch, &aux_ref)), 1e-10) << "step " << step;
    EXPECT_NEAR(out.aux_loss.item<double>(), aux_ref, 1e-12) << "step " << step;
    const auto step_stats = loom::model::end_moe_step(layers);
    ASSERT_EQ(step_stats.size(), layers.size());
    std::vector<at::Tensor> loads;
    for (const auto& st : step_stats) loads.push_back(st.loads);
    for (size_t l = 0; l < layers.size(); ++l) {
      const Vec counts = ref.record.at(layers[l]->name()).counts;
      if (step == 0) first_counts.push_back(counts);
      EXPECT_EQ(to_vec(loads[l]), counts) << "step " << step << " layer " << l;
      const double mean = std::accumulate(counts.begin(), counts.end(), 0.0) / counts.size();
      const Vec bias = to_vec(layers[l]->expert_bias);
      for (size_t e = 0; e < counts.size(); ++e) {
        const double sign = mean > counts[e] ? 1.0 : mean < counts[e] ? -1.0 : 0.0;
        EXPECT_DOUBLE_EQ(bias[e], bias_before[l][e] + rate * sign) << "layer " << l << " e " << e;
      }
    }
  }
  // The bias is not a parameter: no gradient, not in the optimizer's list.
  for (auto* m : layers) EXPECT_EQ(model.find(m->name() + ".expert_bias"), nullptr);
}

// [Note: expert specialisation] The step's [sources, E] table of each layer counts, per source,
// the experts the reference chose for that source's real tokens: over micro-batches, once under
// recomputation, not for padding, not in evaluation; summed over sources it is the step's loads.
TEST(MoeBalance, SourceTablesCountEachSourcesExperts) {
  for (const bool recompute : {false, true}) {
    ModelSpec spec = f64_spec(tiny_config("moe_groups_sum"));
    spec.recompute = recompute;
    GptModel model(spec, 21);
    const auto layers = model.moe_layers();
    const int64_t sources = 3, e = spec.moe.num_experts;
    for (auto* m : layers) m->set_sources(sources);
    std::vector<Batch> mbs = {random_batch(2, 6, 13, 80), random_batch(3, 4, 13, 81)};
    // Sources by position: row r, position p -> (r + p / 2) % 3; the second micro-batch's last
    // position of row 1 is padding.
    for (auto& b : mbs) {
      b.source = at::empty({b.batch_size(), b.seq_len()}, at::kLong);
      for (int64_t r = 0; r < b.batch_size(); ++r)
        for (int64_t p = 0; p < b.seq_len(); ++p) b.source[r][p] = (r + p / 2) % sources;
    }
    mbs[1].padding = at::zeros({3, 4}, at::kBool);
    mbs[1].padding[1][3] = true;
    std::map<std::string, std::vector<double>> want;  // per layer: [sources * E]
    loom::model::begin_moe_step(layers);
    for (const Batch& b : mbs) {
      auto out = model.forward(b);
      (out.loss_sum + out.aux_loss).backward();
      {
        at::NoGradGuard no_grad;  // an evaluation forward: counted nowhere
        (void)model.forward(b);
      }
      double unused = 0;
      Ref ref(model);
      ref.logits(b, &unused);
      for (const auto& [name, rec] : ref.record) {
        auto& table = want[name];
        table.resize(static_cast<size_t>(sources * e), 0.0);
        const int64_t rows = b.batch_size();
        for (size_t t = 0; t < rec.chosen.size(); ++t) {  // t = position * rows + row
          const int64_t row = static_cast<int64_t>(t) % rows, pos = static_cast<int64_t>(t) / rows;
          if (b.padding.defined() && b.padding[row][pos].item<bool>()) continue;
          const int64_t src = b.source[row][pos].item<int64_t>();
          for (int64_t x : rec.chosen[t]) table[static_cast<size_t>(src * e + x)] += 1;
        }
      }
    }
    const auto step_stats = loom::model::end_moe_step(layers);
    ASSERT_EQ(step_stats.size(), layers.size());
    for (size_t l = 0; l < layers.size(); ++l) {
      const at::Tensor& table = step_stats[l].sources;
      ASSERT_TRUE(table.defined());
      ASSERT_EQ(table.sizes(), (std::vector<int64_t>{sources, e}));
      EXPECT_EQ(to_vec(table.reshape({-1})), want.at(layers[l]->name()))
          << "layer " << l << (recompute ? " recomputed" : "");
      EXPECT_EQ(to_vec(table.sum(0)), to_vec(step_stats[l].loads)) << "layer " << l;
    }
    // One source: no table.
    for (auto* m : layers) m->set_sources(1);
    loom::model::begin_moe_step(layers);
    (void)model.forward(mbs[0]);
    for (const auto& st : loom::model::end_moe_step(layers)) EXPECT_FALSE(st.sources.defined());
  }
}

// GLOBAL_BATCH over M micro-batches of one process: micro-batch m uses the counts of micro-batches
// 1..m over their tokens, against its own probabilities (the buffer formula, written out here from
// the reference's counts and probability sums).
TEST(MoeBalance, GlobalBatchBufferFormulaOverMicroBatches) {
  auto c = tiny_config("moe");
  c.mutable_moe()->set_aux_loss_type(loom::config::MoeConfig::GLOBAL_BATCH);
  c.mutable_moe()->set_z_loss_coeff(0);
  ModelSpec plain = f64_spec(c), recompute = plain;
  recompute.recompute = true;
  GptModel a(plain, 5), b(recompute, 5);
  const std::vector<Batch> mbs = {random_batch(2, 6, 13, 60), random_batch(1, 5, 13, 61),
                                  random_batch(3, 4, 13, 62)};
  const auto& m = plain.moe;
  const double coeff = m.aux_loss_coeff * m.num_experts / static_cast<double>(m.top_k);
  std::map<std::string, std::pair<Vec, double>> cum;  // per layer: counts and tokens so far
  std::vector<double> aux_a;
  loom::model::begin_moe_step(a.moe_layers());
  for (size_t i = 0; i < mbs.size(); ++i) {
    auto out = a.forward(mbs[i]);
    aux_a.push_back(out.aux_loss.item<double>());
    out.aux_loss.backward();
    double unused = 0;
    Ref ref(a);
    ref.logits(mbs[i], &unused);
    double expected = 0;
    for (const auto& [name, rec] : ref.record) {
      auto& [counts, tokens] = cum[name];
      counts.resize(rec.counts.size(), 0.0);
      for (size_t e = 0; e < counts.size(); ++e) counts[e] += rec.counts[e];
      tokens += rec.tokens;
      for (size_t e = 0; e < counts.size(); ++e)
        expected += coeff * counts[e] / tokens * rec.psum[e] / rec.tokens;
    }
    EXPECT_NEAR(aux_a.back(), expected, 1e-12) << "micro-batch " << i;
    if (i == 0) {  // one micro-batch: the micro-batch loss itself
      auto mc = tiny_config("moe");
      mc.mutable_moe()->set_z_loss_coeff(0);
      GptModel m0(f64_spec(mc), 5);
      EXPECT_NEAR(aux_a.back(), m0.forward(mbs[0]).aux_loss.item<double>(), 1e-12);
    }
  }
  // Recomputed blocks reuse the first forward's counts (no second count, no drift): the same
  // values and gradients.
  loom::model::begin_moe_step(b.moe_layers());
  for (size_t i = 0; i < mbs.size(); ++i) {
    auto out = b.forward(mbs[i]);
    EXPECT_NEAR(out.aux_loss.item<double>(), aux_a[i], 1e-13) << "micro-batch " << i;
    out.aux_loss.backward();
  }
  for (size_t i = 0; i < a.parameters().size(); ++i) {
    // (An expert's weights get no gradient from the balance loss: undefined, or recomputation's
    // zeros.)
    const at::Tensor& t = a.parameters()[i].tensor;
    const at::Tensor ga = t.grad().defined() ? t.grad() : at::zeros_like(t);
    const at::Tensor& u = b.parameters()[i].tensor;
    const at::Tensor gb = u.grad().defined() ? u.grad() : at::zeros_like(u);
    EXPECT_LT((ga - gb).abs().max().item<double>(), 1e-13) << a.parameters()[i].name;
  }
  // A new step starts a new buffer.
  loom::model::begin_moe_step(a.moe_layers());
  GptModel fresh(plain, 5);
  loom::model::begin_moe_step(fresh.moe_layers());
  EXPECT_NEAR(a.forward(mbs[1]).aux_loss.item<double>(),
              fresh.forward(mbs[1]).aux_loss.item<double>(), 1e-12);
}

TEST(MoeBalance, RouterOptionErrorsNameTheFields) {
  auto c = tiny_config("moe");
  c.mutable_moe()->set_num_groups(3);
  c.mutable_moe()->set_topk_groups(1);
  expect_config_error(
      c, "model.moe.num_groups = 3 does not divide model.moe.num_experts = 4 (4 % 3 = 1)");
  c = tiny_config("moe");
  c.mutable_moe()->set_topk_groups(1);
  expect_config_error(c, "model.moe.topk_groups = 1 needs model.moe.num_groups > 1");
  c = tiny_config("moe");
  c.mutable_moe()->set_num_groups(2);
  c.mutable_moe()->set_topk_groups(3);
  expect_config_error(c, "model.moe.topk_groups must be in [1, model.moe.num_groups = 2], got 3");
  c = tiny_config("moe");
  c.mutable_moe()->set_bias_update_rate(-1);
  expect_config_error(c, "'model.moe.bias_update_rate' must be >= 0");
}

TEST(MixedPrecision, Bf16ComputeStaysCloseToFp32) {
  for (const std::string kind : {"llama", "moe"}) {
    auto c = tiny_config(kind);
    c.mutable_moe()->set_capacity_factor(0);
    ModelSpec s32 = ModelSpec::from_config(c);
    c.set_precision(loom::config::ModelConfig::BF16);
    ModelSpec s16 = ModelSpec::from_config(c);
    GptModel a(s32, 8), b(s16, 8);
    Batch batch = random_batch(2, 6, 13, 9);
    auto la = a.forward(batch), lb = b.forward(batch);
    EXPECT_EQ(lb.loss_sum.scalar_type(), at::kFloat);
    EXPECT_EQ(b.parameters()[0].tensor.scalar_type(), at::kFloat);  // fp32 master weights
    // bf16 has 8 bits of mantissa: ~0.4% relative per op; the summed loss stays within 3%.
    EXPECT_NEAR(lb.loss_sum.item<double>(), la.loss_sum.item<double>(),
                0.03 * la.loss_sum.item<double>())
        << kind;
    lb.loss_sum.backward();
    EXPECT_EQ(b.parameters()[0].tensor.grad().scalar_type(), at::kFloat);
  }
}

// ---------------------------------------------------------------------------------------------
// Bad model configs.
void expect_config_error(const loom::config::ModelConfig& c, const std::string& needle) {
  try {
    (void)ModelSpec::from_config(c);
    ADD_FAILURE() << "expected a config error containing '" << needle << "'";
  } catch (const loom::Error& e) {
    EXPECT_EQ(e.kind(), loom::ErrorKind::kConfig);
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}

TEST(ModelSpec, InconsistentConfigsGetClearErrors) {
  auto c = tiny_config("llama");
  c.set_num_heads(3);
  expect_config_error(c, "'model.num_heads' (3) must divide model.hidden_size (8)");
  c = tiny_config("llama");
  c.set_num_kv_heads(3);
  expect_config_error(c, "'model.num_kv_heads' (3) must divide model.num_heads (4)");
  c = tiny_config("moe");
  c.mutable_moe()->set_top_k(5);
  expect_config_error(c, "'model.moe.top_k' must be in [1, model.moe.num_experts = 4], got 5");
  c = tiny_config("moe");
  c.mutable_moe()->set_first_dense_layers(2);
  expect_config_error(c, "no layer would be MoE");
  c = tiny_config("llama");
  c.set_hidden_size(12);
  c.set_num_heads(4);
  c.set_num_kv_heads(4);  // head_dim 3: RoPE needs it even
  expect_config_error(c, "RoPE needs an even head dimension");
  c = tiny_config("llama");
  c.set_vocab_size(0);
  expect_config_error(c, "'model.vocab_size' must be >= 1, got 0");
  c = tiny_config("moe");
  c.set_arch(loom::config::ModelConfig::GPT2);
  expect_config_error(c, "MoE experts are SwiGLU");
}

TEST(ModelSpec, SequenceLongerThanMaxIsRefused) {
  GptModel model(f64_spec(tiny_config("llama")), 1);
  EXPECT_THROW((void)model.forward(random_batch(1, 17, 13, 1)), loom::Error);
}

TEST(ModelSpec, FlopsPerTokenMatchesHandCount) {
  auto c = tiny_config("llama");
  ModelSpec s = ModelSpec::from_config(c);
  // Per layer: qkv (4 + 2*2) * 2 * 8 = 128, out 8*8 = 64, fc1 24*8 = 192, fc2 8*12 = 96 -> 480
  // weights; head 13 * 8 = 104. Attention: 12 * L * nh * d * S.
  const double weights = 2 * 480 + 104;
  EXPECT_DOUBLE_EQ(s.flops_per_token(10), 6 * weights + 12.0 * 2 * 4 * 2 * 10);
  auto m = tiny_config("moe");
  ModelSpec sm = ModelSpec::from_config(m);
  // MoE layers: router 4*8, top-2 of experts 3*6*8 each.
  const double moe_weights = 2 * (128 + 64 + 4 * 8 + 2 * 3 * 6 * 8) + 104;
  EXPECT_DOUBLE_EQ(sm.flops_per_token(10), 6 * moe_weights + 12.0 * 2 * 4 * 2 * 10);
  // A step of sequences of lengths 3, 5 and 10 (18 tokens): attention counts each one's square.
  EXPECT_DOUBLE_EQ(s.step_flops(18, 9 + 25 + 100),
                   6 * weights * 18 + 12.0 * 2 * 4 * 2 * (9 + 25 + 100));
  EXPECT_DOUBLE_EQ(s.step_flops(40, 4 * 100), 40 * s.flops_per_token(10));  // four windows of 10
}

}  // namespace

namespace {
// The shipped recipes parse, resolve, and have the parameter counts of the models they copy
// (published figures; a wrong FFN rule, GQA size or tie would change them).
TEST(Configs, RecipesResolveToTheirPublishedSizes) {
  struct Expect {
    const char* file;
    int64_t params;
    int64_t active;
  };
  const Expect cases[] = {
      {"gpt2_124m.pbtxt", 124475904, 124475904},        // GPT-2 small with vocab padded to 50304
      {"llama_1b.pbtxt", 1235814400, 1235814400},       // Llama 3.2 1B
      {"llama_8b.pbtxt", 8030261248, 8030261248},       // Llama 3 8B
      {"moe_8x_top2.pbtxt", 46702792704, 12879925248},  // Mixtral 8x7B
      {"tiny_gpt.pbtxt", 0, 0},
      {"tiny_moe.pbtxt", 0, 0},
  };
  for (const auto& c : cases) {
    loom::config::JobConfig job;
    loom::config::load_text_file(std::string(LOOM_SOURCE_DIR) + "/configs/" + c.file, &job);
    loom::config::validate(job);
    ModelSpec s = ModelSpec::from_config(job.model());
    EXPECT_LE(job.train().seq_len(), s.max_seq_len) << c.file;
    if (c.params > 0) {
      EXPECT_EQ(s.num_parameters(), c.params) << c.file;
      EXPECT_EQ(s.num_active_parameters(), c.active) << c.file;
    }
  }
}
}  // namespace

// [Note: pipeline stages]: the model cut into stages and chained by hand (each stage's input a
// fresh leaf, its gradient handed back) computes the same loss and gradients as the whole model.
// float64; the only difference allowed is the tied embedding's two gradient contributions being
// summed in a different order (1e-13).
TEST(PipelineStages, ChainedStagesEqualTheWholeModel) {
  struct Case {
    std::string kind;
    int pp, vp;
    int64_t first, last, layers;
    bool recompute;
  };
  const std::vector<Case> cases = {
      {"llama", 2, 1, -1, -1, 4, false},    {"llama", 4, 1, -1, -1, 4, false},
      {"llama", 2, 2, -1, -1, 4, true},     {"gpt2", 2, 1, -1, -1, 2, false},
      {"gpt2", 3, 1, 0, 0, 3, false},       {"moe_shared", 2, 1, -1, -1, 4, false},
      {"moe_sigmoid", 3, 1, 2, 1, 6, true}, {"llama", 2, 2, 0, 3, 5, false}};
  for (const Case& c : cases) {
    auto cfg = tiny_config(c.kind);
    cfg.set_num_layers(c.layers);
    ModelSpec spec = f64_spec(cfg);
    spec.recompute = c.recompute;
    const std::string what = c.kind + " pp" + std::to_string(c.pp) + " vp" + std::to_string(c.vp);
    GptModel whole(spec, 9);
    Batch batch = random_batch(2, 6, 13, 4);
    whole.zero_grad();
    auto ref = whole.forward(batch);
    (ref.loss_sum / 12.0 + ref.aux_loss).backward();

    const auto layouts = loom::model::partition_stages(c.layers, c.pp, c.vp, c.first, c.last);
    std::vector<std::unique_ptr<GptModel>> stages;
    for (const auto& l : layouts)
      stages.push_back(
          std::make_unique<GptModel>(spec, 9, at::kCPU, loom::parallel::TensorParallel{}, 128, l));
    // Forward through the chain; every stage's input is a new leaf, as after a receive.
    std::vector<at::Tensor> inputs, outputs, auxes;
    at::Tensor x;
    double aux_total = 0;
    GptModel::StageOutput last;
    for (auto& st : stages) {
      st->zero_grad();
      at::Tensor in = x.defined() ? x.detach().requires_grad_(true) : at::Tensor();
      last = st->forward_stage(batch, in);
      inputs.push_back(in);
      outputs.push_back(last.hidden);
      auxes.push_back(last.loss.aux_loss);
      aux_total += last.loss.aux_loss.item<double>();
      x = last.hidden;
    }
    EXPECT_EQ(last.loss.loss_sum.item<double>(), ref.loss_sum.item<double>()) << what;
    EXPECT_NEAR(aux_total, ref.aux_loss.item<double>(), 1e-15) << what;
    // Backward from the last stage to the first, handing each input's gradient back.
    at::Tensor grad;
    for (size_t k = stages.size(); k-- > 0;) {
      std::vector<at::Tensor> outs, grads;
      if (k + 1 == stages.size()) {
        outs.push_back(last.loss.loss_sum / 12.0 + auxes[k]);
        grads.push_back(at::ones({}, at::kDouble));
      } else {
        outs.push_back(outputs[k]);
        grads.push_back(grad);
        if (auxes[k].requires_grad()) {
          outs.push_back(auxes[k]);
          grads.push_back(at::ones({}, at::kDouble));
        }
      }
      torch::autograd::backward(outs, grads);
      if (inputs[k].defined()) grad = inputs[k].grad();
    }
    // Every whole-model parameter lives on exactly one stage, except a tied embedding (first and
    // last stage, gradients summed).
    for (const auto& p : whole.parameters()) {
      at::Tensor sum;
      int holders = 0;
      for (auto& st : stages) {
        if (const auto* q = st->find(p.name)) {
          EXPECT_TRUE(at::equal(q->tensor, p.tensor)) << what << ": initial " << p.name;
          at::Tensor g = q->tensor.grad().defined() ? q->tensor.grad() : at::zeros_like(q->tensor);
          sum = sum.defined() ? sum + g : g;
          ++holders;
        }
      }
      const bool tied_copy =
          p.name == "embedding.weight" && spec.tie_embeddings && stages.size() > 1;
      EXPECT_EQ(holders, tied_copy ? 2 : 1) << what << ": " << p.name;
      ASSERT_TRUE(sum.defined()) << what << ": " << p.name;
      at::Tensor g = p.tensor.grad().defined() ? p.tensor.grad() : at::zeros_like(p.tensor);
      EXPECT_LT((sum - g).abs().max().item<double>(), 1e-13) << what << ": gradient of " << p.name;
    }
  }
}

TEST(PipelineStages, PartitionRulesAndErrors) {
  auto layers = [](const std::vector<loom::model::StageLayout>& v) {
    std::string s;
    for (const auto& l : v)
      s += std::to_string(l.num_layers) + (l.pre_process ? "e" : "") + (l.post_process ? "h" : "") +
           " ";
    return s;
  };
  EXPECT_EQ(layers(loom::model::partition_stages(8, 4, 1)), "2e 2 2 2h ");
  EXPECT_EQ(layers(loom::model::partition_stages(8, 2, 2)), "2e 2 2 2h ");  // virtual stages 0..3
  EXPECT_EQ(layers(loom::model::partition_stages(9, 4, 1, 1, 2)), "1e 3 3 2h ");
  EXPECT_EQ(layers(loom::model::partition_stages(6, 4, 1, 0, 0)), "0e 3 3 0h ");
  EXPECT_EQ(loom::model::partition_stages(8, 4, 1)[2].first_layer, 4);
  auto expect_config = [](auto&& fn, const std::string& needle) {
    try {
      fn();
      ADD_FAILURE() << "accepted: " << needle;
    } catch (const loom::Error& e) {
      EXPECT_EQ(e.kind(), loom::ErrorKind::kConfig) << e.what();
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  expect_config([] { loom::model::partition_stages(7, 2, 1); },
                "model.num_layers = 7 does not split over the pipeline");
  expect_config([] { loom::model::partition_stages(8, 3, 1, 1, -1); }, "7 % 2 = 1");
  expect_config([] { loom::model::partition_stages(4, 2, 1, 3, 3); },
                "exceed model.num_layers = 4");
  expect_config([] { loom::model::partition_stages(2, 4, 1); }, "does not split");
  expect_config([] { loom::model::partition_stages(4, 3, 1, 2, 2); },
                "virtual pipeline stage 1 of 3 would hold no layers");
}
