// Expert parallelism at the layer level ([Note: expert parallelism]), float64: the world is one
// expert group (ep x expert_tp ranks), each rank routes its own micro-batch, and every rank's
// losses, and every gradient (dense ones summed over the ranks; each expert's from the ranks its
// tokens came from), must equal the single-process model run on each rank's micro-batch in turn.
// Tolerance 1e-12 relative: the same float64 operations in another order (row order inside an
// expert's GEMM, the a2a's regrouping), where a token sent to the wrong expert, a gate applied
// twice or a missing expert_tp partial is off by O(1).
#include <ATen/CPUGeneratorImpl.h>
#include <fmt/format.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <string>
#include <vector>

#include "loom/core/error.h"
#include "loom/model/gpt.h"
#include "loom/parallel/expert_parallel.h"
#include "test_world.h"
#include "trainer_fixture.h"

namespace {

using loom::model::Batch;
using loom::model::GptModel;
using loom::model::ModelSpec;

ModelSpec spec(double capacity, bool shared, bool bias, int experts = 8) {
  return loom::testing::tiny_f64_spec(2, experts, [&](auto& c) {
    auto* m = c.mutable_moe();
    m->set_capacity_factor(capacity);
    if (shared) m->set_num_shared_experts(1);
    if (bias) m->set_bias_update_rate(0.1);
  });
}

Batch batch_of(int rank, int64_t rows, int64_t s) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(100 + static_cast<uint64_t>(rank));
  Batch b;
  b.tokens = at::randint(13, {rows, s}, gen, at::kLong);
  b.targets = at::randint(13, {rows, s}, gen, at::kLong);
  return b;
}

double rel(const at::Tensor& a, const at::Tensor& b) {
  const double scale = b.abs().max().item<double>();
  const double diff = (a - b).abs().max().item<double>();
  return scale > 0 ? diff / scale : diff;
}

struct Case {
  int etp = 1;
  double capacity = 0;
  bool shared = false;
  bool idle_ranks = false;  // only ep index 0's experts can be chosen: the others get no row
  std::string str(int n) const {
    return "ep" + std::to_string(n / etp) + " etp" + std::to_string(etp) +
           (capacity > 0 ? " capacity" : "") + (shared ? " shared" : "") +
           (idle_ranks ? " idle-ranks" : "");
  }
};

void expect_ep_matches(const Case& c) {
  auto world = loom::testing::world();
  const int n = world->size(), r = world->rank();
  const int ep = n / c.etp;
  const auto ex = loom::parallel::make_expert_parallel(world, ep, r / c.etp, c.etp, r % c.etp);
  const ModelSpec sp = spec(c.capacity, c.shared, c.idle_ranks);
  GptModel single(sp, 3);
  GptModel par(sp, 3, at::kCPU, {}, 128, {}, {}, ex);
  const int64_t local = sp.moe.num_experts / ep;
  // Idle ranks: a bias no score can beat keeps every token on the first max(local, k) experts,
  // so ep indices from `busy` on receive no row.
  const int64_t allowed = std::max<int64_t>(local, sp.moe.top_k);
  const int busy = static_cast<int>((allowed + local - 1) / local);
  if (c.idle_ranks) {
    for (GptModel* m : {&single, &par}) {
      for (auto* layer : m->moe_layers())
        layer->expert_bias.narrow(0, allowed, 8 - allowed).fill_(-1e3);
    }
  }
  // The single process runs every rank's micro-batch; this rank's losses must match its own.
  double loss_single = 0, aux_single = 0, worst_loss = 0;
  for (int q = 0; q < n; ++q) {
    auto out = single.forward(batch_of(q, 2, 6));
    (out.loss_sum + out.aux_loss).backward();
    if (q == r) {
      loss_single = out.loss_sum.item<double>();
      aux_single = out.aux_loss.item<double>();
    }
  }
  auto out = par.forward(batch_of(r, 2, 6));
  (out.loss_sum + out.aux_loss).backward();
  worst_loss = std::max(std::abs(out.loss_sum.item<double>() - loss_single) / loss_single,
                        std::abs(out.aux_loss.item<double>() - aux_single) / aux_single);
  double worst_grad = 0;
  int64_t rows_received = 0;
  ASSERT_EQ(par.parameters().size(), single.parameters().size());
  for (size_t i = 0; i < par.parameters().size(); ++i) {
    const auto& p = par.parameters()[i];
    const auto& q = single.parameters()[i];
    ASSERT_EQ(p.name, q.name);
    at::Tensor g = p.tensor.grad().defined() ? p.tensor.grad().clone() : at::zeros_like(p.tensor);
    const at::Tensor ref = q.tensor.grad().defined() ? q.tensor.grad() : at::zeros_like(q.tensor);
    if (p.expert) {
      // The whole world is the expert group: this rank's slice already sums every rank's tokens.
      EXPECT_EQ(p.tensor.size(0), local) << p.name;
      worst_grad = std::max(worst_grad, rel(g, loom::parallel::local_of(ref, p)));
      rows_received += p.tensor.grad().defined() ? 1 : 0;
    } else {
      world->all_reduce(g);  // the data-parallel sum
      worst_grad = std::max(worst_grad, rel(g, ref));
    }
    // Parameters start equal to the single process's (name-seeded, then sliced).
    EXPECT_TRUE(p.tensor.equal(p.expert ? loom::parallel::local_of(q.tensor.detach(), p)
                                        : q.tensor.detach()))
        << p.name;
  }
  at::Tensor w = at::tensor({worst_loss, worst_grad}, at::kDouble);
  world->all_reduce(w, {loom::comm::ReduceOp::kMax});
  const std::string what = c.str(n);
  EXPECT_LT(w[0].item<double>(), 1e-12) << what << ": losses";
  EXPECT_LT(w[1].item<double>(), 1e-12) << what << ": gradients";
  if (c.idle_ranks && r / c.etp >= busy) {
    EXPECT_EQ(rows_received, 0) << what << ": ep index " << r / c.etp << " got rows";
  }
  if (r == 0) {
    std::printf("[ ep ] %-32s loss %.1e grad %.1e\n", what.c_str(), w[0].item<double>(),
                w[1].item<double>());
  }
}

TEST(ExpertParallel, LayerEqualsTheSingleProcess) {
  const int n = loom::testing::world()->size();
  if (n < 2) GTEST_SKIP() << "needs mpirun with 2+ ranks";
  expect_ep_matches({1, 0, false, false});
  expect_ep_matches({1, 0.75, true, false});  // capacity drops (per rank) and a shared expert
  expect_ep_matches({1, 0, false, true});     // experts and whole ranks without rows
  if (n >= 4) expect_ep_matches({2, 0, true, false});  // expert_tp 2
  if (n >= 4) expect_ep_matches({2, 1.0, false, true});
}

TEST(ExpertParallel, ExpertsThatDoNotSplitAreRefused) {
  auto world = loom::testing::world();
  const int n = world->size();
  if (6 % n == 0) GTEST_SKIP() << "needs an ep that does not divide 6 experts";
  const auto ex = loom::parallel::make_expert_parallel(world, n, world->rank(), 1, 0);
  try {
    GptModel par(spec(0, false, false, 6), 3, at::kCPU, {}, 128, {}, {}, ex);
    ADD_FAILURE() << "6 experts over " << n << " ranks must be refused";
  } catch (const loom::Error& e) {
    EXPECT_EQ(e.kind(), loom::ErrorKind::kConfig);
    EXPECT_NE(std::string(e.what()).find(fmt::format("6 % {} = {}", n, 6 % n)), std::string::npos)
        << e.what();
  }
}

}  // namespace
