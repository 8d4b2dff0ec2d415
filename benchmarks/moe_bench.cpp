// moe_bench: the expert-parallel token dispatcher ([Note: expert parallelism]) on CPU ranks, at the
// layer level (one MoE block, forward + backward, fp32).
//
// Every rank holds its own micro-batch (different tokens: data parallelism). For ep in {1, 2, 4}
// (no larger than the world) the world splits into groups of ep ranks; each group holds the E
// experts once (E / ep per rank) and dispatches its tokens over the group. Reported per step, for
// group 0 (its slowest rank):
//   - all-to-all bytes every rank sent to other ranks, against the formula (exact): the dispatch
//     sends the rows for other ranks' experts (forward, and their output gradients again in the
//     combine's backward), and the combine returns the rows others sent (forward, and their input
//     gradients in the dispatch's backward): 2 x (sent + returned) x h x 4 bytes;
//   - the step time (median of --steps) and tokens/s per rank, and the ratio to ep = 1 (the local
//     layer: every expert on every rank, no dispatcher);
//   - the result against ep = 1 on the same micro-batch (the layer's output and loss; validated
//     before anything is timed).
//
//   mpirun -np 4 --bind-to none --oversubscribe build/cpu/benchmarks/moe_bench [--tokens 2048]
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <vector>

#include "loom/comm/bootstrap.h"
#include "loom/config.pb.h"
#include "loom/core/cli.h"
#include "loom/core/error.h"
#include "loom/core/logging.h"
#include "loom/core/timer.h"
#include "loom/model/gpt.h"
#include "loom/parallel/expert_parallel.h"

