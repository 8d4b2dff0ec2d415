// Context parallelism at the attention level (fp64), against full causal attention:
//
//   BlockwiseAttention.*  (one process) the tiled online-softmax kernel, forward and backward,
//   equals
//                         ops::causal_attention for every tile size, GQA, packed documents.
//   CpSplit.*             (one process) the balanced split: a permutation of each row, s/cp tokens
//                         per rank, the work balance of the zig-zag and of packed documents.
//   ContextAttention.*    (mpirun 2, 4, 8: the CP group is the world) p2p, a2a and a2a+p2p give
//                         the same output and q/k/v gradients as the whole sequence on one rank,
//                         with random document lengths (1 token, shorter than 2 cp, longer than
//                         the row share), GQA with KV heads fewer than cp.
//
// Tolerance: 1e-10 relative to the tensor's scale. The blockwise kernel adds the same products in
// another order and rescales by exp(lse differences); fp64 rounding is ~1e-15 per operation. A
// missing key block, a wrong mask or a gradient that does not come home is O(1).
#include <ATen/CPUGeneratorImpl.h>
#include <fmt/format.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <functional>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "loom/core/error.h"
#include "loom/ops/attention.h"
#include "loom/ops/context_attention.h"
#include "loom/ops/functional.h"
#include "loom/parallel/context_parallel.h"
#include "loom/train/trainer.h"
#include "test_world.h"
#include "trainer_fixture.h"

namespace {

using loom::ops::TokenInfo;
using loom::parallel::ContextParallel;
using loom::parallel::CpCommType;
using loom::train::Trainer;

#define LOOM_REQUIRE_PARALLEL_WORLD_CP() LOOM_REQUIRE_PARALLEL_WORLD()

constexpr double kTol = 1e-10;

at::Tensor randn(at::IntArrayRef shape, uint64_t seed) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  return at::randn(shape, gen, at::TensorOptions().dtype(at::kDouble));
}

double rel(const at::Tensor& a, const at::Tensor& b) {
  if (a.sizes() != b.sizes()) return 1e30;
  return (a - b).abs().max().item<double>() / std::max(1e-30, b.abs().max().item<double>());
}

// doc_ids [b, s] from per-row document lengths.
at::Tensor docs_of(const std::vector<std::vector<int64_t>>& lengths, int64_t s) {
  at::Tensor d = at::empty({static_cast<int64_t>(lengths.size()), s}, at::kLong);
  for (size_t r = 0; r < lengths.size(); ++r) {
    int64_t at = 0, id = 0;
    for (int64_t len : lengths[r]) {
      for (int64_t t = 0; t < len; ++t) d[static_cast<int64_t>(r)][at++] = id;
      ++id;
    }
    EXPECT_EQ(at, s) << "row " << r << " lengths do not sum to s";
  }
  return d;
}

// Random document lengths summing to s: many tiny ones (1 token, shorter than 2 cp), a few long.
std::vector<int64_t> random_lengths(int64_t s, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<int64_t> out;
  int64_t left = s;
  while (left > 0) {
    const int64_t kind = static_cast<int64_t>(rng() % 4);
    int64_t len = kind == 0   ? 1
                  : kind == 1 ? 1 + static_cast<int64_t>(rng() % 5)
                              : 1 + static_cast<int64_t>(rng() % (s / 2 + 1));
    len = std::min(len, left);
    out.push_back(len);
    left -= len;
  }
  return out;
}

struct Grads {
  at::Tensor out, dq, dk, dv;
};

// Reference: full attention over the whole rows, its output and gradients for `dout`.
Grads reference(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                const at::Tensor& doc, const at::Tensor& dout) {
  at::Tensor qr = q.clone().requires_grad_(true), kr = k.clone().requires_grad_(true),
             vr = v.clone().requires_grad_(true);
  at::Tensor o = loom::ops::causal_attention(qr, kr, vr, doc);
  o.backward(dout);
  return {o.detach(), qr.grad(), kr.grad(), vr.grad()};
}

