// parallel_bench: tensor/sequence and data parallelism on CPU ranks.
//
// For every (tp, dp) layout of the world (tp in {1, 2, 4} dividing it; SP off and on when tp > 1;
// the replicated optimizer and ZeRO-1 when dp > 1) it trains a small LLaMA-style model for a few
// steps and reports, per step and rank:
//   - the bytes the TP and DP communicators counted, against the analytical volume (below);
//   - the fraction of the DP gradient all-reduce hidden behind backward: 1 - (time finish() waited
//     with overlap) / (time it waited with the all-reduces issued after backward);
//   - tokens/s against DP = 1 (a world-of-one run of the same global batch on rank 0, measured
//     in the same job while the other ranks wait);
//   - with TP, tokens/s with the column-parallel linears' backward collectives started
//     asynchronously behind a GEMM (parallel.overlap_tp_comm) against the same run with them
//     serial ("TP async").
//
// Analytical volume (nccl-tests sizes: all-reduce the buffer, all-gather the output, reduce-scatter
// the input), per step with M micro-batches of N = s b tokens, L layers, hidden h, fp32 activations
// (4 bytes), P_local parameters per rank, and a vocabulary-parallel head:
//   TP, no SP: all-reduce  M [(4L + 2) N h 4 + 3 N 4] + partial + 8
//              (per layer 2 forward all-reduces (attention, MLP) and 2 backward (their inputs);
//               +1 embedding forward, +1 head-input backward; the cross-entropy's max, target logit
//               and sum-exp, N fp32 each; `partial`: TP-replicated gradients (MoE router, and the
//               norms under SP), 4 bytes per element; 8: the grad-norm's double)
//   TP, SP:    reduce-scatter M (4L + 2) N h 4, all-gather M (6L + 3) N h 4, all-reduce M 3 N 4 +
//              partial + 8 (Korthikanti et al.: the gathers and scatters replace the all-reduces
//              with the same bus traffic; the 2L + 1 extra gathers are the column-parallel linears'
//              backward re-gathers of their input, which SP saves only as its 1/tp sequence chunk)
//   DP:        replicated: all-reduce 4 P_local + 24 (the token count and the [loss, aux] doubles)
//              ZeRO-1: reduce-scatter 4 P_pad, all-gather 4 P_pad, all-reduce 24 + 16 (norm sums)
//
//   mpirun -np 4 --oversubscribe build/cpu/benchmarks/parallel_bench [--steps 6] [--json out.json]
#include <ATen/Parallel.h>

#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <vector>

#include "loom/comm/bootstrap.h"
#include "loom/comm/local_communicator.h"
#include "loom/core/cli.h"
#include "loom/core/error.h"
#include "loom/core/logging.h"
#include "loom/core/timer.h"
#include "loom/optim/distributed.h"
#include "loom/train/trainer.h"

