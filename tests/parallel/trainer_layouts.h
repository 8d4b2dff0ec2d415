// Model-level equivalence of parallel Trainer layouts against a single-process Trainer, shared by
// the tensor/data-parallel and the pipeline-parallel tests.
//
// fp32 tolerances. The losses of the two runs differ only by reduction order (rel. ~1e-7 per step;
// it grows slowly as the trajectories drift), so each step's loss must agree within 1e-5 relative.
// Parameters: AdamW steps are ~lr = 3e-3 whatever the gradient's scale, so a mis-scaled or
// mis-reduced gradient moves parameters by ~1e-3 within a few steps; rounding keeps honest runs
// within 1e-4 after 20 steps (measured: see the notes on issues 5 and 6).
#pragma once

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <string>

#include "loom/config.pb.h"
#include "loom/core/error.h"
#include "loom/core/logging.h"
#include "loom/train/trainer.h"
#include "test_world.h"

namespace loom::testing {

constexpr double kLossTol = 1e-5;
constexpr double kParamTol = 1e-4;

inline void quiet_logs() {
  static bool once = [] {
    loom::log::LogOptions o;
    o.level = "warn";
    loom::log::init(o);
    return true;
  }();
  (void)once;
}

// A tiny LLaMA (or GPT-2: LayerNorm, biases, tied embeddings, learned positions) or MoE model, 20
// steps of a global batch of 16 sequences of 16 tokens.
inline loom::config::JobConfig tiny_job(bool moe, bool gpt2 = false) {
  quiet_logs();
  loom::config::JobConfig j;
  j.set_seed(91);
  auto* m = j.mutable_model();
  if (gpt2) m->set_arch(loom::config::ModelConfig::GPT2);
  m->set_vocab_size(64);
  m->set_hidden_size(32);
  m->set_num_layers(2);
  m->set_num_heads(8);
  m->set_num_kv_heads(4);
  m->set_ffn_hidden_size(64);
  m->set_max_seq_len(16);
  if (moe) {
    m->mutable_moe()->set_num_experts(4);
    m->mutable_moe()->set_top_k(2);
    m->mutable_moe()->set_expert_ffn_hidden_size(16);
    m->mutable_moe()->set_num_shared_experts(1);
    m->mutable_moe()->set_z_loss_coeff(1e-3);
  }
  auto* o = j.mutable_optim();
  o->set_lr(3e-3);
  o->set_min_lr(3e-4);
  o->set_warmup_steps(2);
  o->set_clip_grad(1.0);
  auto* t = j.mutable_train();
  t->set_steps(20);
  t->set_seq_len(16);
  t->set_global_batch_size(16);
  t->set_progress("off");
  t->set_peak_tflops(1.0);
  j.mutable_logging()->set_dir("");
  j.mutable_parallel()->set_grad_bucket_mb(0.01);  // ~10 KB: several DP gradient buckets
  return j;
}

// Building a Trainer for `j` on the world must fail with a kConfig error containing `needle`.
inline void expect_config_error(const loom::config::JobConfig& j, const std::string& needle) {
  try {
    loom::train::Trainer t(j, world());
    ADD_FAILURE() << "expected an error containing '" << needle << "'";
  } catch (const loom::Error& e) {
    EXPECT_EQ(e.kind(), loom::ErrorKind::kConfig) << e.what();
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}

// Runs both trainers `steps` steps; every step's tokens, aux loss and gradient norm must agree
// (within kLossTol and 1e-4 relative). Returns the largest relative loss difference.
inline double compare_steps(loom::train::Trainer& single, loom::train::Trainer& par, int steps,
                            const std::string& what) {
  double worst = 0;
  for (int s = 0; s < steps; ++s) {
    auto a = single.train_step();
    auto b = par.train_step();
    worst = std::max(worst, std::abs(b.loss - a.loss) / a.loss);
    EXPECT_EQ(b.tokens, a.tokens) << what;
    EXPECT_NEAR(b.aux_loss, a.aux_loss, kLossTol * a.aux_loss + 1e-9) << what << " step " << s;
    EXPECT_NEAR(b.grad_norm, a.grad_norm, 1e-4 * a.grad_norm) << what << " step " << s;
  }
  return worst;
}

// Max over every parameter of every rank's chunks of |full(parallel) - single|, matched by name
// (pipeline copies included: they must equal their owner), the same on every rank. 1e30 if a
// parameter is missing, has another shape, or the stages do not hold each of the single model's
// parameters exactly once.
inline double max_param_diff(loom::train::Trainer& par, loom::train::Trainer& single) {
  double m = 0;
  int64_t owned = 0;
  for (auto& p : par.parameters()) {
    at::Tensor full = par.full_tensor(p, p.tensor);
    const loom::model::Parameter* q = single.model().find(p.name);
    if (q == nullptr || full.sizes() != q->tensor.sizes()) {
      m = 1e30;
      continue;
    }
    m = std::max(m, (full - q->tensor).abs().max().item<double>());
    if (!p.pipeline_copy && par.groups().tp_rank() == 0 && par.groups().dp_rank() == 0) ++owned;
  }
  if (world_sum(owned) != static_cast<int64_t>(single.model().parameters().size())) m = 1e30;
  at::Tensor t = at::full({1}, m, at::kDouble);
  world()->all_reduce(t, {loom::comm::ReduceOp::kMax});
  return t.item<double>();
}

}  // namespace loom::testing
