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
#include <filesystem>
#include <string>
#include <vector>

#include "loom/checkpoint/hf.h"
#include "loom/comm/local_communicator.h"
#include "loom/core/error.h"
#include "loom/model/gpt.h"
#include "loom/parallel/expert_parallel.h"
#include "loom/train/trainer.h"
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
      // Defined even where no row arrived: idle experts run on no rows, so every rank's graph has
      // the same shape (their gradient hooks fire in the same order everywhere).
      EXPECT_TRUE(p.tensor.grad().defined()) << p.name;
      rows_received += g.ne(0).any().item<bool>() ? 1 : 0;
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

// The Trainer under expert parallelism against the single-process Trainer (Note: optimizers under
// expert parallelism): every step's loss, aux loss and gradient norm, every gradient tensor (the
// expert shards gathered over the expert group) at two steps, evaluation, final parameters, and
// identical replicas (expert shards over expert DP), with fp32 tolerances of
// loom::testing::expect_layout_matches. Capacity drops are per DP rank's micro-batch, as in the
// single process with the same micro-batches: the drops equal the reference's exactly. They drop by
// position: by probability, a rounding-level difference between two near-equal gates can drop
// another token (the layer-level float64 test covers dropping by probability under EP).
using loom::testing::Layout;
using loom::train::Trainer;

Layout ep_layout(int ep, int micro = 1) {
  Layout c;
  c.model = "moe";
  c.ep = ep;
  c.micro = micro;
  c.steps = 20;
  return c;
}

TEST(ExpertParallelLayouts, EqualTheSingleProcess) {
  const int n = loom::testing::world()->size();
  if (n < 2) GTEST_SKIP() << "needs mpirun with 2+ ranks";
  std::vector<Layout> cases;
  if (n == 2) {
    cases.push_back(ep_layout(2, 2));  // ep2 = dp2, two micro-batches: MICRO_BATCH balance
    Layout g = ep_layout(2);
    g.aux_type = "GLOBAL_BATCH";
    g.bias_rate = 1e-2;
    cases.push_back(g);
    Layout q = ep_layout(2, 2);
    q.aux_type = "SEQUENCE";
    q.capacity = 0.75;  // drops by position (Layouts.RecomputeAndCapacityDropsUnderTpPpDp says why)
    q.drop_by_position = true;
    cases.push_back(q);
    // Packed documents: uneven micro-batch counts over the DP ranks, the shorter plans padded with
    // empty micro-batches that still take part in the exchanges. Each rank packs its own half, the
    // single process all 16 documents, so only packing-free statistics compare: no balance losses,
    // dropless (Layouts.PackedDocumentsEqualTheSingleProcess says why).
    Layout d = ep_layout(2);
    d.documents = true;
    d.aux = false;
    d.sources = 2;  // pieces tagged by their document's source
    cases.push_back(d);
  } else if (n == 4) {
    Layout e = ep_layout(4, 2);
    e.capacity = 1.0;
    e.drop_by_position = true;
    cases.push_back(e);
    Layout z = ep_layout(2, 2);  // ep2 x expert_dp2 over dp4, ZeRO-1 on both parts, SGD
    z.zero = true;
    z.sgd = true;
    cases.push_back(z);
    Layout p = ep_layout(2, 2);  // ep2 x pp2 (dp2), 1F1B
    p.pp = 2;
    p.layers = 4;
    p.schedule = "1f1b";
    cases.push_back(p);
    p.first_dense = 2;  // the first stage's layers are all dense: it holds no expert
    p.sources = 2;      // the dense stage takes part in the source tables' pipeline sum
    cases.push_back(p);
    Layout c = ep_layout(2);  // ep2 over cp2 (dp2): a sequence's halves on two expert groups
    c.cp = 2;
    c.aux_type = "GLOBAL_BATCH";
    c.sources = 2;
    cases.push_back(c);
    Layout t = ep_layout(2, 2);  // expert_tp 2 x ep 2 carved from dp4
    t.etp = 2;
    cases.push_back(t);
    // ep 2 under tp 2 (SP): each TP rank dispatches its own sequence shard; expert_tp 1 (the TP
    // peers hold different experts) and expert_tp 2 (= tp: the expert group is tp x ep).
    Layout u = ep_layout(2, 2);
    u.tp = 2;
    u.sp = true;
    u.etp = 1;
    u.aux_type = "SEQUENCE";
    u.sources = 2;  // each TP rank counts its own shard's sources
    cases.push_back(u);
    u.sources = 1;
    u.etp = 2;
    u.micro = 1;
    u.aux_type = "GLOBAL_BATCH";
    u.bias_rate = 1e-2;
    cases.push_back(u);
    // Packed documents under ep 2 x tp 2: each shard's padding and documents are its own
    // positions' (no balance loss: the packing differs from the single process's).
    Layout w = ep_layout(2);
    w.tp = 2;
    w.sp = true;
    w.documents = true;
    w.aux = false;
    cases.push_back(w);
  } else if (n == 8) {
    Layout e = ep_layout(8);  // every rank one expert, with a recomputed forward
    e.experts = 8;
    e.recompute = true;
    cases.push_back(e);
    Layout u = ep_layout(4, 2);  // ep 4 x tp 2 (SP) over dp 4, expert_tp 1, ZeRO-1
    u.tp = 2;
    u.sp = true;
    u.etp = 1;
    u.zero = true;
    cases.push_back(u);
    Layout c = ep_layout(2);  // ep 2 x tp 2 (SP) x cp 2, recomputed: shards of CP pieces
    c.tp = 2;
    c.sp = true;
    c.cp = 2;
    c.recompute = true;
    c.aux_type = "SEQUENCE";
    c.sources = 3;
    cases.push_back(c);
    Layout p = ep_layout(4, 2);  // ep4 x pp2 (dp4), zero-bubble, ZeRO-1
    p.pp = 2;
    p.layers = 4;
    p.schedule = "zb-h1";
    p.zero = true;
    cases.push_back(p);
  } else {
    GTEST_SKIP() << "the expert-parallel layouts run at 2, 4 and 8 ranks";
  }
  for (const Layout& c : cases) {
    const auto r = loom::testing::expect_layout_matches(c);
    if (c.capacity > 0) {
      EXPECT_GT(r.steps.dropped, 0) << c.str() << ": the case must drop tokens";
    }
  }
}

