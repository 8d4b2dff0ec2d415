// Tensor, sequence and data parallelism against the single-process model (run under mpirun; the
// TP group of the layer-level tests is the whole world).
//
// Layer level (fp64): each TP layer's output, input gradient and parameter gradients equal the
// unsharded layer's. Only the reduction order differs (row-parallel partial sums are added across
// ranks), so the tolerance is 1e-11 relative to the tensor's scale; a wrong region (a missing or
// doubled all-reduce) is off by O(1).
//
// Model level (fp32): the Trainer under (tp, dp) layouts, SP on and off, gradient accumulation 1
// and 4, GPT and MoE, 20 steps: every step's loss and the final (gathered) parameters equal a
// single-process Trainer's on the same data. See kLossTol / kParamTol below for the tolerances.
#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "loom/comm/local_communicator.h"
#include "loom/core/error.h"
#include "loom/core/logging.h"
#include "loom/model/layers.h"
#include "loom/model/model_spec.h"
#include "loom/model/moe.h"
#include "loom/ops/functional.h"
#include "loom/optim/distributed.h"
#include "loom/parallel/tensor_parallel.h"
#include "loom/train/trainer.h"
#include "test_world.h"
#include "trainer_fixture.h"

namespace {

using loom::model::ModelSpec;
using loom::model::Parameter;
using loom::model::ParameterFactory;
using loom::parallel::TensorParallel;
using loom::testing::kLossTol;
using loom::testing::kParamTol;
using loom::testing::max_param_diff;
using loom::testing::quiet_logs;
using loom::testing::tiny_job;
using loom::train::Trainer;

at::Tensor randn(at::IntArrayRef shape, uint64_t seed, at::ScalarType dt = at::kDouble) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  return at::randn(shape, gen, at::TensorOptions().dtype(dt));
}

// max |a - b| / max(1, max |b|), agreed over the world (the max over ranks).
double world_rel_diff(const at::Tensor& a, const at::Tensor& b) {
  double d = a.sizes() != b.sizes()
                 ? 1e30
                 : (a.to(at::kDouble) - b.to(at::kDouble)).abs().max().item<double>() /
                       std::max(1.0, b.abs().max().item<double>());
  at::Tensor t = at::full({1}, d, at::kDouble);
  loom::testing::world()->all_reduce(t, {loom::comm::ReduceOp::kMax});
  return t.item<double>();
}

TensorParallel world_tp(bool sp) {
  TensorParallel tp;
  tp.comm = loom::testing::world();
  tp.sequence_parallel = sp;
  return tp;
}

ModelSpec layer_spec(bool llama, int tp, bool moe = false) {
  loom::config::ModelConfig c;
  c.set_arch(llama ? loom::config::ModelConfig::LLAMA : loom::config::ModelConfig::GPT2);
  c.set_vocab_size(50);
  c.set_hidden_size(32);
  c.set_num_layers(1);
  c.set_num_heads(8);
  c.set_num_kv_heads(tp <= 4 ? 4 : 8);
  c.set_ffn_hidden_size(64);
  c.set_max_seq_len(16);
  if (moe) {
    c.mutable_moe()->set_num_experts(4);
    c.mutable_moe()->set_top_k(2);
    c.mutable_moe()->set_expert_ffn_hidden_size(16);
    c.mutable_moe()->set_num_shared_experts(1);
    c.mutable_moe()->set_shared_expert_ffn_hidden_size(16);
    c.mutable_moe()->set_z_loss_coeff(1e-2);
  }
  ModelSpec s = ModelSpec::from_config(c);
  s.param_dtype = at::kDouble;
  s.compute_dtype = at::kDouble;
  return s;
}

struct LayerPair {
  std::shared_ptr<std::vector<Parameter>> full = std::make_shared<std::vector<Parameter>>();
  std::shared_ptr<std::vector<Parameter>> part = std::make_shared<std::vector<Parameter>>();
  ParameterFactory full_factory(const std::string& prefix) const {
    return ParameterFactory(full, 5, at::TensorOptions().dtype(at::kDouble), prefix);
  }
  ParameterFactory part_factory(const std::string& prefix, const TensorParallel& tp) const {
    return ParameterFactory(part, 5, at::TensorOptions().dtype(at::kDouble), prefix, tp.size(),
                            tp.rank());
  }
};

