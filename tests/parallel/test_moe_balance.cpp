// The MoE balance losses across data-parallel ranks ([Note: balance losses] in model/moe.cpp).
//
// GLOBAL_BATCH at the layer level, float64: with the counts summed over the data-parallel domain,
// the objective's sum over ranks (each micro-batch's aux / (M dp), Note: loss scaling) must equal a
// single process that sees each slot (the m-th micro-batch of every rank, concatenated) as one
// micro-batch: with M = 1 that is the balance loss of the whole global batch (the 1e-12,
// relative), with M = 2 the buffer formula over slots (whose single-process form is checked
// against a hand-written formula in test_reference.cpp). Gradients of every parameter likewise.
// Then the Trainer: GLOBAL_BATCH, SEQUENCE and the aux-loss-free bias under dp, tp, pp and cp
// against a single-process Trainer (the layouts' tolerances, trainer_fixture.h).
#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "loom/comm/group_view.h"
#include "loom/comm/local_communicator.h"
#include "loom/model/gpt.h"
#include "loom/parallel/context_parallel.h"
#include "test_world.h"
#include "trainer_fixture.h"

namespace {

using loom::model::Batch;
using loom::model::GptModel;
using loom::model::ModelSpec;

ModelSpec moe_spec(loom::config::MoeConfig::AuxLossType type) {
  return loom::testing::tiny_f64_spec(2, 4,
                                      [&](auto& c) { c.mutable_moe()->set_aux_loss_type(type); });
}

Batch rows(const at::Tensor& tokens, const at::Tensor& targets, int64_t first, int64_t n) {
  Batch b;
  b.tokens = tokens.narrow(0, first, n).contiguous();
  b.targets = targets.narrow(0, first, n).contiguous();
  return b;
}

double rel(const at::Tensor& a, const at::Tensor& b) {
  return (a - b).abs().max().item<double>() / std::max(1e-300, b.abs().max().item<double>());
}

// M micro-batches of `per` rows on each of the world's ranks against one process over the slots.
void expect_global_batch_exact(int micro) {
  auto world = loom::testing::world();
  const int n = world->size(), r = world->rank();
  const int64_t per = 2, s = 6;
  auto gen = at::make_generator<at::CPUGeneratorImpl>(17);
  // Slot m: rows [m n per, (m + 1) n per); rank r's part of it: per rows from m n per + r per.
  const at::Tensor tokens = at::randint(13, {micro * n * per, s}, gen, at::kLong);
  const at::Tensor targets = at::randint(13, {micro * n * per, s}, gen, at::kLong);
  const auto global = loom::config::MoeConfig::GLOBAL_BATCH;

  GptModel single(moe_spec(global), 7);  // no domain: one rank, one slot per micro-batch
  loom::model::begin_moe_step(single.moe_layers());
  std::vector<double> aux_single;
  for (int m = 0; m < micro; ++m) {
    auto out = single.forward(rows(tokens, targets, m * n * per, n * per));
    aux_single.push_back(out.aux_loss.item<double>());
    (out.aux_loss / static_cast<double>(micro)).backward();
  }

  GptModel par(moe_spec(global), 7);
  for (auto* layer : par.moe_layers()) layer->set_domain({world, n});
  loom::model::begin_moe_step(par.moe_layers());
  double worst = 0;
  for (int m = 0; m < micro; ++m) {
    auto out = par.forward(rows(tokens, targets, m * n * per + r * per, per));
    // The objective's share of this micro-batch: aux / (M dp) (Note: loss scaling).
    (out.aux_loss / static_cast<double>(micro * n)).backward();
    const double sum = loom::comm::all_reduce_scalar(out.aux_loss.item<double>(), world.get()) / n;
    worst = std::max(worst, std::abs(sum - aux_single[static_cast<size_t>(m)]) /
                                std::abs(aux_single[static_cast<size_t>(m)]));
  }
  EXPECT_LT(worst, 1e-12) << "M " << micro << ": the ranks' mean aux against one process";
  double grad = 0;
  int with_gradient = 0;
  for (size_t i = 0; i < par.parameters().size(); ++i) {
    // (The experts' weights get no gradient from the balance and z losses.)
    const at::Tensor& p = par.parameters()[i].tensor;
    const at::Tensor& q = single.parameters()[i].tensor;
    at::Tensor g = p.grad().defined() ? p.grad().clone() : at::zeros_like(p);
    const at::Tensor ref = q.grad().defined() ? q.grad() : at::zeros_like(q);
    world->all_reduce(g);  // the data-parallel sum
    if (ref.abs().max().item<double>() > 0) ++with_gradient;
    grad = std::max(
        grad, ref.abs().max().item<double>() > 0 ? rel(g, ref) : g.abs().max().item<double>());
  }
  EXPECT_LT(grad, 1e-12) << "M " << micro << ": gradients (sum over ranks) against one process";
  EXPECT_GE(with_gradient, 6) << "the router, attention and norm weights have gradients";
  // The test can fail: each rank's own micro-batch loss (MICRO_BATCH) averages to something else.
  GptModel micro_model(moe_spec(loom::config::MoeConfig::MICRO_BATCH), 7);
  const double own =
      micro_model.forward(rows(tokens, targets, r * per, per)).aux_loss.item<double>();
  const double mean_own = loom::comm::all_reduce_scalar(own, world.get()) / n;
  EXPECT_GT(std::abs(mean_own - aux_single[0]) / aux_single[0], 1e-4);
  if (r == 0) {
    std::printf(
        "[ moe ] GLOBAL_BATCH dp%d M%d: aux rel diff %.1e, gradients %.1e (per-rank "
        "micro-batch loss: %.1e off)\n",
        n, micro, worst, grad, std::abs(mean_own - aux_single[0]) / aux_single[0]);
  }
}

TEST(GlobalBatchBalance, OneMicroBatchEqualsOneProcessOnTheGlobalBatch) {
  if (loom::testing::world()->size() < 2) GTEST_SKIP() << "needs mpirun with 2+ ranks";
  expect_global_batch_exact(1);
}

TEST(GlobalBatchBalance, MicroBatchesFollowTheSlotBuffer) {
  if (loom::testing::world()->size() < 2) GTEST_SKIP() << "needs mpirun with 2+ ranks";
  expect_global_batch_exact(2);
}

// Hybrid data parallelism: one packed micro-batch (two documents) shared by a group of ranks
// that is a view of the world (Note: group views) - ranks n-1 down to 1, out of order and of any
// size, while rank 0 runs the whole micro-batch alone at the same time - with the MICRO_BATCH or
// SEQUENCE balance loss and the z loss on. The group's statistics (counts, tokens) are summed over
// the view (MoeLayer::stats_comm), so the members' losses and gradients must add up to one process
// on the whole micro-batch, float64. A view that did not sum them would give each member its own
// tokens' balance loss.
void expect_group_share_exact(loom::config::MoeConfig::AuxLossType type) {
  auto world = loom::testing::world();
  const int n = world->size(), r = world->rank();
  std::vector<int> members;
  if (r == 0 || n == 1) {
    members = {r};
  } else {
    for (int q = n - 1; q >= 1; --q) members.push_back(q);
  }
  const auto d = static_cast<int64_t>(members.size());
  auto view = loom::comm::make_group_view(world, members);
  auto cp = std::make_shared<loom::parallel::ContextParallel>();
  cp->comm = view;
  cp->ring = view;
  cp->type = loom::parallel::CpCommType::kP2P;
  const int64_t s = 8 * std::max<int64_t>(n - 1, 1);
  auto gen = at::make_generator<at::CPUGeneratorImpl>(29);
  const at::Tensor tokens = at::randint(13, {1, s}, gen, at::kLong);
  const at::Tensor targets = at::randint(13, {1, s}, gen, at::kLong);
  const Batch full = loom::model::packed_batch(tokens, targets, {{0, 5 * s / 8 + 1, s}});
  auto spec = loom::testing::tiny_f64_spec(2, 4, [&](auto& c) {
    c.mutable_moe()->set_aux_loss_type(type);
    c.set_max_seq_len(64);
  });
  GptModel single(spec, 7);
  auto ref = single.forward(full);
  (ref.loss_sum + ref.aux_loss).backward();
  GptModel par(spec, 7);
  Batch local = loom::model::cp_shard(full, static_cast<int>(d), view->rank());
  local.cp_group = cp;
  auto out = par.forward(local);
  (out.loss_sum + out.aux_loss).backward();
  at::Tensor sums = at::stack({out.loss_sum.detach(), out.aux_loss.detach()}).to(at::kDouble);
  view->all_reduce(sums);  // the group's parts
  const double loss = rel(sums[0], ref.loss_sum.detach()),
               aux = rel(sums[1], ref.aux_loss.detach());
  double grad = 0;
  for (size_t i = 0; i < par.parameters().size(); ++i) {
    const at::Tensor& p = par.parameters()[i].tensor;
    const at::Tensor& q = single.parameters()[i].tensor;
    at::Tensor g = p.grad().defined() ? p.grad().clone() : at::zeros_like(p);
    view->all_reduce(g);
    const at::Tensor want = q.grad().defined() ? q.grad() : at::zeros_like(q);
    grad = std::max(
        grad, want.abs().max().item<double>() > 0 ? rel(g, want) : g.abs().max().item<double>());
  }
  at::Tensor worst = at::tensor({loss, aux, grad}, at::kDouble);
  world->all_reduce(worst, {loom::comm::ReduceOp::kMax});
  const std::string what = std::string(loom::config::MoeConfig::AuxLossType_Name(type)) +
                           " over a group of " + std::to_string(std::max(n - 1, 1));
  EXPECT_GT(ref.aux_loss.item<double>(), 0) << what;
  EXPECT_LT(worst[0].item<double>(), 1e-10) << what << ": loss";
  EXPECT_LT(worst[1].item<double>(), 1e-10) << what << ": balance and z losses";
  EXPECT_LT(worst[2].item<double>(), 1e-10) << what << ": gradients";
  if (r == 0) {
    std::printf("[ moe ] %s: loss %.1e, aux %.1e, gradients %.1e\n", what.c_str(),
                worst[0].item<double>(), worst[1].item<double>(), worst[2].item<double>());
  }
}

TEST(HdpGroups, BalanceLossesOverAGroupViewEqualOneProcess) {
  if (loom::testing::world()->size() < 3) GTEST_SKIP() << "needs mpirun with 3+ ranks";
  expect_group_share_exact(loom::config::MoeConfig::MICRO_BATCH);
  expect_group_share_exact(loom::config::MoeConfig::SEQUENCE);
}

// The Trainer with each balance option against the single process.
using loom::testing::Layout;

TEST(MoeBalanceLayouts, EqualTheSingleProcess) {
  const int n = loom::testing::world()->size();
  if (n < 2) GTEST_SKIP() << "needs mpirun with 2+ ranks";
  std::vector<Layout> cases;
  auto make = [](const std::string& type, int tp, int pp, int cp) {
    Layout c;
    c.model = "moe";
    c.aux_type = type;
    c.tp = tp;
    c.sp = tp > 1;
    c.pp = pp;
    if (pp > 1) c.schedule = "1f1b";
    c.cp = cp;
    c.steps = 10;
    return c;
  };
  if (n == 2) {
    cases.push_back(make("GLOBAL_BATCH", 1, 1, 1));
    Layout seq = make("SEQUENCE", 1, 1, 1);
    seq.micro = 2;
    cases.push_back(seq);
    Layout bias = make("MICRO_BATCH", 1, 1, 1);
    bias.bias_rate = 1e-2;
    cases.push_back(bias);
  } else if (n == 4) {
    Layout g = make("GLOBAL_BATCH", 2, 1, 1);  // tp2 (SP) x dp2
    g.bias_rate = 1e-2;
    cases.push_back(g);
    cases.push_back(make("GLOBAL_BATCH", 1, 2, 1));  // pp2 x dp2
    cases.push_back(make("GLOBAL_BATCH", 1, 1, 2));  // cp2 x dp2
    cases.push_back(make("SEQUENCE", 1, 1, 2));      // cp2 x dp2: sequences split over CP
  } else {
    GTEST_SKIP() << "the balance layouts run at 2 and 4 ranks";
  }
  for (const Layout& c : cases) loom::testing::expect_layout_matches(c);
}

}  // namespace