namespace {

using loom::comm::OpKind;
using loom::train::Trainer;

struct Sizes {
  int64_t hidden, layers, seq, micro, global;
};

loom::config::JobConfig job(const Sizes& z, int tp, bool sp, int dp, bool zero, bool overlap,
                            int steps, bool tp_overlap = true) {
  loom::config::JobConfig j;
  j.set_seed(7);
  auto* m = j.mutable_model();
  m->set_vocab_size(1024);
  m->set_hidden_size(z.hidden);
  m->set_num_layers(z.layers);
  m->set_num_heads(8);
  m->set_num_kv_heads(4);
  m->set_ffn_hidden_size(z.hidden * 3);
  m->set_max_seq_len(z.seq);
  auto* t = j.mutable_train();
  t->set_steps(steps);
  t->set_seq_len(z.seq);
  t->set_micro_batch_size(z.micro);
  t->set_global_batch_size(z.global);
  t->set_progress("off");
  t->set_peak_tflops(1.0);
  t->set_prefetch(false);
  j.mutable_logging()->set_dir("");
  auto* p = j.mutable_parallel();
  p->set_tp(tp);
  p->set_sequence_parallel(sp);
  p->set_distributed_optimizer(zero);
  p->set_overlap_grad_reduce(overlap);
  p->set_overlap_tp_comm(tp_overlap);
  p->set_grad_bucket_mb(1.0);
  (void)dp;
  return j;
}

struct Measured {
  double tokens_per_s = 0;
  double wait_s = 0;                 // DP all-reduce time not hidden, per step
  loom::comm::OpStats tp[3], dp[3];  // all-reduce, all-gather, reduce-scatter; per step
  int64_t local_params = 0;
  int64_t zero_flat = 0;
};

Measured measure(const loom::config::JobConfig& j, loom::comm::CommunicatorPtr world, int steps) {
  Trainer t(j, world);
  t.train_step();  // warm-up
  auto tpc = t.groups().tp_group(), dpc = t.groups().dp_group();
  tpc->stats().reset();
  dpc->stats().reset();
  Measured m;
  world->barrier();
  loom::Stopwatch clock;
  double wait = 0;
  for (int s = 1; s < steps; ++s) {
    auto r = t.train_step();
    wait += r.grad_reduce_wait_s;
  }
  world->barrier();
  const int n = steps - 1;
  m.tokens_per_s =
      static_cast<double>(t.global_batch_size() * j.train().seq_len() * n) / clock.seconds();
  m.wait_s = wait / n;
  const OpKind kinds[3] = {OpKind::kAllReduce, OpKind::kAllGather, OpKind::kReduceScatter};
  for (int k = 0; k < 3; ++k) {
    m.tp[k] = tpc->size() > 1 ? tpc->stats().get(kinds[k]) : loom::comm::OpStats{};
    m.dp[k] = dpc->size() > 1 ? dpc->stats().get(kinds[k]) : loom::comm::OpStats{};
    for (auto* s : {&m.tp[k], &m.dp[k]}) {
      s->bytes /= n;
      s->calls /= n;
      s->seconds /= n;
    }
  }
  for (const auto& p : t.model().parameters()) m.local_params += p.tensor.numel();
  if (auto* z = dynamic_cast<loom::optim::DistributedAdamW*>(&t.optimizer()))
    m.zero_flat = z->flat_size();
  return m;
}

int run(int argc, char** argv) {
  loom::cli::CommandLine cl(
      argc, argv,
      {{"steps", "6", "training steps per case (the first is a warm-up)"},
       {"hidden", "128", "hidden size"},
       {"layers", "4", "layers"},
       {"seq", "128", "sequence length"},
       {"micro", "2", "micro-batch size"},
       {"global", "16", "global batch size"},
       {"json", "", "also write the rows to this JSON file"}},
      "Tensor/sequence and data parallelism: communication volume against the analytical "
      "formula, hidden gradient all-reduce, tokens/s against DP = 1.");
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
  const Sizes z{cl.get_int("hidden"), cl.get_int("layers"), cl.get_int("seq"), cl.get_int("micro"),
                cl.get_int("global")};
  const int world_size = world->size();

  // DP = 1 baseline: the same global batch in one process.
  double base_tps = 0;
  if (world->rank() == 0) {
    base_tps = measure(job(z, 1, false, 1, false, true, steps),
                       std::make_shared<loom::comm::LocalCommunicator>(), steps)
                   .tokens_per_s;
  }
  world->barrier();

  nlohmann::json rows = nlohmann::json::array();
  if (world->rank() == 0) {
    std::printf(
        "world %d ranks; model h=%lld L=%lld s=%lld, micro-batch %lld, global batch %lld; DP=1 "
        "baseline %.0f tok/s\n",
        world_size, static_cast<long long>(z.hidden), static_cast<long long>(z.layers),
        static_cast<long long>(z.seq), static_cast<long long>(z.micro),
        static_cast<long long>(z.global), base_tps);
    std::printf("%-22s %12s %12s %7s %12s %12s %7s %18s %9s %7s %9s\n", "layout", "TP bytes",
                "TP formula", "ratio", "DP bytes", "DP formula", "ratio", "hidden", "tok/s",
                "vs DP1", "TP async");
  }
  for (int tp : {1, 2, 4}) {
    if (world_size % tp != 0) continue;
    const int dp = world_size / tp;
    if (z.global % (z.micro * dp) != 0) continue;
    for (bool sp : tp > 1 ? std::vector<bool>{false, true} : std::vector<bool>{false}) {
      for (bool zero : dp > 1 ? std::vector<bool>{false, true} : std::vector<bool>{false}) {
        if (tp == 1 && dp == 1) continue;
        auto j = job(z, tp, sp, dp, zero, true, steps);
        Measured m = measure(j, world, steps);
        double hidden = std::nan(""), serial_ms = 0;
        if (dp > 1 && !zero) {
          Measured serial = measure(job(z, tp, sp, dp, zero, false, steps), world, steps);
          hidden = serial.wait_s > 0 ? 1.0 - m.wait_s / serial.wait_s : std::nan("");
          serial_ms = serial.wait_s * 1e3;
        }
        double tp_async = std::nan("");
        if (tp > 1 && !zero) {
          Measured serial_tp =
              measure(job(z, tp, sp, dp, zero, true, steps, /*tp_overlap=*/false), world, steps);
          tp_async = m.tokens_per_s / serial_tp.tokens_per_s;
        }
        const double M = static_cast<double>(z.global / (z.micro * dp));
        const double N = static_cast<double>(z.seq * z.micro), h = static_cast<double>(z.hidden);
        const double L = static_cast<double>(z.layers);
        double tp_formula = 0, tp_counted = 0;
        if (tp > 1) {
          const double act = M * (4 * L + 2) * N * h * 4;
          const double partial = sp ? (2 * L + 1) * h * 4 : 0;  // RMSNorm weights
          const double ar = M * 3 * N * 4 + partial + 8;
          const double regather = M * (2 * L + 1) * N * h * 4;
          tp_formula = sp ? 2 * act + regather + ar : act + ar;
          tp_counted = static_cast<double>(m.tp[0].bytes + m.tp[1].bytes + m.tp[2].bytes);
        }
        double dp_formula = 0, dp_counted = 0;
        if (dp > 1) {
          dp_formula = zero ? 8.0 * static_cast<double>(m.zero_flat) + 24 + 16
                            : 4.0 * static_cast<double>(m.local_params) + 24;
          dp_counted = static_cast<double>(m.dp[0].bytes + m.dp[1].bytes + m.dp[2].bytes);
        }
        if (world->rank() == 0) {
          std::string name = "tp" + std::to_string(tp) + " dp" + std::to_string(dp) +
                             (sp ? " sp" : "") + (zero ? " zero1" : "");
          std::printf("%-22s %12.0f %12.0f %7.4f %12.0f %12.0f %7.4f %18s %9.0f %7.3f %9s\n",
                      name.c_str(), tp_counted, tp_formula, tp > 1 ? tp_counted / tp_formula : 1.0,
                      dp_counted, dp_formula, dp > 1 ? dp_counted / dp_formula : 1.0,
                      std::isnan(hidden)
                          ? "-"
                          : fmt::format("{:.0f}% of {:.2f}ms", 100 * hidden, serial_ms).c_str(),
                      m.tokens_per_s, m.tokens_per_s / base_tps,
                      std::isnan(tp_async) ? "-" : fmt::format("{:.3f}", tp_async).c_str());
          rows.push_back(
              {{"layout", name},
               {"tp_bytes", tp_counted},
               {"tp_formula", tp_formula},
               {"dp_bytes", dp_counted},
               {"dp_formula", dp_formula},
               {"hidden_fraction", std::isnan(hidden) ? nlohmann::json() : nlohmann::json(hidden)},
               {"serial_allreduce_ms", serial_ms},
               {"tokens_per_s", m.tokens_per_s},
               {"vs_dp1", m.tokens_per_s / base_tps},
               {"tp_async_vs_serial",
                std::isnan(tp_async) ? nlohmann::json() : nlohmann::json(tp_async)}});
        }
      }
    }
  }
  if (world->rank() == 0 && !cl.get("json").empty()) {
    std::ofstream out(cl.get("json"));
    LOOM_CHECK_KIND(loom::ErrorKind::kIO, out.good(), "cannot write '{}'", cl.get("json"));
    out << nlohmann::json{{"world", world_size}, {"dp1_tokens_per_s", base_tps}, {"rows", rows}}
               .dump(2)
        << "\n";
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  return loom::cli::guarded_main(
      "parallel_bench", [&] { return run(argc, argv); }, 2);
}