// Runs `f` (x [s, b, h] -> y [s, b, h] plus a scalar) unsharded and sharded, and compares the
// output, the input gradient and every parameter's gradient (sharded ones against the matching
// slice of the full gradient; partial ones after their all-reduce over TP).
template <typename Full, typename Part>
void compare_layer(const LayerPair& lp, const TensorParallel& tp, Full&& full_fn, Part&& part_fn,
                   const std::string& what) {
  const int64_t s = 16, b = 2, h = 32;
  const int n = tp.size(), r = tp.rank();
  at::Tensor x = randn({s, b, h}, 11).requires_grad_(true);
  at::Tensor dy = randn({s, b, h}, 12);
  auto [y, extra] = full_fn(x);
  (y * dy).sum().add(extra).backward();

  at::Tensor xp = (tp.sp() ? x.detach().chunk(n, 0)[r] : x.detach()).clone().requires_grad_(true);
  auto [yp, extra_p] = part_fn(xp);
  at::Tensor dyp = tp.sp() ? dy.chunk(n, 0)[r] : dy;
  (yp * dyp).sum().add(extra_p).backward();

  const double tol = 1e-11;
  EXPECT_LT(world_rel_diff(yp, tp.sp() ? y.detach().chunk(n, 0)[r] : y.detach()), tol)
      << what << ": output";
  EXPECT_LT(world_rel_diff(extra_p.detach(), extra.detach()), tol) << what << ": auxiliary loss";
  EXPECT_LT(world_rel_diff(xp.grad(), tp.sp() ? x.grad().chunk(n, 0)[r] : x.grad()), tol)
      << what << ": dx";
  ASSERT_EQ(lp.full->size(), lp.part->size());
  for (size_t i = 0; i < lp.full->size(); ++i) {
    const Parameter& pf = (*lp.full)[i];
    const Parameter& pp = (*lp.part)[i];
    ASSERT_EQ(pf.name, pp.name);
    at::Tensor g =
        pp.tensor.grad().defined() ? pp.tensor.grad().clone() : at::zeros_like(pp.tensor);
    if (pp.shard.partial_grad) tp.comm->all_reduce(g);
    at::Tensor expected = loom::model::shard_of(pf.tensor.grad(), pp.shard, n, r);
    EXPECT_LT(world_rel_diff(g, expected), tol) << what << ": gradient of " << pp.name;
  }
}

TEST(TensorParallelLayers, AttentionAndMlpEqualTheUnshardedLayers) {
  const int n = loom::testing::world()->size();
  for (bool llama : {true, false}) {
    for (bool sp : {false, true}) {
      TensorParallel tp = world_tp(sp);
      ModelSpec spec = layer_spec(llama, n);
      const std::string what = std::string(llama ? "llama" : "gpt2") + (sp ? " sp" : "");
      at::Tensor pos = at::arange(16, at::kLong).unsqueeze(1).expand({16, 2});
      loom::model::ForwardContext ctx;
      if (spec.rope)
        std::tie(ctx.rope_cos, ctx.rope_sin) =
            loom::ops::rope_tables(pos, spec.head_dim, spec.rope_theta, at::kDouble);
      {
        LayerPair lp;
        loom::model::Norm norm_full(spec, lp.full_factory("norm"));
        loom::model::Attention full(spec, lp.full_factory("attn"));
        loom::model::Norm norm_part(spec, lp.part_factory("norm", tp), tp);
        loom::model::Attention part(spec, lp.part_factory("attn", tp), tp);
        auto zero = at::zeros({}, at::kDouble);
        compare_layer(
            lp, tp,
            [&](const at::Tensor& x) {
              return std::make_pair(full.forward(norm_full.forward(x), ctx), zero);
            },
            [&](const at::Tensor& x) {
              return std::make_pair(part.forward(norm_part.forward(x), ctx), zero);
            },
            "attention " + what);
      }
      {
        LayerPair lp;
        loom::model::Mlp full(spec, lp.full_factory("mlp"), spec.ffn);
        loom::model::Mlp part(spec, lp.part_factory("mlp", tp), spec.ffn, tp);
        auto zero = at::zeros({}, at::kDouble);
        compare_layer(
            lp, tp, [&](const at::Tensor& x) { return std::make_pair(full.forward(x), zero); },
            [&](const at::Tensor& x) { return std::make_pair(part.forward(x), zero); },
            "mlp " + what);
      }
    }
  }
}

