// The pipeline runner ([Note: pipeline runner]) against the single-process model: the world is the
// pipeline; each rank builds its model chunks, every schedule runs one step of m micro-batches, and
// the loss and every parameter's gradient equal the whole model's (float64, 1e-12 relative: only
// the order in which micro-batches' gradients accumulate differs).
//
// The Trainer over (tp, pp, dp) layouts of 2, 4 and 8 ranks, each schedule, 1 or 2 model chunks per
// rank, GPT, GPT-2 (tied embeddings across the first and last stage) and MoE, with SP, ZeRO-1 and
// the DP gradient buckets: 20 steps' losses, aux losses, gradient norms, evaluation loss and the
// final parameters equal a single-process Trainer's (tolerances in trainer_layouts.h).
#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/utils/lambda_post_hook.h>
#include <torch/csrc/autograd/variable.h>
#include <unistd.h>

#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "loom/comm/local_communicator.h"
#include "loom/core/config.h"
#include "loom/core/error.h"
#include "loom/model/gpt.h"
#include "loom/parallel/pipeline.h"
#include "loom/parallel/weight_grad_store.h"
#include "test_world.h"
#include "trainer_fixture.h"

namespace {

using loom::model::Batch;
using loom::model::GptModel;
using loom::model::ModelSpec;
using namespace loom::parallel::pipeline;

ModelSpec spec_of(const std::string& kind, int64_t layers) {
  return loom::testing::tiny_f64_spec(layers, kind == "moe" ? 4 : 0, [&](auto& c) {
    if (kind == "gpt2") {
      c.set_arch(loom::config::ModelConfig::GPT2);
      c.set_num_kv_heads(0);
    }
  });
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

// `steps` > 1: after each step both sides take the same SGD step (the pipeline's chunks with the
// gradients it computed, a tied copy with the sum over its holders), each step on new micro-batches
// of varying lengths; every step's loss and gradients and the final parameters must agree.
void expect_pipeline_matches(const std::string& kind, ScheduleKind sched, int v, int m,
                             int steps = 1) {
  auto world = loom::testing::world();
  const int p = world->size(), r = world->rank();
  const int64_t layers = 2 * p * v;
  ModelSpec spec = spec_of(kind, layers);
  const std::string what = kind + " " + schedule_name(sched) + " p" + std::to_string(p) + " v" +
                           std::to_string(v) + " m" + std::to_string(m) + " steps " +
                           std::to_string(steps);
  const double lr = 0.05;
  GptModel whole(spec, 3);
  const auto layouts = loom::model::partition_stages(layers, p, v);
  std::vector<std::unique_ptr<GptModel>> chunks;
  for (int c = 0; c < v; ++c) {
    chunks.push_back(std::make_unique<GptModel>(spec, 3, at::kCPU, loom::parallel::TensorParallel{},
                                                128, layouts[static_cast<size_t>(c * p + r)]));
  }
  ScheduleOptions o;
  o.kind = sched;
  o.stages = p;
  o.chunks = v;
  o.microbatches = m;
  PipelineRunner runner(o, world);

  for (int step = 0; step < steps; ++step) {
    auto batch = [&](int mb) { return micro_batch(step * m + mb, 17); };
    // The objective: sum over micro-batches of loss_sum / (all loss tokens) + aux / m.
    int64_t tokens = 0;
    for (int mb = 0; mb < m; ++mb) tokens += batch(mb).num_loss_tokens();
    const double loss_scale = 1.0 / static_cast<double>(tokens), aux_scale = 1.0 / m;

    whole.zero_grad();
    double ref_loss = 0;
    for (int mb = 0; mb < m; ++mb) {
      auto out = whole.forward(batch(mb));
      at::Tensor obj = out.loss_sum * loss_scale + out.aux_loss * aux_scale;
      ref_loss += out.loss_sum.item<double>();
      obj.backward();
    }

    for (auto& ch : chunks) ch->zero_grad();
    double loss_sum = 0;
    RunnerCallbacks cb;
    cb.activation_options = at::TensorOptions().dtype(at::kDouble);
    cb.shape = [&](int mb) {
      Batch b = batch(mb);
      return std::vector<int64_t>{b.seq_len(), b.batch_size(), spec.hidden};
    };
    cb.forward = [&](int c, int mb, const at::Tensor& input) {
      auto out = chunks[static_cast<size_t>(c)]->forward_stage(batch(mb), input);
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
    RunnerStats st = runner.run(cb);
    EXPECT_EQ(st.sends, st.recvs) << what;  // every message has a partner on a ring of equal counts
    // Every output this rank sent was released after its F (all but the last virtual stage send).
    const int sending_chunks = r == p - 1 ? v - 1 : v;
    if (sending_chunks > 0) {
      EXPECT_GT(st.released_bytes, 0) << what;
    }
    // A split backward moves every linear's weight GEMM of every micro-batch to W (Note: deferred
    // weight gradients); the others defer nothing.
    if (sched == ScheduleKind::kZeroBubbleH1) {
      EXPECT_GT(st.deferred_grads, 0) << what;
    } else {
      EXPECT_EQ(st.deferred_grads, 0) << what;
    }

    at::Tensor l = at::full({1}, loss_sum, at::kDouble);
    world->all_reduce(l);
    EXPECT_LT(std::abs(l.item<double>() - ref_loss) / ref_loss, 1e-12)
        << what << ": loss at step " << step;

    int held = 0;
    at::NoGradGuard no_grad;
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
      EXPECT_LT(rel(g, ref), 1e-11) << what << ": gradient of " << prm.name << " at step " << step;
      held += holders;
      if (steps > 1) {  // the same SGD step on both sides
        prm.tensor.sub_(ref * lr);
        for (auto& ch : chunks) {
          if (const auto* q = ch->find(prm.name)) q->tensor.sub_(g * lr);
        }
      }
    }
    EXPECT_GT(held, 0) << what;
  }
  if (steps > 1) {
    double worst = 0;
    for (const auto& prm : whole.parameters()) {
      for (auto& ch : chunks) {
        if (const auto* q = ch->find(prm.name)) worst = std::max(worst, rel(q->tensor, prm.tensor));
      }
    }
    at::Tensor t = at::full({1}, worst, at::kDouble);
    world->all_reduce(t, {loom::comm::ReduceOp::kMax});
    EXPECT_LT(t.item<double>(), 1e-10) << what << ": parameters after " << steps << " steps";
  }
}

TEST(WeightGradStore, DefersAndReplaysTheWeightGradient) {
  // A linear on an expert slice of a cast 3-D weight, as the MoE layer uses it: under a capture the
  // backward gives the input gradient and no weight gradient; run() then adds exactly the weight
  // gradient of an undivided backward, through the slice and the cast, calling the parameter's
  // accumulator once with a gradient (what the data-parallel buckets count).
  using loom::parallel::WeightGradStore;
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(7);
  at::Tensor w = at::randn({2, 4, 3}, gen, at::kDouble).requires_grad_(true);
  at::Tensor x0 = at::randn({5, 3}, gen, at::kDouble);
  at::Tensor gy = at::randn({5, 4}, gen, at::kDouble);
  auto run = [&](bool capture, at::Tensor* gx, at::Tensor* gw, int* hook_calls) {
    w.mutable_grad() = at::Tensor();
    at::Tensor x = x0.clone().requires_grad_(true);
    at::Tensor y = loom::parallel::linear(x, (w * 1.0).select(0, 1));
    *hook_calls = 0;
    auto acc = torch::autograd::impl::grad_accumulator(w);
    acc->add_post_hook(std::make_unique<torch::autograd::utils::LambdaPostHook>(
        [hook_calls](const torch::autograd::variable_list& out,
                     const torch::autograd::variable_list& in) {
          if (!in.empty() && in[0].defined()) ++*hook_calls;
          return out;
        }));
    if (capture) {
      std::vector<loom::parallel::DeferredGrad> work;
      {
        WeightGradStore::Capture c;
        y.backward(gy);
        work = c.take();
      }
      EXPECT_EQ(work.size(), 1u);
      EXPECT_FALSE(w.grad().defined() && w.grad().abs().sum().item<double>() > 0)
          << "weight gradient in B";
      EXPECT_EQ(*hook_calls, 0);
      WeightGradStore::run(work);
    } else {
      y.backward(gy);
    }
    *gx = x.grad();
    *gw = w.grad();
  };
  at::Tensor gx_ref, gw_ref, gx, gw;
  int calls_ref = 0, calls = 0;
  run(false, &gx_ref, &gw_ref, &calls_ref);
  run(true, &gx, &gw, &calls);
  EXPECT_TRUE(at::allclose(gx, gx_ref, 0, 1e-14));
  ASSERT_TRUE(gw.defined());
  EXPECT_TRUE(at::allclose(gw, gw_ref, 0, 1e-14));
  EXPECT_EQ(gw[0].abs().sum().item<double>(), 0.0);  // the other expert's slice
  EXPECT_EQ(calls, 1);
  EXPECT_EQ(calls_ref, 1);
}

TEST(PipelineRunner, TwentyStepsOfVariableLengthMicroBatches) {
  // 20 training steps (SGD on both sides), each on new micro-batches whose sequence lengths vary
  // (4, 6, 8 tokens), every schedule, MoE and GPT-2 (tied head across stages): the pipeline follows
  // the whole model's trajectory (fp64).
  const int p = loom::testing::world()->size();
  if (p == 8) GTEST_SKIP() << "2 and 4 stages cover it";
  for (const std::string kind : {"moe", "gpt2"}) {
    expect_pipeline_matches(kind, ScheduleKind::kAllForwardAllBackward, 1, p + 1, 20);
    expect_pipeline_matches(kind, ScheduleKind::k1F1B, 1, p + 1, 20);
    expect_pipeline_matches(kind, ScheduleKind::kZeroBubbleH1, 1, p + 1, 20);
    expect_pipeline_matches(kind, ScheduleKind::kInterleaved1F1B, 2, 2 * p, 20);
  }
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

// ---------------------------------------------------------------------------------------------
// The Trainer under pipeline layouts.

using loom::train::Trainer;

using loom::testing::Layout;

// A pipeline layout's defaults: 2 stages of a 4-layer model, 1F1B, 4 micro-batches per step.
Layout pipeline_case() {
  Layout c;
  c.pp = 2;
  c.schedule = "1f1b";
  c.micro = 4;
  c.layers = 4;
  return c;
}

void expect_pipeline_trainer_matches(const std::string& model, Layout c) {
  c.model = model;
  loom::testing::expect_layout_matches(c);
}

// The layouts of this world size: PP 2 and 4, one or two chunks per rank, every schedule, composed
// with TP = 2 (with and without SP) and DP = 2 (ZeRO-1 or the bucketed all-reduce).
std::vector<Layout> pipeline_cases() {
  const int n = loom::testing::world()->size();
  std::vector<Layout> v;
  auto add = [&](int tp, int pp, int vp, const char* sched, int micro, int layers, bool sp = false,
                 bool zero = false) {
    Layout c = pipeline_case();
    c.tp = tp, c.pp = pp, c.vp = vp, c.schedule = sched, c.micro = micro, c.layers = layers,
    c.sp = sp, c.zero = zero;
    v.push_back(c);
  };
  if (n == 2) {
    add(1, 2, 1, "afab", 4, 4);
    add(1, 2, 1, "1f1b", 4, 4);
    add(1, 2, 1, "zb-h1", 8, 4);
    add(1, 2, 1, "zb-h1", 1, 2);
    add(1, 2, 2, "interleaved", 4, 4);
    add(1, 2, 2, "interleaved", 8, 8);
  } else if (n == 4) {
    add(1, 4, 1, "afab", 4, 4);
    add(1, 4, 1, "1f1b", 8, 4);
    add(1, 4, 1, "zb-h1", 8, 4);
    add(1, 4, 2, "interleaved", 8, 8);
    add(2, 2, 1, "zb-h1", 4, 4, /*sp=*/true);
    add(2, 2, 2, "interleaved", 4, 4);
    add(1, 2, 1, "1f1b", 4, 4, false, /*zero=*/true);
    add(1, 2, 1, "zb-h1", 4, 4);  // DP buckets with deferred weight gradients
    add(1, 2, 2, "interleaved", 4, 4);
  } else if (n == 8) {
    add(2, 2, 2, "interleaved", 4, 4, /*sp=*/true, /*zero=*/true);
    add(2, 2, 1, "zb-h1", 4, 4, /*sp=*/true);
    add(2, 2, 1, "afab", 2, 4);
    add(2, 4, 1, "1f1b", 8, 4, /*sp=*/true);
    add(2, 4, 2, "interleaved", 8, 8);
    add(1, 4, 1, "zb-h1", 4, 4, false, /*zero=*/true);
    add(1, 4, 2, "interleaved", 4, 8);
  }
  return v;
}

TEST(PipelineTrainer, GptMatchesSingleProcess) {
  LOOM_REQUIRE_PARALLEL_WORLD();
  const auto cases = pipeline_cases();
  ASSERT_FALSE(cases.empty()) << "no pipeline layout for " << loom::testing::world()->size()
                              << " ranks";
  for (const auto& c : cases) expect_pipeline_trainer_matches("gpt", c);
}

TEST(PipelineTrainer, MoeMatchesSingleProcess) {
  LOOM_REQUIRE_PARALLEL_WORLD();
  const auto cases = pipeline_cases();
  ASSERT_FALSE(cases.empty()) << "no pipeline layout for " << loom::testing::world()->size()
                              << " ranks";
  for (const auto& c : cases) expect_pipeline_trainer_matches("moe", c);
}

TEST(PipelineTrainer, Gpt2TiedEmbeddingsAcrossStages) {
  // The embedding on the first stage and its copy as the head on the last: one gradient (the sum),
  // one update, counted once in the norm. One chunk and two (the head on chunk 1 of the last rank).
  LOOM_REQUIRE_PARALLEL_WORLD();
  const int n = loom::testing::world()->size();
  Layout c = pipeline_case();
  c.pp = n == 2 ? 2 : 4;
  c.tp = n == 8 ? 2 : 1;
  c.schedule = "zb-h1";
  expect_pipeline_trainer_matches("gpt2", c);
  c.vp = 2;
  c.layers = 2 * c.pp;
  c.schedule = "interleaved";
  c.sp = c.tp > 1;
  expect_pipeline_trainer_matches("gpt2", c);
}

TEST(PipelineTrainer, UnevenStagesAndDenseLayersInAnMoeModel) {
  // The embedding alone on the first stage (0 layers), the rest on the last; an MoE model whose
  // first layer is dense, so a stage can hold no MoE layer (no auxiliary loss of its own).
  auto world = loom::testing::world();
  if (world->size() != 2) GTEST_SKIP() << "two stages";
  Layout c = pipeline_case();
  c.layers = 3;
  c.first = 0;
  c.last = 3;
  expect_pipeline_trainer_matches("gpt", c);
  c.first = 1;
  c.last = 2;
  c.first_dense = 1;
  c.schedule = "zb-h1";
  expect_pipeline_trainer_matches("moe", c);
}

TEST(PipelineTrainer, CheckpointsGatherStagesAndReshardOnLoad) {
  // Saved under a pipeline (the stages' full tensors gathered to the writer, the tied head's copy
  // saved once, by its owner), loaded by a single process and by another pipeline layout
  // (different stage boundaries and chunks): the same parameters, and the runs go on equal.
  auto world = loom::testing::world();
  const int n = world->size();
  auto j = loom::testing::tiny_job(false, /*gpt2=*/true);
  j.mutable_model()->set_num_layers(4);
  j.mutable_train()->set_steps(3);
  std::string dir;
  {  // one directory for the whole job: rank 0's pid
    at::Tensor pid = at::full({1}, static_cast<int64_t>(getpid()), at::kLong);
    world->broadcast(pid, {0});
    dir = (std::filesystem::temp_directory_path() /
           ("loom-pp-ckpt-" + std::to_string(pid.item<int64_t>())))
              .string();
  }
  j.mutable_train()->set_checkpoint_dir(dir);
  Layout a = pipeline_case();  // np2: pp2; np4: tp2 pp2; np8: tp2 pp2 dp2 with ZeRO-1
  a.tp = n >= 4 ? 2 : 1;
  a.sp = a.tp > 1;
  a.zero = n == 8;
  a.schedule = "zb-h1";
  const int dp = n / (a.tp * a.pp);
  j.mutable_train()->set_micro_batch_size(16 / (dp * 4));
  Trainer par(loom::testing::with_layout(j, a), world);
  for (int s = 0; s < 3; ++s) par.train_step();
  const std::string saved = par.save_checkpoint();
  Trainer single(j, std::make_shared<loom::comm::LocalCommunicator>());
  single.load_checkpoint(saved);
  EXPECT_EQ(loom::testing::max_param_diff(par, single), 0.0);
  for (int s = 0; s < 2; ++s) {
    auto x = single.train_step();
    auto y = par.train_step();
    EXPECT_NEAR(y.loss, x.loss, loom::testing::kLossTol * x.loss);
  }
  // Another layout resumes from it: interleaved chunks with the last stage holding one layer.
  Layout b = a;
  b.vp = 2;
  b.schedule = "interleaved";
  b.layers = 4;
  auto jb = loom::testing::with_layout(j, b);
  jb.mutable_model()->set_num_layers(5);  // virtual stages: 1 + 1 + 1 + 2 with last = 2
  jb.mutable_parallel()->set_pp_last_stage_layers(2);
  auto js = j;
  js.mutable_model()->set_num_layers(5);
  // A 5-layer model cannot load a 4-layer checkpoint: the stored config names the field; allowed
  // on purpose, the tensors' own check still refuses it, naming the parameter count.
  try {
    Trainer wrong(jb, world);
    wrong.load_checkpoint(saved);
    ADD_FAILURE() << "a 5-layer model loaded a 4-layer checkpoint";
  } catch (const loom::Error& e) {
    EXPECT_NE(std::string(e.what()).find("model.num_layers: 4 in the checkpoint, 5 now"),
              std::string::npos)
        << e.what();
  }
  try {
    auto jw = jb;
    jw.mutable_train()->add_allow_config_changes("model.num_layers");
    Trainer wrong(jw, world);
    wrong.load_checkpoint(saved);
    ADD_FAILURE() << "a 5-layer model loaded a 4-layer checkpoint";
  } catch (const loom::Error& e) {
    EXPECT_NE(std::string(e.what()).find("was it written for a different model config?"),
              std::string::npos)
        << e.what();
  }
  jb.mutable_model()->set_num_layers(4);
  jb.mutable_parallel()->set_pp_last_stage_layers(1);  // 1 + 1 + 1 + 1
  Trainer par2(jb, world);
  par2.load_checkpoint(saved);
  Trainer single2(j, std::make_shared<loom::comm::LocalCommunicator>());
  single2.load_checkpoint(saved);
  EXPECT_EQ(loom::testing::max_param_diff(par2, single2), 0.0);
  auto x = single2.train_step();
  auto y = par2.train_step();
  EXPECT_NEAR(y.loss, x.loss, loom::testing::kLossTol * x.loss);
  EXPECT_LT(loom::testing::max_param_diff(par2, single2), loom::testing::kParamTol);
  world->barrier();
  if (world->rank() == 0) std::filesystem::remove_all(dir);
}

TEST(PipelineTrainer, BadLayoutsAreClearErrors) {
  auto world = loom::testing::world();
  const int n = world->size();
  using loom::testing::expect_config_error;
  auto base = loom::testing::tiny_job(false);
  base.mutable_model()->set_num_layers(4);
  base.mutable_train()->set_micro_batch_size(16 / (n / 2) /
                                             4);  // pp 2: dp = n / 2, 4 micro-batches
  Layout c = pipeline_case();
  auto j = loom::testing::with_layout(base, c);
  j.mutable_parallel()->set_pp_schedule("zb-v");
  expect_config_error(j, "parallel.pp_schedule = 'zb-v' is not a schedule");
  j = loom::testing::with_layout(base, c);
  j.mutable_parallel()->set_virtual_pp(2);  // with 1f1b
  expect_config_error(j, "parallel.virtual_pp");
  j = loom::testing::with_layout(base, c);
  j.mutable_model()->set_num_layers(3);
  expect_config_error(j, "model.num_layers = 3 does not split over the pipeline");
  j = loom::testing::with_layout(base, c);
  j.mutable_parallel()->set_pp_first_stage_layers(5);
  expect_config_error(j, "exceed model.num_layers = 4");
  c.vp = 2;
  c.schedule = "interleaved";
  j = loom::testing::with_layout(base, c);
  j.mutable_parallel()->set_pp_microbatch_group(3);  // 4 micro-batches: groups of 3 and 1 < pp
  expect_config_error(j, "parallel.pp_microbatch_group");
  j = loom::testing::with_layout(base, c);
  j.mutable_parallel()->set_pp_first_stage_layers(4);  // nothing left for virtual stages 1 and 2
  expect_config_error(j, "virtual pipeline stage 1 of 4 would hold no layers");
  // Interleaving needs a pipeline.
  auto k = base;
  k.mutable_parallel()->set_virtual_pp(2);
  k.mutable_parallel()->set_tp(n);
  k.mutable_model()->set_num_kv_heads(n);
  k.mutable_train()->set_micro_batch_size(16);
  expect_config_error(
      k,
      "field 'parallel.virtual_pp' = 2 interleaves model chunks over pipeline ranks and needs "
      "parallel.pp > 1");
}

}  // namespace
