// hdp_bench: hybrid data parallelism (parallel.hdp) against a static context-parallel mesh and DP
// packing, end to end in the Trainer on the CPU ranks of the world, on documents (DOCUMENTS mode,
// cut into pieces of at most seq tokens): --corpus demo is the long-tailed demo corpus (15k short
// fortunes, mean 167 tokens, blended 0.8 : 0.2 with 17 licence texts of 18k tokens on average);
// --corpus synthetic the synthetic one (lengths uniform in [2, seq], 1 in 8 up to 4 seq: most
// pieces are long, no tail).
//
// The three layouts train the same model on the same global batches (the first step's loss must
// agree: it is printed):
//   hdp        one pool of n ranks, each holding at most C = seq / cp tokens per micro-batch; a
//              piece longer than C runs on a group of ranks (ring attention over pool views);
//   static cp  cp = seq / C ranks per micro-batch (ring attention over a fixed CP group), dp = n /
//              cp, micro-batches of cp x C tokens packed first fit: the same memory per rank;
//   dp packing dp = n, micro-batches of seq tokens packed first fit (each rank holds a whole piece:
//              cp times the memory per rank).
// Per layout: tokens/s (the steps after the first), and the imbalance of real compute over the
// ranks: each rank's forward + backward time less the time it waited for ring transfers, summed
// over the steps, max / mean.
//
//   mpirun -np 8 --oversubscribe --bind-to none build/cpu/benchmarks/hdp_bench --corpus demo
#include <ATen/Parallel.h>

#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "loom/comm/bootstrap.h"
#include "loom/core/cli.h"
#include "loom/core/error.h"
#include "loom/core/logging.h"
#include "loom/ops/context_attention.h"
#include "loom/train/trainer.h"