TEST(TensorParallelLayers, MoeEqualsTheUnshardedLayer) {
  const int n = loom::testing::world()->size();
  for (bool sp : {false, true}) {
    TensorParallel tp = world_tp(sp);
    ModelSpec spec = layer_spec(true, n, /*moe=*/true);
    LayerPair lp;
    loom::model::MoeLayer full(spec, lp.full_factory("moe"));
    loom::model::MoeLayer part(spec, lp.part_factory("moe", tp), tp);
    loom::model::ForwardContext ctx;
    compare_layer(
        lp, tp,
        [&](const at::Tensor& x) {
          auto o = full.forward(x, ctx);
          return std::make_pair(o.y, o.aux);
        },
        [&](const at::Tensor& x) {
          auto o = part.forward(x, ctx);
          return std::make_pair(o.y, o.aux);
        },
        std::string("moe") + (sp ? " sp" : ""));
    // Routing is decided on the whole micro-batch on every rank: the same counts as unsharded.
    EXPECT_TRUE(at::equal(part.stats().tokens_per_expert, full.stats().tokens_per_expert));
  }
}

TEST(TensorParallelLayers, RegionsAreConjugate) {
  // Each region's forward and backward against its closed form, with a different upstream
  // gradient on every rank (exact: gathers and sums of small integers).
  auto world = loom::testing::world();
  const int n = world->size(), r = world->rank();
  TensorParallel tp = world_tp(true);
  at::Tensor x = at::arange(4 * n * 3, at::kDouble).view({4 * n, 3});  // same on every rank
  at::Tensor g = at::full({4 * n, 3}, static_cast<double>(r + 1), at::kDouble);  // rank-dependent
  const double sum_g = n * (n + 1) / 2.0;
  auto grad_of = [&](auto&& fn, const at::Tensor& in, const at::Tensor& upstream) {
    at::Tensor leaf = in.clone().requires_grad_(true);
    at::Tensor out = fn(leaf);
    out.backward(upstream);
    return std::make_pair(out.detach(), leaf.grad());
  };
  using loom::testing::world_wrong;
  {  // copy_to_tp: identity forward, all-reduce backward
    auto [y, dx] =
        grad_of([&](const at::Tensor& t) { return loom::parallel::copy_to_tp(t, tp); }, x, g);
    EXPECT_EQ(world_wrong(y, x), 0);
    EXPECT_EQ(world_wrong(dx, at::full_like(x, sum_g)), 0);
  }
  {  // reduce_from_tp: all-reduce forward, identity backward
    auto [y, dx] =
        grad_of([&](const at::Tensor& t) { return loom::parallel::reduce_from_tp(t, tp); }, x, g);
    EXPECT_EQ(world_wrong(y, x * n), 0);
    EXPECT_EQ(world_wrong(dx, g), 0);
  }
  {  // gather_from_sp: all-gather forward, reduce-scatter backward
    at::Tensor mine = x.chunk(n, 0)[r];
    auto [y, dx] = grad_of(
        [&](const at::Tensor& t) { return loom::parallel::gather_from_sp(t, tp); }, mine, g);
    EXPECT_EQ(world_wrong(y, x), 0);
    EXPECT_EQ(world_wrong(dx, at::full_like(mine, sum_g)), 0);
  }
  {  // reduce_scatter_to_sp: reduce-scatter forward, all-gather backward
    at::Tensor up = at::full({4, 3}, static_cast<double>(r + 1), at::kDouble);
    auto [y, dx] = grad_of(
        [&](const at::Tensor& t) { return loom::parallel::reduce_scatter_to_sp(t, tp); }, x, up);
    EXPECT_EQ(world_wrong(y, x.chunk(n, 0)[r] * n), 0);
    at::Tensor expected = at::cat([&] {
      std::vector<at::Tensor> v;
      for (int k = 0; k < n; ++k)
        v.push_back(at::full({4, 3}, static_cast<double>(k + 1), at::kDouble));
      return v;
    }());
    EXPECT_EQ(world_wrong(dx, expected), 0);
  }
  {  // scatter_to_sp: chunk forward, all-gather backward
    at::Tensor up = at::full({4, 3}, static_cast<double>(r + 1), at::kDouble);
    auto [y, dx] =
        grad_of([&](const at::Tensor& t) { return loom::parallel::scatter_to_sp(t, tp); }, x, up);
    EXPECT_EQ(world_wrong(y, x.chunk(n, 0)[r]), 0);
    EXPECT_EQ(dx.size(0), 4 * n);
  }
  {  // gather_last_dim / scatter_last_dim
    at::Tensor cols = at::arange(5 * 2 * n, at::kDouble).view({5, 2 * n});
    at::Tensor mine = cols.chunk(n, 1)[r].contiguous();
    auto [y, dx] =
        grad_of([&](const at::Tensor& t) { return loom::parallel::gather_last_dim(t, tp); }, mine,
                at::full({5, 2 * n}, 1.0, at::kDouble) * (r + 1));
    EXPECT_EQ(world_wrong(y, cols), 0);
    EXPECT_EQ(world_wrong(dx, at::full_like(mine, r + 1.0)), 0);
    auto [y2, dx2] =
        grad_of([&](const at::Tensor& t) { return loom::parallel::scatter_last_dim(t, tp); }, cols,
                at::ones({5, 2}, at::kDouble));
    EXPECT_EQ(world_wrong(y2, mine), 0);
    EXPECT_EQ(dx2.sum().item<double>(), 5 * 2 * n);  // all-gathered ones
  }
}

