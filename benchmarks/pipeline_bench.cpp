// pipeline_bench: the pipeline schedules' bubble on real ranks, against theory and the simulator.
//
// Each rank is one pipeline stage whose passes take a fixed time (they sleep: F, B and W of
// --f/--b/--w ms), so CPU noise and oversubscribed cores do not hide the schedule. The runner moves
// real activations ([s, b, h] doubles) between ranks with the same p2p as training. For every
// schedule and m it reports the measured bubble fraction 1 - m (F + B + W) / step time, the
// closed form (theoretical_bubble) and the simulator's value with the same pass times, and the
// activations held per stage (peak micro-batches in flight x bytes of one stage's activation).
//
//   mpirun -np 4 --oversubscribe build/cpu/benchmarks/pipeline_bench [--f 4 --b 4 --w 4] [--json out.json]
//
// --trainer true: the Trainer on a real LLaMA-style model instead (pp = the world, 4 layers per
// rank, --micro micro-batches of 2 x --seq tokens), every schedule: step time against 1F1B, the
// fraction of the step the stages wait on receives, and the activation bytes the pipeline
// communicator counted against 2 m (p v - 1) s b h 4 (each of the m micro-batches crosses the p v - 1
// boundaries between virtual stages forward, and its gradient crosses them back; fp32).
//
//   mpirun -np 2 --oversubscribe build/cpu/benchmarks/pipeline_bench --trainer true [--micro 8]
#include <ATen/Parallel.h>
#include <nlohmann/json.hpp>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/variable.h>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <thread>

#include "loom/comm/bootstrap.h"
#include "loom/core/cli.h"
#include "loom/core/error.h"
#include "loom/core/logging.h"
#include "loom/core/timer.h"
#include "loom/parallel/pipeline.h"
#include "loom/parallel/weight_grad_store.h"
#include "loom/train/trainer.h"