TEST(ExpertParallelLayouts, CheckpointsReshardOverEp) {
  // Saved under ep 2 (ZeRO-1: the dense moments over dp 4, the experts' over expert_dp 2), loaded
  // under ep 1 and ep 4 (replicated optimizer) and ep 2 (ZeRO-1 again); every step after the load
  // and the final parameters equal a single process that never stopped. The checkpoint also
  // exports to Hugging Face and imports back to the single process's parameters at the save.
  auto world = loom::testing::world();
  if (world->size() != 4) GTEST_SKIP() << "the resume layouts are planned for 4 ranks";
  Layout a = ep_layout(2), b1 = ep_layout(1), b2 = ep_layout(4), b3 = ep_layout(2);
  a.zero = true;  // AdamW moments of the experts sharded over expert_dp 2
  b3.zero = true;
  for (Layout* l : {&a, &b1, &b2, &b3}) {
    l->shared = 0;  // the Mixtral layout of the HF export
    l->steps = 6;
  }
  const std::string dir = loom::testing::shared_dir("ep-relayout");
  auto ja = loom::testing::layout_job(a);
  ja.mutable_train()->set_checkpoint_dir(dir);
  std::string saved;
  Trainer single(loom::testing::layout_single_job(a),
                 std::make_shared<loom::comm::LocalCommunicator>());
  {
    Trainer first(ja, world);
    saved = loom::testing::train_then_save(single, first, 3);
  }
  if (world->rank() == 0) {
    loom::checkpoint::export_hf(saved, dir + "/hf");
    loom::checkpoint::import_hf(dir + "/hf", dir + "/imported/step-00000000");
    auto jr = loom::testing::layout_single_job(a);
    Trainer imported(jr, std::make_shared<loom::comm::LocalCommunicator>());
    imported.load_checkpoint(dir + "/imported/step-00000000");
    double diff = 0;
    for (const auto& p : imported.parameters()) {
      const auto* q = single.model().find(p.name);
      ASSERT_NE(q, nullptr) << p.name;
      diff = std::max(diff, (p.tensor - q->tensor).abs().max().item<double>());
    }
    EXPECT_LT(diff, loom::testing::kParamTol) << "ep2 checkpoint -> HF -> Loom";
  }
  world->barrier();
  for (const Layout& b : {b1, b2, b3}) {
    loom::testing::expect_resume_continues(loom::testing::layout_single_job(a), saved, 3, b, 3,
                                           a.str() + " -> " + b.str());
  }
  world->barrier();
  // Saved under ep 4 (4 experts, one per rank), resumed under ep 1 and ep 2.
  {
    Layout wide = b2;
    auto jw = loom::testing::layout_job(wide);
    jw.mutable_train()->set_checkpoint_dir(dir + "/ep4");
    Trainer reference(loom::testing::layout_single_job(wide),
                      std::make_shared<loom::comm::LocalCommunicator>());
    std::string saved4;
    {
      Trainer first(jw, world);
      saved4 = loom::testing::train_then_save(reference, first, 3);
    }
    Layout narrow = ep_layout(2);
    narrow.shared = 0;
    narrow.steps = 6;
    for (const Layout& b : {b1, narrow}) {
      loom::testing::expect_resume_continues(loom::testing::layout_single_job(wide), saved4, 3, b,
                                             3, wide.str() + " -> " + b.str());
    }
  }
  world->barrier();
  if (world->rank() == 0) std::filesystem::remove_all(dir);
}

TEST(ExpertParallelLayouts, BadLayoutsNameTheReason) {
  const int n = loom::testing::world()->size();
  if (n < 2) GTEST_SKIP() << "needs mpirun with 2+ ranks";
  auto j = loom::testing::layout_job(ep_layout(n));
  j.mutable_model()->mutable_moe()->set_num_experts(2 * n + 1);
  loom::testing::expect_config_error(
      j, fmt::format("model.moe.num_experts = {} experts do not split over parallel.ep = {} ranks",
                     2 * n + 1, n));
  j = loom::testing::layout_job(ep_layout(n));
  j.mutable_parallel()->set_ep(3 * n);
  loom::testing::expect_config_error(
      j, fmt::format("parallel.ep must divide dp*cp = {}*1 = {}", n, n));
  j = loom::testing::layout_job(loom::testing::Layout{});  // dense
  j.mutable_parallel()->set_ep(n);
  loom::testing::expect_config_error(j, "the model has none (model.moe.num_experts = 0)");
  if (n >= 4) {
    Layout t = ep_layout(2);
    t.tp = 2;  // without sequence parallelism
    loom::testing::expect_config_error(loom::testing::layout_job(t),
                                       "needs parallel.sequence_parallel: true");
  }
}

}  // namespace