TEST(TensorParallelLayers, ColumnParallelLinearEqualsTheUnshardedLinear) {
  // The fused enter-region + linear against the unsharded fp64 linear: output columns, input
  // gradient (the sequence chunk under SP), weight and bias gradients; with its backward
  // collectives overlapped and not, which must give bit-identical results.
  auto world = loom::testing::world();
  const int n = world->size(), r = world->rank();
  const int64_t s = 4 * n, b = 3, in = 10, out = 6 * n;
  at::Tensor x = randn({s, b, in}, 21);
  at::Tensor w = randn({out, in}, 22);
  at::Tensor bias = randn({out}, 23);
  at::Tensor dy = randn({s, b, out}, 24);
  for (bool with_bias : {true, false}) {
    at::Tensor xf = x.clone().requires_grad_(true), wf = w.clone().requires_grad_(true);
    at::Tensor bf = with_bias ? bias.clone().requires_grad_(true) : at::Tensor();
    at::Tensor yf = at::linear(xf, wf, bf);
    (yf * dy).sum().backward();
    for (bool sp : {false, true}) {
      std::vector<at::Tensor> results;
      for (bool overlap : {true, false}) {
        TensorParallel tp = world_tp(sp);
        tp.overlap_comm = overlap;
        at::Tensor xp = (sp ? x.chunk(n, 0)[r] : x).clone().requires_grad_(true);
        at::Tensor wp = w.chunk(n, 0)[r].clone().requires_grad_(true);
        at::Tensor bp = with_bias ? bias.chunk(n, 0)[r].clone().requires_grad_(true) : at::Tensor();
        at::Tensor yp = loom::parallel::column_parallel_linear(xp, wp, bp, tp);
        (yp * dy.chunk(n, 2)[r]).sum().backward();
        const std::string what = std::string(sp ? "sp" : "no sp") +
                                 (overlap ? " overlap" : " serial") + (with_bias ? " bias" : "");
        const double tol = 1e-12;
        EXPECT_LT(world_rel_diff(yp, yf.detach().chunk(n, 2)[r]), tol) << what << ": output";
        EXPECT_LT(world_rel_diff(xp.grad(), sp ? xf.grad().chunk(n, 0)[r] : xf.grad()), tol)
            << what << ": dx";
        EXPECT_LT(world_rel_diff(wp.grad(), wf.grad().chunk(n, 0)[r]), tol) << what << ": dW";
        if (with_bias) {
          EXPECT_LT(world_rel_diff(bp.grad(), bf.grad().chunk(n, 0)[r]), tol) << what << ": db";
        }
        results.push_back(
            at::cat({yp.detach().flatten(), xp.grad().flatten(), wp.grad().flatten()}));
      }
      EXPECT_TRUE(at::equal(results[0], results[1]))
          << (sp ? "sp" : "no sp") << ": overlap changed the result";
    }
  }
  {  // An input that needs no gradient (the weight's gradient alone, still gathered under SP).
    TensorParallel tp = world_tp(true);
    at::Tensor wf = w.clone().requires_grad_(true);
    (at::linear(x, wf) * dy).sum().backward();
    at::Tensor wp = w.chunk(n, 0)[r].clone().requires_grad_(true);
    (loom::parallel::column_parallel_linear(x.chunk(n, 0)[r], wp, at::Tensor(), tp) *
     dy.chunk(n, 2)[r])
        .sum()
        .backward();
    EXPECT_LT(world_rel_diff(wp.grad(), wf.grad().chunk(n, 0)[r]), 1e-12)
        << "dW with a constant input";
  }
}