TEST(BlockwiseAttention, EqualsFullAttentionForwardAndBackward) {
  const int64_t b = 2, nh = 6, nkv = 2, s = 37, d = 8;
  const at::Tensor q = randn({b, nh, s, d}, 1), k = randn({b, nkv, s, d}, 2),
                   v = randn({b, nkv, s, d}, 3), dout = randn({b, nh, s, d}, 4);
  const at::Tensor doc = docs_of({{1, 9, 2, 20, 5}, {37}}, s);
  for (const bool docs : {false, true}) {
    const at::Tensor dids = docs ? doc : at::Tensor();
    const Grads ref = reference(q, k, v, dids, dout);
    for (const int64_t block : {0, 1, 4, 7, 16, 64}) {
      at::Tensor qb = q.clone().requires_grad_(true), kb = k.clone().requires_grad_(true),
                 vb = v.clone().requires_grad_(true);
      at::Tensor o = loom::ops::blockwise_attention(
          qb, kb, vb, loom::ops::row_tokens(b, s, dids, at::kCPU), block);
      o.backward(dout);
      const std::string what = "block " + std::to_string(block) + (docs ? " documents" : "");
      EXPECT_LT(rel(o.detach(), ref.out), kTol) << what;
      EXPECT_LT(rel(qb.grad(), ref.dq), kTol) << what;
      EXPECT_LT(rel(kb.grad(), ref.dk), kTol) << what;
      EXPECT_LT(rel(vb.grad(), ref.dv), kTol) << what;
    }
  }
}

TEST(BlockwiseAttention, SkipsTilesAboveTheDiagonalAndAcrossDocuments) {
  // 8 tiles of 8 tokens: 36 of the 64 tile pairs are on or below the diagonal, 8 of them on it.
  const int64_t b = 1, s = 64;
  const at::Tensor q = randn({b, 2, s, 4}, 5), k = randn({b, 2, s, 4}, 6),
                   v = randn({b, 2, s, 4}, 7);
  loom::ops::AttentionState st = loom::ops::empty_state(q);
  loom::ops::TileCounts c;
  const TokenInfo t = loom::ops::row_tokens(b, s, at::Tensor(), at::kCPU);
  loom::ops::attention_fold(q, t, k, v, t, 8, st, &c);
  EXPECT_EQ(c.skipped, 28);
  EXPECT_EQ(c.masked, 8);
  EXPECT_EQ(c.full, 28);
  // Two documents of 32: the 16 tile pairs across them are skipped too.
  loom::ops::TileCounts c2;
  const TokenInfo t2 = loom::ops::row_tokens(b, s, docs_of({{32, 32}}, s), at::kCPU);
  st = loom::ops::empty_state(q);
  loom::ops::attention_fold(q, t2, k, v, t2, 8, st, &c2);
  EXPECT_EQ(c2.skipped, 28 + 16);
  EXPECT_EQ(c2.masked, 8);
}

// Every rank holds s/cp tokens, the ranks together hold each token once, each rank's increasing.
void expect_partition(const at::Tensor& index, int64_t b, int64_t s, int cp) {
  ASSERT_EQ(index.sizes(), (std::vector<int64_t>{cp, b, s / cp}));
  for (int64_t r = 0; r < b; ++r) {
    at::Tensor all = std::get<0>(at::sort(index.select(1, r).reshape({-1})));
    EXPECT_TRUE(at::equal(all, at::arange(s, at::kLong))) << "row " << r << " is not a permutation";
    for (int c = 0; c < cp; ++c) {
      at::Tensor mine = index[c][r];
      EXPECT_TRUE((mine.slice(0, 1) > mine.slice(0, 0, -1)).all().item<bool>())
          << "rank " << c << " row " << r << " not increasing";
    }
  }
}

double imbalance(const std::vector<double>& w) {
  const double mx = *std::max_element(w.begin(), w.end());
  const double mean = std::accumulate(w.begin(), w.end(), 0.0) / static_cast<double>(w.size());
  return mx / mean;
}

