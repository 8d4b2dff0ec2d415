// The pipeline runner ([Note: pipeline runner]) against the single-process model: the world is the
// pipeline; each rank builds its model chunks, every schedule runs one step of m micro-batches, and
// the loss and every parameter's gradient equal the whole model's (float64, 1e-12 relative: only
// the order in which micro-batches' gradients accumulate differs).
#include <gtest/gtest.h>

#include <ATen/CPUGeneratorImpl.h>

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "loom/core/config.h"
#include "loom/core/error.h"
#include "loom/model/gpt.h"
#include "loom/parallel/pipeline.h"
#include "test_world.h"

namespace {

using loom::model::Batch;
using loom::model::GptModel;
using loom::model::ModelSpec;
using namespace loom::parallel::pipeline;

ModelSpec spec_of(const std::string& kind, int64_t layers) {
  loom::config::ModelConfig c;
  c.set_vocab_size(17);
  c.set_hidden_size(8);
  c.set_num_layers(layers);
  c.set_num_heads(4);
  c.set_num_kv_heads(2);
  c.set_ffn_hidden_size(12);
  c.set_max_seq_len(16);
  c.set_init_std(0.3);
  if (kind == "gpt2") {
    c.set_arch(loom::config::ModelConfig::GPT2);
    c.set_num_kv_heads(0);
  }
  if (kind == "moe") {
    auto* m = c.mutable_moe();
    m->set_num_experts(4);
    m->set_top_k(2);
    m->set_expert_ffn_hidden_size(6);
    m->set_aux_loss_coeff(0.1);
    m->set_z_loss_coeff(0.01);
  }
  ModelSpec s = ModelSpec::from_config(c);
  s.param_dtype = at::kDouble;
  return s;
}

// Micro-batch `mb`: variable sequence length (4, 6, 8, ...) so shapes change between micro-batches.
Batch micro_batch(int mb, int64_t vocab) {
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(100 + mb);
  const int64_t s = 4 + 2 * (mb % 3);
  Batch b;
  b.tokens = at::randint(vocab, {2, s}, gen, at::kLong);
  b.targets = at::randint(vocab, {2, s}, gen, at::kLong);
  return b;
}

double rel(const at::Tensor& a, const at::Tensor& b) {
  return (a - b).abs().max().item<double>() / std::max(1e-30, b.abs().max().item<double>());
}

void expect_pipeline_matches(const std::string& kind, ScheduleKind sched, int v, int m) {
  auto world = loom::testing::world();
  const int p = world->size(), r = world->rank();
  const int64_t layers = 2 * p * v;
  ModelSpec spec = spec_of(kind, layers);
  const std::string what = kind + " " + schedule_name(sched) + " p" + std::to_string(p) + " v" +
                           std::to_string(v) + " m" + std::to_string(m);
  // The objective: sum over micro-batches of loss_sum / (all loss tokens) + aux / m.
  int64_t tokens = 0;
  for (int mb = 0; mb < m; ++mb) tokens += micro_batch(mb, 17).num_loss_tokens();
  const double loss_scale = 1.0 / static_cast<double>(tokens), aux_scale = 1.0 / m;

  GptModel whole(spec, 3);
  whole.zero_grad();
  double ref_loss = 0;
  for (int mb = 0; mb < m; ++mb) {
    auto out = whole.forward(micro_batch(mb, 17));
    at::Tensor obj = out.loss_sum * loss_scale + out.aux_loss * aux_scale;
    ref_loss += out.loss_sum.item<double>();
    obj.backward();
  }

  const auto layouts = loom::model::partition_stages(layers, p, v);
  std::vector<std::unique_ptr<GptModel>> chunks;
  for (int c = 0; c < v; ++c) {
    chunks.push_back(std::make_unique<GptModel>(spec, 3, at::kCPU, loom::parallel::TensorParallel{}, 128,
                                                layouts[static_cast<size_t>(c * p + r)]));
  }
  double loss_sum = 0;
  RunnerCallbacks cb;
  cb.activation_options = at::TensorOptions().dtype(at::kDouble);
  cb.shape = [&](int mb) {
    Batch b = micro_batch(mb, 17);
    return std::vector<int64_t>{b.seq_len(), b.batch_size(), spec.hidden};
  };
  cb.parameters = [&](int c) {
    std::vector<at::Tensor> out;
    for (const auto& prm : chunks[static_cast<size_t>(c)]->parameters()) out.push_back(prm.tensor);
    return out;
  };
  cb.forward = [&](int c, int mb, const at::Tensor& input) {
    auto out = chunks[static_cast<size_t>(c)]->forward_stage(micro_batch(mb, 17), input);
    ChunkOutput co;
    co.hidden = out.hidden;
    at::Tensor aux = out.loss.aux_loss * aux_scale;
    if (!out.hidden.defined()) {
      loss_sum += out.loss.loss_sum.item<double>();
      co.loss = out.loss.loss_sum * loss_scale + aux;
    } else if (aux.requires_grad()) {
      co.loss = aux;
    }
    return co;
  };
  ScheduleOptions o;
  o.kind = sched;
  o.stages = p;
  o.chunks = v;
  o.microbatches = m;
  PipelineRunner runner(o, world);
  RunnerStats st = runner.run(cb);
  EXPECT_EQ(st.sends, st.recvs) << what;  // every message has a partner on a ring of equal counts

  at::Tensor l = at::full({1}, loss_sum, at::kDouble);
  world->all_reduce(l);
  EXPECT_LT(std::abs(l.item<double>() - ref_loss) / ref_loss, 1e-13) << what << ": loss";

  int held = 0;
  for (const auto& prm : whole.parameters()) {
    at::Tensor g = at::zeros_like(prm.tensor);
    int holders = 0;
    for (auto& ch : chunks) {
      if (const auto* q = ch->find(prm.name)) {
        if (q->tensor.grad().defined()) g = g + q->tensor.grad();
        ++holders;
      }
    }
    // A tied embedding lives on the first and the last stage: the sum of both is the gradient.
    at::Tensor n = at::full({1}, static_cast<double>(holders), at::kDouble);
    world->all_reduce(g);
    world->all_reduce(n);
    const bool tied = prm.name == "embedding.weight" && spec.tie_embeddings && p * v > 1;
    EXPECT_EQ(n.item<double>(), tied ? 2.0 : 1.0) << what << ": " << prm.name;
    at::Tensor ref = prm.tensor.grad().defined() ? prm.tensor.grad() : at::zeros_like(prm.tensor);
    EXPECT_LT(rel(g, ref), 1e-12) << what << ": gradient of " << prm.name;
    held += holders;
  }
  EXPECT_GT(held, 0) << what;
}

TEST(PipelineRunner, EveryScheduleMatchesTheWholeModel) {
  const int p = loom::testing::world()->size();
  for (const std::string kind : {"llama", "gpt2", "moe"}) {
    for (int m : {1, p, 2 * p + 1}) {
      expect_pipeline_matches(kind, ScheduleKind::kAllForwardAllBackward, 1, m);
      expect_pipeline_matches(kind, ScheduleKind::k1F1B, 1, m);
      expect_pipeline_matches(kind, ScheduleKind::kZeroBubbleH1, 1, m);
    }
    for (int m : {p, 2 * p}) expect_pipeline_matches(kind, ScheduleKind::kInterleaved1F1B, 2, m);
  }
}

}  // namespace