TEST(TensorParallelLayers, VocabParallelCrossEntropyEqualsTheFullSoftmax) {
  auto world = loom::testing::world();
  const int n = world->size(), r = world->rank();
  TensorParallel tp = world_tp(false);
  const int64_t vocab = 50, padded = 64 * n, cols = padded / n, rows = 24;
  for (auto dt : {at::kDouble, at::kFloat}) {
    at::Tensor full = randn({rows, vocab}, 3, dt) * 4;
    at::Tensor targets = at::remainder(at::arange(rows, at::kLong) * 7, vocab);
    at::Tensor dl = randn({rows}, 4, dt);
    at::Tensor leaf = full.clone().requires_grad_(true);
    at::Tensor ref = loom::ops::cross_entropy(leaf, targets);
    (ref * dl).sum().backward();
    // This rank's columns of the padded logits (padding columns hold junk that must be ignored).
    at::Tensor padded_logits =
        at::cat({full, at::full({rows, padded - vocab}, 1e3, full.options())}, 1);
    at::Tensor mine = padded_logits.narrow(1, r * cols, cols).clone().requires_grad_(true);
    at::Tensor loss =
        loom::parallel::vocab_parallel_cross_entropy(mine, targets, r * cols, vocab, tp);
    (loss * dl).sum().backward();
    const double tol = dt == at::kDouble ? 1e-13 : 2e-6;
    EXPECT_LT(world_rel_diff(loss, ref.detach()), tol) << c10::toString(dt);
    at::Tensor grad_full =
        at::cat({leaf.grad(), at::zeros({rows, padded - vocab}, full.options())}, 1);
    EXPECT_LT(world_rel_diff(mine.grad(), grad_full.narrow(1, r * cols, cols)), tol)
        << c10::toString(dt);
  }
}

// ---------------------------------------------------------------------------------------------
// Model level.

using loom::testing::Layout;

void expect_matches_single(const std::string& model, int tp, bool sp, int accum,
                           bool zero = false) {
  Layout c;
  c.model = model;
  c.tp = tp;
  c.sp = sp;
  c.micro = accum;
  c.zero = zero;
  loom::testing::expect_layout_matches(c);
}

// Every (tp, dp) layout of this world size, from the list {(2,1), (4,1), (1,2), (1,4),
// (2,2), (2,4)}: np2 runs (2,1) and (1,2); np4 (4,1), (2,2) and (1,4); np8 (2,4).
std::vector<int> tp_sizes() {
  const int n = loom::testing::world()->size();
  if (n == 2) return {2, 1};
  if (n == 4) return {4, 2, 1};
  if (n == 8) return {2};
  return {};
}

// Every layout of this world size with SP off and on (tp > 1), ZeRO-1 off and on (dp > 1) and
// accumulation 1 and 4.
void expect_all_layouts_match(bool moe) {
  LOOM_REQUIRE_PARALLEL_WORLD();
  const int n = loom::testing::world()->size();
  ASSERT_FALSE(tp_sizes().empty()) << "no (tp, dp) layout for " << n << " ranks";
  for (int tp : tp_sizes()) {
    const int dp = n / tp;
    for (bool sp : tp > 1 ? std::vector<bool>{false, true} : std::vector<bool>{false}) {
      for (bool zero : dp > 1 ? std::vector<bool>{false, true} : std::vector<bool>{false}) {
        for (int accum : {1, 4}) {
          if (16 % (dp * accum) != 0) continue;
          expect_matches_single(moe ? "moe" : "gpt", tp, sp, accum, zero);
        }
      }
    }
  }
}

TEST(TensorDataParallel, GptMatchesSingleProcess) { expect_all_layouts_match(false); }
TEST(TensorDataParallel, MoeMatchesSingleProcess) { expect_all_layouts_match(true); }

TEST(TensorDataParallel, Gpt2WithBiasesTiedAndLearnedPositions) {
  // LayerNorm biases, attention/FFN biases outside the regions, tied vocab-parallel embedding and
  // head, learned positions on sequence shards.
  LOOM_REQUIRE_PARALLEL_WORLD();
  const int n = loom::testing::world()->size();
  const int tp = n == 8 ? 2 : n;
  expect_matches_single("gpt2", tp, true, 1);
}