namespace {

double all_reduce(loom::comm::Communicator& c, double v, loom::comm::ReduceOp op) {
  return loom::comm::all_reduce_scalar(v, &c, op);
}

int run(int argc, char** argv) {
  loom::cli::CommandLine cl(
      argc, argv,
      {{"tokens", "2048", "tokens per rank and step (rows of 256)"},
       {"hidden", "256", "hidden size"},
       {"experts", "8", "experts"},
       {"top-k", "2", "experts per token"},
       {"ffn", "512", "expert FFN width"},
       {"steps", "5", "timed steps (median)"},
       {"json", "", "also write the rows to this JSON file"}},
      "Expert-parallel MoE layer: all-to-all bytes against the formula, step time and tokens/s "
      "at ep 1/2/4 against the local layer.");
  if (cl.handled_help()) return 0;
  loom::comm::Bootstrap boot;
  auto world = boot.world();
  {
    loom::log::LogOptions o;
    o.level = "warn";
    loom::log::init(o);
  }
  at::set_num_threads(1);  // ranks share the cores
  const int64_t h = cl.get_int("hidden"), e = cl.get_int("experts"), s = 256;
  const int64_t rows = std::max<int64_t>(1, cl.get_int("tokens") / s);
  loom::config::ModelConfig mc;
  mc.set_vocab_size(1024);
  mc.set_hidden_size(static_cast<int>(h));
  mc.set_num_layers(1);
  mc.set_num_heads(4);
  mc.set_max_seq_len(static_cast<int>(s));
  auto* m = mc.mutable_moe();
  m->set_num_experts(static_cast<int>(e));
  m->set_top_k(static_cast<int>(cl.get_int("top-k")));
  m->set_expert_ffn_hidden_size(static_cast<int>(cl.get_int("ffn")));
  const auto spec = loom::model::ModelSpec::from_config(mc);
  auto gen = at::make_generator<at::CPUGeneratorImpl>(static_cast<uint64_t>(world->rank()) + 1);
  loom::model::Batch batch;
  batch.tokens = at::randint(1024, {rows, s}, gen, at::kLong);
  batch.targets = at::randint(1024, {rows, s}, gen, at::kLong);

  std::vector<int> eps{1};
  for (int g = 2; g <= world->size() && g <= 4 && e % g == 0; g *= 2) eps.push_back(g);
  if (world->rank() == 0) {
    std::printf(
        "world %d ranks, 1 thread each; %lld tokens per rank, h %lld, %lld experts top-%lld, "
        "FFN %lld, fp32\n",
        world->size(), static_cast<long long>(rows * s), static_cast<long long>(h),
        static_cast<long long>(e), static_cast<long long>(cl.get_int("top-k")),
        static_cast<long long>(cl.get_int("ffn")));
    std::printf("%3s %14s %14s %6s %10s %10s %8s %10s\n", "ep", "a2a bytes", "formula", "exact",
                "step ms", "tok/s", "vs ep1", "max diff");
  }
  nlohmann::json out = nlohmann::json::array();
  double base_seconds = 0;
  at::Tensor base_loss;
  for (int ep : eps) {
    auto group = world->split(world->rank() / ep, world->rank());
    const auto ex =
        loom::parallel::make_expert_parallel(ep > 1 ? group : nullptr, ep, group->rank(), 1, 0);
    loom::model::GptModel model(spec, 7, at::kCPU, {}, 128, {}, {}, ex);
    auto step = [&] {
      model.zero_grad();
      auto o = model.forward(batch);
      (o.loss_sum / static_cast<double>(rows * s) + o.aux_loss).backward();
      return o;
    };
    // Validate against ep = 1 (the same micro-batch on this rank) and count the bytes.
    loom::parallel::dispatcher_bytes() = 0;
    const auto o = step();
    const int64_t bytes = loom::parallel::dispatcher_bytes();
    const at::Tensor loss = at::stack({o.loss_sum.detach(), o.aux_loss.detach()});
    if (ep == 1) base_loss = loss;
    double diff = (loss - base_loss).abs().max().item<double>() /
                  std::max(1e-30, base_loss.abs().max().item<double>());
    // Formula, from every group member's per-expert counts (dropless: every row is kept): this
    // rank sends its rows for other ranks' experts (dispatch forward, combine backward) and
    // returns the rows others sent it (combine forward, dispatch backward).
    const int64_t local = e / ep, mine = group->rank();
    at::Tensor counts = at::zeros({e}, at::kLong);
    for (const auto& [layer, st] : model.moe_stats()) counts += st.tokens_per_expert;
    at::Tensor all = at::empty({ep, e}, at::kLong);
    if (ep > 1) {
      group->all_gather(all, counts);
    } else {
      all[0].copy_(counts);
    }
    int64_t sent = 0, returned = 0;
    for (int64_t src = 0; src < ep; ++src) {
      for (int64_t x = 0; x < e; ++x) {
        const int64_t n = all[src][x].item<int64_t>();
        if (src == mine && x / local != mine) sent += n;
        if (src != mine && x / local == mine) returned += n;
      }
    }
    const int64_t formula = 2 * (sent + returned) * h * 4;
    std::vector<double> times;
    for (int64_t i = 0; i < cl.get_int("steps"); ++i) {
      group->barrier();
      loom::Stopwatch clock;
      step();
      times.push_back(clock.seconds());
    }
    std::sort(times.begin(), times.end());
    double secs = times[times.size() / 2];
    secs = all_reduce(*group, secs, loom::comm::ReduceOp::kMax);
    diff = all_reduce(*world, diff, loom::comm::ReduceOp::kMax);
    const bool exact =
        all_reduce(*world, bytes == formula ? 0.0 : 1.0, loom::comm::ReduceOp::kMax) == 0.0;
    const double bytes0 = all_reduce(*world, world->rank() == 0 ? static_cast<double>(bytes) : 0,
                                     loom::comm::ReduceOp::kSum);
    const double formula0 = all_reduce(
        *world, world->rank() == 0 ? static_cast<double>(formula) : 0, loom::comm::ReduceOp::kSum);
    if (ep == 1) base_seconds = secs;
    if (world->rank() == 0) {
      const double tps = static_cast<double>(rows * s) / secs;
      std::printf("%3d %14.0f %14.0f %6s %10.1f %10.0f %8.2f %10.1e\n", ep, bytes0, formula0,
                  exact ? "yes" : "NO", secs * 1e3, tps, base_seconds / secs, diff);
      std::fflush(stdout);
      out.push_back({{"ep", ep},
                     {"a2a_bytes_rank0", bytes0},
                     {"formula_rank0", formula0},
                     {"exact_all_ranks", exact},
                     {"step_s", secs},
                     {"tokens_per_s_per_rank", tps},
                     {"speed_vs_ep1", base_seconds / secs},
                     {"max_rel_diff", diff}});
    }
    LOOM_CHECK(exact, "ep {}: the dispatcher moved {} bytes on some rank, the formula says {}", ep,
               bytes, formula);
    LOOM_CHECK(diff < 1e-4, "ep {}: the loss differs from ep 1 by {}", ep, diff);
  }
  if (world->rank() == 0 && !cl.get("json").empty()) {
    std::ofstream f(cl.get("json"));
    LOOM_CHECK_KIND(loom::ErrorKind::kIO, f.good(), "cannot write '{}'", cl.get("json"));
    f << nlohmann::json{{"world", world->size()}, {"rows", out}}.dump(2) << "\n";
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  return loom::cli::guarded_main(
      "moe_bench", [&] { return run(argc, argv); }, 2);
}