TEST(CpSplit, ZigZagOfOneSequenceIsMegatronsAndBalanced) {
  const int64_t s = 64;
  for (const int cp : {2, 4, 8}) {
    const at::Tensor idx = loom::parallel::balanced_cp_index(at::Tensor(), 1, s, cp);
    expect_partition(idx, 1, s, cp);
    // Rank r: chunks r and 2cp-1-r of s / 2cp tokens (Megatron-Core's layout).
    const int64_t c = s / (2 * cp);
    for (int r = 0; r < cp; ++r) {
      at::Tensor want = at::cat({at::arange(r * c, (r + 1) * c, at::kLong),
                                 at::arange((2 * cp - 1 - r) * c, (2 * cp - r) * c, at::kLong)});
      EXPECT_TRUE(at::equal(idx[r][0], want)) << "cp " << cp << " rank " << r;
    }
    const double zig = imbalance(loom::parallel::cp_attention_work(idx, at::Tensor()));
    const double naive = imbalance(
        loom::parallel::cp_attention_work(loom::parallel::contiguous_cp_index(1, s, cp), {}));
    EXPECT_LT(zig, 1.01) << "cp " << cp;
    EXPECT_GT(naive, 1.4) << "cp " << cp;
  }
  // A length that 2cp does not divide: still s/cp tokens each (no padding), nearly balanced.
  const at::Tensor odd = loom::parallel::balanced_cp_index(at::Tensor(), 1, 60, 4);
  expect_partition(odd, 1, 60, 4);
  EXPECT_LT(imbalance(loom::parallel::cp_attention_work(odd, {})), 1.1);
}

TEST(CpSplit, PackedDocumentsOfAnyLength) {
  const int64_t s = 240;
  std::mt19937_64 rng(11);
  for (const int cp : {2, 4, 8}) {
    for (uint64_t seed = 0; seed < 20; ++seed) {
      const at::Tensor doc = docs_of({random_lengths(s, seed), random_lengths(s, seed + 100)}, s);
      const at::Tensor idx = loom::parallel::balanced_cp_index(doc, 2, s, cp);
      expect_partition(idx, 2, s, cp);
    }
    // A long-tail mix: one long document and many short ones. Balanced: within 15% of the mean;
    // the contiguous split is far off.
    std::vector<int64_t> mix{120};
    for (int i = 0; i < 40; ++i) mix.push_back(3);
    const at::Tensor doc = docs_of({mix}, s);
    const double bal = imbalance(
        loom::parallel::cp_attention_work(loom::parallel::balanced_cp_index(doc, 1, s, cp), doc));
    const double naive = imbalance(
        loom::parallel::cp_attention_work(loom::parallel::contiguous_cp_index(1, s, cp), doc));
    EXPECT_LT(bal, 1.15) << "cp " << cp;
    EXPECT_GT(naive, bal) << "cp " << cp;
  }
  // Short documents are not cut: 16 documents of 15 tokens over 4 ranks: whole, 4 per rank.
  const at::Tensor even = docs_of({std::vector<int64_t>(16, 15)}, s);
  const at::Tensor idx = loom::parallel::balanced_cp_index(even, 1, s, 4);
  for (int r = 0; r < 4; ++r) {
    at::Tensor d = even[0].index_select(0, idx[r][0]);
    EXPECT_EQ(std::get<0>(at::_unique(d)).numel(), 4) << "rank " << r << " holds pieces";
  }
  // Bad input names the arithmetic.
  try {
    loom::parallel::balanced_cp_index(at::Tensor(), 1, 30, 4);
    ADD_FAILURE() << "30 tokens over 4 ranks must be refused";
  } catch (const loom::Error& e) {
    EXPECT_NE(std::string(e.what()).find("30 % 4 = 2"), std::string::npos) << e.what();
  }
}

// ---- multi-rank ----

struct Case {
  CpCommType type;
  int a2a = 0;
  int64_t nkv = 2;
  bool docs = true;
  int64_t block = 0;
  bool bf16 = false;  // inputs in bfloat16 (statistics stay fp32); judged against cp 1 in bf16
};