TEST(TensorDataParallel, CheckpointReshardsOnLoad) {
  // Saved under TP (full, unpadded tensors), loaded by a single-process run: the same parameters,
  // and the two continue with the same losses.
  auto world = loom::testing::world();
  const int tp = world->size() == 8 ? 2 : world->size();
  auto j = tiny_job(true);
  j.mutable_train()->set_micro_batch_size(4);
  j.mutable_train()->set_steps(3);
  std::string dir =
      (std::filesystem::temp_directory_path() / ("loom-tp-ckpt-" + std::to_string(getpid())))
          .string();
  {  // one directory for the whole job: rank 0's pid
    at::Tensor pid = at::full({1}, static_cast<int64_t>(getpid()), at::kLong);
    world->broadcast(pid, {0});
    dir = (std::filesystem::temp_directory_path() /
           ("loom-tp-ckpt-" + std::to_string(pid.item<int64_t>())))
              .string();
  }
  j.mutable_train()->set_checkpoint_dir(dir);
  auto jp = j;
  jp.mutable_parallel()->set_tp(tp);
  jp.mutable_parallel()->set_sequence_parallel(true);
  jp.mutable_parallel()->set_distributed_optimizer(
      true);  // dp > 1 at np8: moments gathered and resharded
  Trainer par(jp, world);
  for (int s = 0; s < 3; ++s) par.train_step();
  const std::string saved = par.save_checkpoint();
  Trainer single(j, std::make_shared<loom::comm::LocalCommunicator>());
  single.load_checkpoint(saved);
  EXPECT_EQ(max_param_diff(par, single), 0.0);
  for (int s = 0; s < 2; ++s) {
    auto a = single.train_step();
    auto b = par.train_step();
    EXPECT_NEAR(b.loss, a.loss, kLossTol * a.loss);
  }
  // And a fresh TP run resumes from it: parameters and optimizer state resharded, the same next
  // step as a single-process resume.
  Trainer par2(jp, world);
  par2.load_checkpoint(saved);
  Trainer single2(j, std::make_shared<loom::comm::LocalCommunicator>());
  single2.load_checkpoint(saved);
  EXPECT_EQ(max_param_diff(par2, single2), 0.0);
  auto a = par2.train_step();
  auto b = single2.train_step();
  EXPECT_NEAR(a.loss, b.loss, kLossTol * b.loss);
  EXPECT_LT(max_param_diff(par2, single2), kParamTol);
  world->barrier();
  if (world->rank() == 0) std::filesystem::remove_all(dir);
}

TEST(DistributedOptimizer, StateFallsAsOneOverDp) {
  // Optimizer-state bytes per rank with ZeRO-1 against the replicated AdamW of the same layout
  // (tp = 1, dp = world): 1/dp, plus at most dp - 1 padding elements.
  auto world = loom::testing::world();
  const int n = world->size();
  auto j = tiny_job(true);
  j.mutable_train()->set_micro_batch_size(16 / n);
  Trainer plain(j, world);
  j.mutable_parallel()->set_distributed_optimizer(true);
  Trainer zero(j, world);
  const double ratio = static_cast<double>(zero.optimizer().state_bytes()) /
                       static_cast<double>(plain.optimizer().state_bytes());
  const double pad = 2.0 * 4 * (n - 1) / static_cast<double>(plain.optimizer().state_bytes());
  EXPECT_GE(ratio, 1.0 / n);
  EXPECT_LE(ratio, 1.0 / n + pad);
  if (world->rank() == 0) {
    std::printf(
        "[ memory ] dp %d: optimizer state %lld bytes per rank with ZeRO-1, %lld without (ratio "
        "%.4f)\n",
        n, static_cast<long long>(zero.optimizer().state_bytes()),
        static_cast<long long>(plain.optimizer().state_bytes()), ratio);
  }
  // And a ZeRO-1 checkpoint holds the same full state as a replicated run's after the same steps.
  plain.train_step();
  zero.train_step();
  auto a = plain.optimizer().state(), b = zero.optimizer().state();
  ASSERT_EQ(a.size(), b.size());
  double worst = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_EQ(a[i].name, b[i].name);
    worst = std::max(worst, (a[i].tensor - b[i].tensor).abs().max().item<double>() /
                                std::max(1e-30, a[i].tensor.abs().max().item<double>()));
  }
  EXPECT_LT(worst, 1e-5);
}