namespace {

struct Case {
  std::string name;
  int dp = 1, cp = 1;
  bool hdp = false;
  int64_t micro_tokens = 0;
};

struct Sizes {
  int64_t hidden, layers, seq, global;
  bool demo = false;  // the demo corpus (data/demo: fortunes and licence texts, 0.8 : 0.2)
};

loom::config::JobConfig job(const Sizes& z, const Case& c, int steps) {
  loom::config::JobConfig j;
  j.set_seed(7);
  auto* m = j.mutable_model();
  m->set_vocab_size(z.demo ? 320 : 1024);
  m->set_hidden_size(z.hidden);
  m->set_num_layers(z.layers);
  m->set_num_heads(8);
  m->set_num_kv_heads(4);
  m->set_ffn_hidden_size(z.hidden * 3);
  m->set_max_seq_len(z.seq);
  auto* t = j.mutable_train();
  t->set_steps(steps);
  t->set_seq_len(z.seq);
  t->set_global_batch_size(z.global);
  t->set_micro_batch_tokens(c.micro_tokens);
  t->set_progress("off");
  t->set_peak_tflops(1.0);
  t->set_prefetch(false);
  t->set_eval_every(0);
  j.mutable_data()->set_mode(loom::config::DataConfig::DOCUMENTS);
  if (z.demo) {
    auto* d = j.mutable_data();
    d->set_source(loom::config::DataConfig::INDEXED);
    d->add_paths("data/demo/fortunes");
    d->add_paths("data/demo/licenses");
    d->add_weights(0.8);
    d->add_weights(0.2);
    d->set_split("90,10");
  }
  j.mutable_logging()->set_dir("");
  auto* p = j.mutable_parallel();
  p->set_dp(c.dp);
  p->set_cp(c.cp);
  p->set_hdp(c.hdp);
  return j;
}

struct Measured {
  double tokens_per_s = 0, first_loss = 0, imbalance = 0, step_s = 0, wait_share = 0;
};

Measured measure(const loom::config::JobConfig& j, const loom::comm::CommunicatorPtr& world,
                 int steps) {
  loom::train::Trainer t(j, world);
  Measured m;
  double compute = 0, waited = 0, tokens = 0, seconds = 0;
  for (int s = 0; s < steps; ++s) {
    const double wait0 = loom::ops::cp_counters().ring_wait_s;
    const auto r = t.train_step();
    if (s == 0) {
      m.first_loss = r.loss;
      continue;  // warm-up
    }
    const double w = loom::ops::cp_counters().ring_wait_s - wait0;
    compute += r.forward_s + r.backward_s - w;
    waited += w;
    tokens += static_cast<double>(r.tokens);
    seconds += r.seconds;
  }
  const int n = world->size();
  at::Tensor all = at::zeros({n, 2}, at::kDouble);
  all[world->rank()][0] = compute;
  all[world->rank()][1] = waited;
  world->all_reduce(all);
  const at::Tensor c = all.select(1, 0);
  m.imbalance = (c.max() / c.mean()).item<double>();
  m.wait_share = (all.select(1, 1).sum() / (c.sum() + all.select(1, 1).sum())).item<double>();
  // The slowest rank's step time decides (all ranks finish a step together).
  at::Tensor sec = at::full({1}, seconds, at::kDouble);
  world->all_reduce(sec, {loom::comm::ReduceOp::kMax});
  m.step_s = sec.item<double>() / (steps - 1);
  m.tokens_per_s = tokens / sec.item<double>();
  return m;
}

int run(int argc, char** argv) {
  loom::cli::CommandLine cl(argc, argv,
                            {{"steps", "6", "training steps per layout (the first is a warm-up)"},
                             {"hidden", "128", "hidden size"},
                             {"layers", "2", "layers"},
                             {"seq", "1024", "longest piece (train.seq_len)"},
                             {"cp", "4", "the static mesh's CP size; C = seq / cp"},
                             {"global", "32", "documents per step"},
                             {"corpus", "synthetic",
                              "synthetic, or demo (data/demo from scripts/common.sh "
                              "loom_demo_corpus: short fortunes and long licence texts)"},
                             {"json", "", "also write the rows to this JSON file"}},
                            "Hybrid data parallelism against a static CP mesh and DP packing: "
                            "tokens/s and per-rank compute imbalance.");
  if (cl.handled_help()) return 0;
  loom::comm::Bootstrap boot;
  auto world = boot.world();
  at::set_num_threads(1);
  {
    loom::log::LogOptions o;
    o.level = "warn";
    loom::log::init(o);
  }
  const int steps = static_cast<int>(cl.get_int("steps"));
  LOOM_CHECK_CONFIG(steps >= 2, "flag --steps must be >= 2 (one warm-up step), got {}", steps);
  const std::string corpus = cl.get("corpus");
  LOOM_CHECK_CONFIG(corpus == "synthetic" || corpus == "demo",
                    "flag --corpus is '{}'; it takes synthetic or demo", corpus);
  const Sizes z{cl.get_int("hidden"), cl.get_int("layers"), cl.get_int("seq"), cl.get_int("global"),
                corpus == "demo"};
  const int n = world->size(), cp = static_cast<int>(cl.get_int("cp"));
  LOOM_CHECK_CONFIG(cp >= 1 && n % cp == 0 && z.seq % cp == 0,
                    "flag --cp = {} must divide the world ({}) and --seq ({})", cp, n, z.seq);
  const int64_t capacity = z.seq / cp;
  const std::vector<Case> cases = {{"hdp", n, 1, true, capacity},
                                   {"static cp", n / cp, cp, false, z.seq},
                                   {"dp packing", n, 1, false, z.seq}};
  if (world->rank() == 0) {
    std::printf(
        "world %d ranks, 1 thread each; %s corpus; model h=%lld L=%lld, pieces <= %lld tokens, "
        "%lld documents per step, C = %lld tokens per rank (hdp, static cp %d)\n\n",
        n, corpus.c_str(), static_cast<long long>(z.hidden), static_cast<long long>(z.layers),
        static_cast<long long>(z.seq), static_cast<long long>(z.global),
        static_cast<long long>(capacity), cp);
    std::printf(
        "| layout | tokens per rank and micro-batch | tokens/s | vs static cp | step s | compute "
        "imbalance (max/mean) | ring wait share | first loss |\n| --- | --- | --- | --- | --- | "
        "--- | --- | --- |\n");
  }
  nlohmann::json rows = nlohmann::json::array();
  std::vector<Measured> results;
  for (const auto& c : cases) results.push_back(measure(job(z, c, steps), world, steps));
  for (size_t i = 0; i < cases.size(); ++i) {
    const auto& c = cases[i];
    const auto& m = results[i];
    if (world->rank() == 0) {
      std::printf("| %s | %lld | %.0f | %.2f | %.3f | %.3f | %.3f | %.6f |\n", c.name.c_str(),
                  static_cast<long long>(c.hdp ? capacity : c.micro_tokens / c.cp), m.tokens_per_s,
                  m.tokens_per_s / results[1].tokens_per_s, m.step_s, m.imbalance, m.wait_share,
                  m.first_loss);
    }
    rows.push_back({{"layout", c.name},
                    {"tokens_per_s", m.tokens_per_s},
                    {"vs_static_cp", m.tokens_per_s / results[1].tokens_per_s},
                    {"step_s", m.step_s},
                    {"compute_imbalance", m.imbalance},
                    {"ring_wait_share", m.wait_share},
                    {"first_loss", m.first_loss}});
  }
  const std::string json = cl.get("json");
  if (!json.empty() && world->rank() == 0) std::ofstream(json) << rows.dump(2) << "\n";
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  return loom::cli::guarded_main(
      "hdp_bench", [&] { return run(argc, argv); }, 2);
}
