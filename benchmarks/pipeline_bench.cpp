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
#include <ATen/Parallel.h>
#include <nlohmann/json.hpp>
#include <torch/csrc/autograd/custom_function.h>

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

namespace {

using namespace loom::parallel::pipeline;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

void sleep_ms(double ms) { std::this_thread::sleep_for(std::chrono::duration<double, std::milli>(ms)); }

// Identity whose forward takes `fwd` ms and backward `bwd` ms.
struct Timed : torch::autograd::Function<Timed> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, double fwd, double bwd) {
    ctx->saved_data["bwd"] = bwd;
    sleep_ms(fwd);
    return x.clone();
  }
  static variable_list backward(AutogradContext* ctx, variable_list g) {
    sleep_ms(ctx->saved_data["bwd"].toDouble());
    return {g[0], at::Tensor(), at::Tensor()};
  }
};

int run(int argc, char** argv) {
  loom::cli::CommandLine cl(argc, argv,
                            {{"f", "4", "forward pass time (ms)"},
                             {"b", "4", "backward (input-gradient) pass time (ms)"},
                             {"w", "4", "weight-gradient pass time (ms)"},
                             {"hidden", "256", "activation [s, b, h]: h"},
                             {"seq", "128", "activation [s, b, h]: s"},
                             {"json", "", "also write the rows to this JSON file"}},
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
      callbacks.parameters = [&](int) { return std::vector<at::Tensor>{weight}; };
      callbacks.forward = [&](int, int, const at::Tensor& input) {
        at::Tensor x = input.defined() ? input : at::zeros({s, 2, h}, at::kDouble).requires_grad_(true);
        // B's time sits on the input path; W's on a branch only the weight reaches (so a split
        // backward runs them in different passes, a plain one both).
        at::Tensor y = Timed::apply(x, cf, cb) + Timed::apply(weight, 0.0, cw) * 0.0;
        ChunkOutput out;
        out.hidden = y;
        out.loss = y.sum() * 0.0;
        if (!input.defined()) out.b_target = x;
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
  if (world->rank() == 0 && !cl.get("json").empty()) {
    std::ofstream out(cl.get("json"));
    LOOM_CHECK_KIND(loom::ErrorKind::kIO, out.good(), "cannot write '{}'", cl.get("json"));
    out << nlohmann::json{{"stages", p}, {"rows", rows}}.dump(2) << "\n";
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  return loom::cli::guarded_main("pipeline_bench", [&] { return run(argc, argv); }, 2);
}