namespace {

using namespace loom::parallel::pipeline;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

void sleep_ms(double ms) { std::this_thread::sleep_for(std::chrono::duration<double, std::milli>(ms)); }

// Identity whose forward takes `fwd` ms and backward `bwd` ms. `deferrable`: the backward is a weight
// gradient, which a split backward defers to W (Note: deferred weight gradients).
struct Timed : torch::autograd::Function<Timed> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, double fwd, double bwd, bool deferrable) {
    ctx->saved_data["bwd"] = bwd;
    ctx->saved_data["deferrable"] = deferrable;
    ctx->save_for_backward({x});
    sleep_ms(fwd);
    return x.clone();
  }
  static variable_list backward(AutogradContext* ctx, variable_list g) {
    const double bwd = ctx->saved_data["bwd"].toDouble();
    at::Tensor grad = g[0];
    if (ctx->saved_data["deferrable"].toBool() &&
        loom::parallel::WeightGradStore::defer(
            {{torch::autograd::impl::gradient_edge(ctx->get_saved_variables()[0])}, [grad, bwd] {
               sleep_ms(bwd);
               return std::vector<at::Tensor>{grad};
             }})) {
      return {at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    }
    sleep_ms(bwd);
    return {grad, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

loom::config::JobConfig trainer_job(int p, int v, const char* schedule, int64_t hidden, int64_t seq, int m, int steps) {
  loom::config::JobConfig j;
  j.set_seed(5);
  auto* model = j.mutable_model();
  model->set_vocab_size(512);
  model->set_hidden_size(hidden);
  model->set_num_layers(4 * p);
  model->set_num_heads(static_cast<int>(hidden / 32));
  model->set_max_seq_len(seq);
  auto* t = j.mutable_train();
  t->set_steps(steps);
  t->set_seq_len(seq);
  t->set_micro_batch_size(2);
  t->set_global_batch_size(2 * m);
  t->set_progress("off");
  t->set_peak_tflops(1);
  t->set_prefetch(false);
  j.mutable_logging()->set_dir("");
  auto* par = j.mutable_parallel();
  par->set_pp(p);
  par->set_virtual_pp(v);
  par->set_pp_schedule(schedule);
  return j;
}

// Writes `j` to `path` (nothing when the path is empty).
void write_json(const std::string& path, const nlohmann::json& j) {
  if (path.empty()) return;
  std::ofstream out(path);
  LOOM_CHECK_KIND(loom::ErrorKind::kIO, out.good(), "cannot write '{}'", path);
  out << j.dump(2) << "\n";
}

int run_trainer(const loom::cli::CommandLine& cl, const loom::comm::CommunicatorPtr& world) {
  const int p = world->size();
  const int m = static_cast<int>(cl.get_int("micro"));
  const int64_t hidden = cl.get_int("model-hidden"), seq = cl.get_int("seq");
  const int steps = 4;
  nlohmann::json rows = nlohmann::json::array();
  if (world->rank() == 0) {
    std::printf("Trainer: %d stages, %d micro-batches of 2 x %lld tokens, hidden %lld, %d layers; %d timed steps\n", p,
                m, static_cast<long long>(seq), static_cast<long long>(hidden), 4 * p, steps - 1);
    std::printf("%-12s %3s %10s %9s %9s %14s %14s %7s\n", "schedule", "v", "step ms", "vs 1f1b", "pp wait",
                "p2p bytes", "formula", "ratio");
  }
  double base_ms = 0;
  const std::pair<const char*, int> schedules[] = {{"1f1b", 1}, {"afab", 1}, {"interleaved", 2}, {"zb-h1", 1}};
  for (const auto& [name, v] : schedules) {
    loom::train::Trainer t(trainer_job(p, v, name, hidden, seq, m, steps), world);
    auto& stats = t.groups().pp_group()->stats();
    t.train_step();  // warm-up
    const int64_t bytes_before = stats.get(loom::comm::OpKind::kSend).bytes;
    double seconds = 0, wait = 0;
    for (int i = 1; i < steps; ++i) {
      const auto sm = t.train_step();
      seconds += sm.seconds;
      wait += sm.pp_wait_s;
    }
    at::Tensor agg = at::tensor({static_cast<double>(stats.get(loom::comm::OpKind::kSend).bytes - bytes_before),
                                 wait / seconds, seconds},
                                at::kDouble);
    world->all_reduce(agg);
    const double bytes = agg[0].item<double>() / (steps - 1);
    const double wait_frac = agg[1].item<double>() / p;
    const double step_ms = agg[2].item<double>() / p / (steps - 1) * 1e3;
    const double formula = 2.0 * m * (p * v - 1) * static_cast<double>(seq * 2 * hidden * 4);
    if (base_ms == 0) base_ms = step_ms;
    if (world->rank() == 0) {
      std::printf("%-12s %3d %10.1f %9.3f %9.3f %14.0f %14.0f %7.3f\n", name, v, step_ms, step_ms / base_ms, wait_frac,
                  bytes, formula, bytes / formula);
      rows.push_back({{"schedule", name}, {"chunks", v}, {"step_ms", step_ms}, {"vs_1f1b", step_ms / base_ms},
                      {"pp_wait_fraction", wait_frac}, {"p2p_bytes", bytes}, {"formula", formula}});
    }
  }
  if (world->rank() == 0) write_json(cl.get("json"), {{"stages", p}, {"trainer", rows}});
  return 0;
}

int run(int argc, char** argv) {
  loom::cli::CommandLine cl(argc, argv,
                            {{"f", "4", "forward pass time (ms)"},
                             {"b", "4", "backward (input-gradient) pass time (ms)"},
                             {"w", "4", "weight-gradient pass time (ms)"},
                             {"hidden", "256", "activation [s, b, h]: h"},
                             {"seq", "128", "activation [s, b, h]: s"},
                             {"json", "", "also write the rows to this JSON file"},
                             {"trainer", "false", "run the Trainer on a real model instead of timed passes"},
                             {"micro", "8", "--trainer: micro-batches per step"},
                             {"model-hidden", "256", "--trainer: the model's hidden size"}},
                            "Pipeline schedules: measured bubble against theory and the simulator.");
  if (cl.handled_help()) return 0;
  loom::comm::Bootstrap boot;
  auto world = boot.world();
  at::set_num_threads(1);
  {
    loom::log::LogOptions o;
    o.level = "warn";
    loom::log::init(o);
  }
  if (cl.get_bool("trainer")) return run_trainer(cl, world);
  const int p = world->size();
  const double tf = cl.get_double("f"), tb = cl.get_double("b"), tw = cl.get_double("w");
  const int64_t h = cl.get_int("hidden"), s = cl.get_int("seq");
  const double act_bytes = static_cast<double>(s * 2 * h * 8);
  at::Tensor weight = at::zeros({1}, at::kDouble).requires_grad_(true);

  nlohmann::json rows = nlohmann::json::array();
  if (world->rank() == 0) {
    std::printf("%d stages; F %.1f ms, B %.1f ms, W %.1f ms (1F1B-style schedules run B + W as one backward); "
                "activation %.0f KiB\n",
                p, tf, tb, tw, act_bytes / 1024);
    std::printf("%-12s %4s %4s %10s %10s %10s %8s %22s\n", "schedule", "v", "m", "measured", "theory", "simulated",
                "ratio", "activations/stage MiB");
  }
  for (ScheduleKind kind : {ScheduleKind::kAllForwardAllBackward, ScheduleKind::k1F1B,
                            ScheduleKind::kInterleaved1F1B, ScheduleKind::kZeroBubbleH1}) {
    for (int m : {4, 8, 16}) {
      ScheduleOptions o;
      o.kind = kind;
      o.stages = p;
      o.chunks = kind == ScheduleKind::kInterleaved1F1B ? 2 : 1;
      o.microbatches = m;
      if (m < p && kind == ScheduleKind::kInterleaved1F1B) continue;
      const bool split = o.split_backward();
      // Per chunk, the pass times of a whole stage divided by the chunks.
      const double cf = tf / o.chunks, cb = tb / o.chunks, cw = tw / o.chunks;
      RunnerCallbacks callbacks;
      callbacks.activation_options = at::TensorOptions().dtype(at::kDouble);
      callbacks.shape = [&](int) { return std::vector<int64_t>{s, 2, h}; };
      callbacks.forward = [&](int, int, const at::Tensor& input) {
        at::Tensor x = input.defined() ? input : at::zeros({s, 2, h}, at::kDouble).requires_grad_(true);
        // B's time sits on the input path; W's on a branch only the weight reaches (so a split
        // backward runs them in different passes, a plain one both).
        at::Tensor y = Timed::apply(x, cf, cb, false) + Timed::apply(weight, 0.0, cw, true) * 0.0;
        ChunkOutput out;
        out.hidden = y;
        out.loss = y.sum() * 0.0;
        return out;
      };
      PipelineRunner runner(o, world);
      runner.run(callbacks);  // warm-up
      world->barrier();
      loom::Stopwatch clock;
      RunnerStats st = runner.run(callbacks);
      world->barrier();
      const double step = clock.seconds() * 1e3;
      const double work = m * (tf + tb + tw);
      const double measured = 1.0 - work / step;
      PassCosts c{cf, split ? cb : cb + cw, split ? cw : 0.0, 0.0};
      const double theory = theoretical_bubble(o, c);
      const double simulated = simulate(o, build_tables(o), c).bubble_fraction();
      at::Tensor peak = at::full({1}, static_cast<double>(st.peak_in_flight), at::kDouble);
      world->all_reduce(peak, {loom::comm::ReduceOp::kMax});
      const double mib = peak.item<double>() * act_bytes / o.chunks / (1 << 20);
      if (world->rank() == 0) {
        std::printf("%-12s %4d %4d %10.4f %10.4f %10.4f %8.3f %22.2f\n", schedule_name(kind), o.chunks, m, measured,
                    theory, simulated, measured / theory, mib);
        rows.push_back({{"schedule", schedule_name(kind)}, {"chunks", o.chunks}, {"microbatches", m},
                        {"measured", measured}, {"theory", theory}, {"simulated", simulated},
                        {"peak_in_flight", peak.item<double>()}, {"activation_mib", mib}, {"step_ms", step}});
      }
    }
  }
  if (world->rank() == 0) write_json(cl.get("json"), {{"stages", p}, {"rows", rows}});
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  return loom::cli::guarded_main("pipeline_bench", [&] { return run(argc, argv); }, 2);
}