TEST(DistributedOptimizer, MixedDtypesAreRefusedByName) {
  // ZeRO-1 shards every tp x dp layout (the flat space is padded to a multiple of dp); what it
  // cannot shard is parameters of different dtypes in one flat buffer: refused, naming both.
  std::vector<Parameter> params(2);
  params[0].name = "a.weight";
  params[0].tensor = at::zeros({3, 5}, at::kFloat).requires_grad_(true);
  params[1].name = "b.weight";
  params[1].tensor = at::zeros({7}, at::kDouble).requires_grad_(true);
  try {
    loom::optim::DistributedAdamW opt(&params, {}, loom::testing::world(), nullptr);
    ADD_FAILURE() << "mixed dtypes were accepted";
  } catch (const loom::Error& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("'b.weight' is Double"), std::string::npos) << m;
    EXPECT_NE(m.find("'a.weight' is Float"), std::string::npos) << m;
  }
  // Fewer elements than ranks still shards (every range padded), and one step updates them all.
  std::vector<Parameter> tiny(1);
  tiny[0].name = "t";
  tiny[0].tensor = at::ones({1}, at::kDouble).requires_grad_(true);
  tiny[0].tensor.mutable_grad() = at::ones({1}, at::kDouble);
  loom::optim::DistributedAdamW opt(&tiny, {}, loom::testing::world(), nullptr);
  EXPECT_EQ(opt.flat_size(), loom::testing::world()->size());
  opt.reduce_scatter_gradients();
  opt.step(0.1);
  // The gradients are summed over DP (the loss is already normalised globally): g = dp. Adam's
  // first step moves by lr g / (|g| + eps) (bias-corrected), after the decoupled decay lr * wd * p.
  const double g = loom::testing::world()->size();
  const double expected = 1.0 - 0.1 * 0.1 - 0.1 * g / (g + 1e-8);
  EXPECT_NEAR(tiny[0].tensor.item<double>(), expected, 1e-12);
}

TEST(TensorDataParallel, BadLayoutsAreClearErrors) {
  auto world = loom::testing::world();
  const int n = world->size();
  using loom::testing::expect_config_error;
  auto j = tiny_job(false);
  j.mutable_train()->set_micro_batch_size(16);  // dp = 1
  j.mutable_parallel()->set_tp(n);
  j.mutable_model()->set_num_kv_heads(n);  // 8 heads, n KV heads: valid for n in {2, 4, 8}
  auto heads = j;
  heads.mutable_model()->set_num_heads(n == 2 ? 3 : 6);  // not divisible by n
  heads.mutable_model()->set_num_kv_heads(n == 2 ? 3 : 6);
  heads.mutable_model()->set_hidden_size(n == 2 ? 30 : 36);
  expect_config_error(heads, "model.num_heads");
  auto kv = j;
  kv.mutable_model()->set_num_kv_heads(1);
  expect_config_error(kv, "model.num_kv_heads");
  auto ffn = j;
  ffn.mutable_model()->set_ffn_hidden_size(66);  // 66 % 4, 66 % 8 != 0; n == 2 divides it
  if (n != 2) expect_config_error(ffn, "model.ffn_hidden_size");
  auto ffn2 = j;
  ffn2.mutable_model()->set_ffn_hidden_size(63);
  expect_config_error(ffn2, "model.ffn_hidden_size");
  auto expert = tiny_job(true);
  expert.mutable_train()->set_micro_batch_size(16);
  expert.mutable_parallel()->set_tp(n);
  expert.mutable_model()->set_num_kv_heads(n);
  expert.mutable_model()->mutable_moe()->set_expert_ffn_hidden_size(15);
  expect_config_error(expert, "model.moe.expert_ffn_hidden_size");
  auto seq = j;
  seq.mutable_parallel()->set_sequence_parallel(true);
  seq.mutable_train()->set_seq_len(15);
  expect_config_error(seq, "train.seq_len = 15");
  // The vocabulary padding is a multiple of vocab_divisible_by x tp, reported by padded_vocab().
  auto pad = j;
  pad.mutable_parallel()->set_vocab_divisible_by(24);
  Trainer t(pad, world);
  EXPECT_EQ(t.model().padded_vocab(), n == 8 ? 192 : 96);
  EXPECT_EQ(t.model().parameters()[0].tensor.size(0), t.model().padded_vocab() / n);
}

}  // namespace