void expect_cp_matches(const Case& c) {
  auto world = loom::testing::world();
  const int cp = world->size();
  const int64_t b = 2, nh = 8, d = 8, s = 16 * cp;
  const int64_t nkv = c.nkv;
  const at::Tensor q = randn({b, nh, s, d}, 21), k = randn({b, nkv, s, d}, 22),
                   v = randn({b, nkv, s, d}, 23), dout = randn({b, nh, s, d}, 24);
  const at::Tensor doc =
      c.docs ? docs_of({random_lengths(s, 7 + cp), random_lengths(s, 8 + cp)}, s) : at::Tensor();
  const Grads ref = reference(q, k, v, doc, dout);
  const ContextParallel ctx = loom::parallel::make_context_parallel(world, c.type, c.a2a, c.block);
  const at::Tensor index = loom::parallel::balanced_cp_index(doc, b, s, cp);  // [cp, b, n]
  const at::Tensor full_doc = doc.defined() ? doc : at::zeros({b, s}, at::kLong);
  std::vector<at::Tensor> docs;
  for (int r = 0; r < cp; ++r) docs.push_back(at::gather(full_doc, 1, index[r]));
  const at::Tensor cp_doc = at::stack(docs);
  const at::Tensor mine = index[world->rank()];  // [b, n]
  auto local = [&](const at::Tensor& x) {        // [b, h, s, d] -> this rank's tokens
    const at::Tensor i = mine.view({b, 1, -1, 1}).expand({b, x.size(1), mine.size(1), d});
    return at::gather(x, 2, i);
  };
  const auto dt = c.bf16 ? at::kBFloat16 : at::kDouble;
  at::Tensor ql = local(q).to(dt).requires_grad_(true), kl = local(k).to(dt).requires_grad_(true),
             vl = local(v).to(dt).requires_grad_(true);
  loom::ops::cp_counters() = {};
  at::Tensor o = loom::ops::context_attention(ql, kl, vl, index, cp_doc, ctx, c.block);
  o.backward(local(dout).to(dt));
  if (c.type == CpCommType::kP2P && !c.docs && c.block == 8) {
    // Tiles are the 2cp chunks of 8 tokens: each rank, forward and again backward, computes its two
    // diagonal chunk pairs with a mask, 2cp - 1 pairs below the diagonal without one, and skips the
    // 2cp - 1 above it (none of which is ever computed).
    const auto& t = loom::ops::cp_counters();
    EXPECT_EQ(t.tiles_masked, 2 * 2);
    EXPECT_EQ(t.tiles_full, 2 * (2 * cp - 1));
    EXPECT_EQ(t.tiles_skipped, 2 * (2 * cp - 1));
  }
  const std::string what = std::string(c.bf16 ? "bf16 " : "") +
                           std::string(loom::parallel::cp_comm_type_name(c.type)) + " cp" +
                           std::to_string(cp) + " a2a" + std::to_string(ctx.a2a_size()) + " nkv" +
                           std::to_string(nkv) + (c.docs ? " documents" : "");
  auto err = [&](const Grads& g, const std::function<at::Tensor(const at::Tensor&)>& at_mine) {
    return std::max(
        {rel(g.out.to(at::kDouble), at_mine(ref.out)), rel(g.dq.to(at::kDouble), at_mine(ref.dq)),
         rel(g.dk.to(at::kDouble), at_mine(ref.dk)), rel(g.dv.to(at::kDouble), at_mine(ref.dv))});
  };
  const double worst = err({o.detach(), ql.grad(), kl.grad(), vl.grad()}, local);
  at::Tensor w = at::full({1}, worst, at::kDouble);
  world->all_reduce(w, {loom::comm::ReduceOp::kMax});
  double tol = kTol;
  if (c.bf16) {
    // The single process in bf16 (blockwise, the same tile size) sets the bar: rounding inputs and
    // outputs to 8 bits of mantissa costs ~1e-2 against float64. CP may add one bf16 rounding (the
    // all-to-all's replicated KV heads sum their gradients in bf16) and fp32 merge rounding: 2x.
    at::Tensor q1 = q.to(dt).requires_grad_(true), k1 = k.to(dt).requires_grad_(true),
               v1 = v.to(dt).requires_grad_(true);
    at::Tensor o1 = loom::ops::blockwise_attention(
        q1, k1, v1, loom::ops::row_tokens(b, s, doc, at::kCPU), c.block > 0 ? c.block : 512);
    o1.backward(dout.to(dt));
    const double single =
        err({o1.detach(), q1.grad(), k1.grad(), v1.grad()}, [](const at::Tensor& x) { return x; });
    tol = 2 * single + 1e-3;
    EXPECT_LT(single, 5e-2) << "bf16 single process against float64";
  }
  EXPECT_LT(w.item<double>(), tol) << what;
  if (world->rank() == 0)
    std::printf("[ cp ] %-40s max rel diff %.2e (bar %.2e)\n", what.c_str(), w.item<double>(), tol);
}

TEST(ContextAttention, RingEqualsFullAttention) {
  if (loom::testing::world()->size() < 2) GTEST_SKIP() << "needs mpirun with 2+ ranks";
  expect_cp_matches({CpCommType::kP2P, 0, 2, true, 0});
  expect_cp_matches({CpCommType::kP2P, 0, 2, false, 4});  // small tiles: skipping inside blocks
  expect_cp_matches({CpCommType::kP2P, 0, 2, false, 8});  // one tile per chunk: counted
  expect_cp_matches({CpCommType::kP2P, 0, 8, true, 5});
  expect_cp_matches({CpCommType::kP2P, 0, 2, true, 0, true});
}

TEST(ContextAttention, AllToAllEqualsFullAttention) {
  if (loom::testing::world()->size() < 2) GTEST_SKIP() << "needs mpirun with 2+ ranks";
  expect_cp_matches({CpCommType::kA2A, 0, 2, true, 0});  // cp 4, 8: KV heads replicated
  expect_cp_matches({CpCommType::kA2A, 0, 8, false, 3});
  expect_cp_matches({CpCommType::kA2A, 0, 2, true, 0, true});
}

TEST(ContextAttention, HierarchicalEqualsFullAttention) {
  const int n = loom::testing::world()->size();
  if (n < 4) GTEST_SKIP() << "a2a+p2p needs 4+ ranks";
  expect_cp_matches({CpCommType::kA2AP2P, 2, 2, true, 0});
  expect_cp_matches({CpCommType::kA2AP2P, n / 2, 1, true, 4});
}

TEST(ContextAttention, HeadsThatCannotSplitAreRefused) {
  try {
    loom::parallel::check_cp_heads(6, 6, 4, 2);
    ADD_FAILURE() << "6 heads over an all-to-all of 4 must be refused";
  } catch (const loom::Error& e) {
    EXPECT_EQ(e.kind(), loom::ErrorKind::kConfig);
    EXPECT_NE(std::string(e.what()).find("6 % 4 = 2"), std::string::npos) << e.what();
  }
  try {
    loom::parallel::check_cp_heads(12, 3, 4, 1);
    ADD_FAILURE() << "3 KV heads over an all-to-all of 4 must be refused";
  } catch (const loom::Error& e) {
    EXPECT_NE(std::string(e.what()).find("3 KV heads"), std::string::npos) << e.what();
  }
}

}  // namespace

// ---- model level: the Trainer under CP layouts against the single process ----

using loom::testing::Layout;

namespace cpl {

Layout layout(const std::string& model, int cp, const std::string& comm, int tp = 1, int pp = 1,
              int layers = 2) {
  Layout c;
  c.model = model;
  c.cp = cp;
  c.cp_comm = comm;
  c.tp = tp;
  c.sp = tp > 1;
  c.pp = pp;
  c.layers = layers;
  c.micro = 2;
  if (pp > 1) c.schedule = "1f1b";
  return c;
}

// Packed rows are padded to a multiple of cp (x tp); padding counts in no MoE statistic, so the
// balance and z losses still equal the single process's, which pads nothing.
Layout docs(Layout c) {
  c.documents = true;
  return c;
}

}  // namespace cpl

TEST(ContextParallelLayouts, EqualTheSingleProcess) {
  // 20 steps, every loss (1e-5), gradient tensor (1e-5 per tensor, steps 1 and 5), the evaluation
  // and the final parameters (1e-4) against one process, through expect_layout_matches.
  LOOM_REQUIRE_PARALLEL_WORLD_CP();
  const int n = loom::testing::world()->size();
  using cpl::docs;
  using cpl::layout;
  std::vector<Layout> v;
  if (n == 2) {
    v.push_back(layout("gpt", 2, "p2p"));
    v.push_back(layout("moe", 2, "a2a"));
    Layout d = docs(layout("gpt", 2, "p2p"));
    d.block = 4;  // tiles inside each ring step
    v.push_back(d);
    v.push_back(docs(layout("moe", 2, "a2a")));
  } else if (n == 4) {
    Layout h = layout("gpt", 4, "a2a+p2p");
    h.cp_a2a = 2;
    v.push_back(h);
    v.push_back(docs(layout("gpt2", 4, "p2p")));
    v.push_back(layout("gpt", 2, "p2p", 2));              // cp2 x tp2 (SP)
    v.push_back(docs(layout("moe", 2, "a2a", 1, 2, 4)));  // cp2 x pp2
    Layout z = docs(layout("gpt", 2, "a2a"));             // cp2 x dp2, ZeRO-1 over dp-cp
    z.zero = true;
    v.push_back(z);
    Layout m = layout("moe", 2, "p2p");  // cp2 x dp2, MoE balance loss over CP
    m.recompute = true;
    m.sources = 2;  // the expert-by-source tables of CP shards
    v.push_back(m);
    Layout i = layout("gpt", 2, "p2p", 1, 2, 4);  // cp2 x pp2, interleaved and zero-bubble
    i.schedule = "interleaved";
    i.vp = 2;
    v.push_back(i);
    Layout zb = docs(layout("moe", 2, "a2a", 1, 2, 4));
    zb.schedule = "zb-h1";
    v.push_back(zb);
  } else if (n == 8) {
    v.push_back(layout("gpt", 2, "p2p", 2, 2, 4));    // cp2 x tp2 (SP) x pp2
    v.push_back(docs(layout("gpt", 8, "p2p")));       // cp8: 2 of every 16 tokens per rank
    Layout h = docs(layout("moe", 4, "a2a+p2p", 2));  // cp4 (a2a 2) x tp2
    h.cp_a2a = 2;
    v.push_back(h);
  }
  ASSERT_FALSE(v.empty()) << "no CP layout for " << n << " ranks";
  for (const auto& c : v) loom::testing::expect_layout_matches(c);
}

TEST(ContextParallelLayouts, BadLayoutsNameTheFieldAndTheArithmetic) {
  LOOM_REQUIRE_PARALLEL_WORLD_CP();
  const int n = loom::testing::world()->size();
  auto job = [&](int cp, const std::string& comm) {
    auto j = loom::testing::tiny_job(false);
    j.mutable_parallel()->set_cp(cp);
    j.mutable_parallel()->set_cp_comm_type(comm);
    j.mutable_train()->set_micro_batch_size(16 / (n / cp));
    return j;
  };
  auto j = job(n, "p2p");
  j.mutable_train()->set_seq_len(15);
  loom::testing::expect_config_error(
      j, fmt::format("train.seq_len = 15 is not divisible by {} (15 % {} = {})", n, n, 15 % n));
  j = job(n, "a2a");
  j.mutable_model()->set_num_heads(n == 2 ? 1 : 2);
  j.mutable_model()->set_num_kv_heads(1);
  loom::testing::expect_config_error(
      j, fmt::format("{} query heads (model.num_heads): {} % {} = {}", n == 2 ? 1 : 2,
                     n == 2 ? 1 : 2, n, n == 2 ? 1 : 2));
  j = job(n, "ring");
  loom::testing::expect_config_error(j, "field 'parallel.cp_comm_type' is 'ring'");
  if (n >= 4) {
    j = job(n, "a2a+p2p");
    j.mutable_parallel()->set_cp_a2a_size(3);
    loom::testing::expect_config_error(j, "parallel.cp_a2a_size = 3 must divide parallel.cp");
  }
  j = job(n, "p2p");
  j.mutable_parallel()->set_order("tp-dp-pp");
  loom::testing::expect_config_error(j, fmt::format("order 'tp-dp-pp' omits 'cp', but cp={}", n));
}

TEST(ContextParallelLayouts, CheckpointsAreLayoutFree) {
  // Saved under cp 2 (with ZeRO-1 over dp-cp), loaded under cp 1 and cp 4 (np 4); every step after
  // the load and the final parameters equal a single process that never stopped.
  LOOM_REQUIRE_PARALLEL_WORLD_CP();
  auto world = loom::testing::world();
  if (world->size() != 4) GTEST_SKIP() << "the resume layouts are planned for 4 ranks";
  Layout a = cpl::layout("gpt", 2, "p2p");
  a.zero = true;
  Layout b1 = cpl::layout("gpt", 1, "p2p", 2);  // cp 1: tp2 x dp2
  Layout b2 = cpl::layout("gpt", 4, "a2a");
  a.steps = b1.steps = b2.steps = 6;
  const std::string dir = loom::testing::shared_dir("cp-relayout");
  auto ja = loom::testing::layout_job(a);
  ja.mutable_train()->set_checkpoint_dir(dir);
  std::string saved;
  Trainer single(loom::testing::layout_single_job(a),
                 std::make_shared<loom::comm::LocalCommunicator>());
  {
    Trainer first(ja, world);
    saved = loom::testing::train_then_save(single, first, 3);
  }
  for (const Layout& b : {b1, b2}) {
    loom::testing::expect_resume_continues(loom::testing::layout_single_job(a), saved, 3, b, 3,
                                           a.str() + " -> " + b.str());
  }
  world->barrier();
  if (world->rank() == 0) std::filesystem::remove_all(dir);
}
