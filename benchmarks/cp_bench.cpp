// cp_bench: context-parallel attention on CPU ranks (the attention op alone, forward + backward,
// tiny heads so that 64K-token sequences run on a laptop-class CPU).
//
// For each sequence length and each cp in {1, 2, 4} (no larger than the world; cp = 1 is the
// blockwise kernel on one rank), ring attention (parallel.cp_comm_type p2p) over the balanced split
// of one sequence, and reports per step:
//   - K/V bytes every rank sent around the ring, against the closed formula (exact):
//       forward  (cp - 1) hops x 2 b nkv (s / cp) d e        (K and V in the input dtype, e bytes)
//       backward (cp - 1) hops of the same, and cp hops x 2 b nkv (s / cp) d 4 (dK, dV in fp32)
//   - the fraction of the ring transfer hidden behind compute: bytes of the hops already complete
//     when the block compute they overlap ended (the transfers are polled between tiles), over all
//     bytes sent (the last dK/dV hop has nothing after it to hide behind: at most 1 - 1/(3cp-2));
//   - peak bytes per rank of the attention op above its inputs (a counting CPU allocator);
//   - tokens/s of the whole sequence (forward + backward; the median of up to 5 steps), and its
//     ratio to cp = 1;
//   - the output and q/k/v gradients against cp = 1's (validated before anything is timed);
// then the peak bytes per rank of a whole model step (forward and backward of a small model) at
// cp 1/2/4 and their ratio to cp = 1 (goal: 1/cp within 10%); and, without communication, the
// per-rank attention work imbalance (max / mean key visits) of the
// balanced split against the contiguous split on a long-tail document mix.
//
//   mpirun -np 4 --oversubscribe build/cpu/benchmarks/cp_bench [--max-seq 65536] [--threads 2]
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <c10/core/CPUAllocator.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <numeric>
#include <random>
#include <vector>

#include "loom/comm/bootstrap.h"
#include "loom/config.pb.h"
#include "loom/core/cli.h"
#include "loom/core/error.h"
#include "loom/core/logging.h"
#include "loom/core/timer.h"
#include "loom/model/gpt.h"
#include "loom/ops/context_attention.h"
#include "loom/ops/functional.h"
#include "loom/parallel/context_parallel.h"

namespace {

// Counts live CPU bytes and their peak (installed in front of the default CPU allocator).
class CountingAllocator final : public c10::Allocator {
 public:
  explicit CountingAllocator(c10::Allocator* base) : base_(base) {}
  c10::DataPtr allocate(size_t n) const override {
    c10::DataPtr inner = base_->allocate(n);
    void* data = inner.get();
    auto* ctx = new Block{std::move(inner), static_cast<int64_t>(n)};
    const int64_t now = live_.fetch_add(ctx->bytes) + ctx->bytes;
    int64_t peak = peak_.load();
    while (now > peak && !peak_.compare_exchange_weak(peak, now)) {
    }
    return {data, ctx, &release, c10::Device(c10::DeviceType::CPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return nullptr; }
  static int64_t live() { return live_.load(); }
  static int64_t peak() { return peak_.load(); }
  static void reset_peak() { peak_.store(live_.load()); }

 private:
  struct Block {
    c10::DataPtr inner;
    int64_t bytes;
  };
  static void release(void* p) {
    auto* b = static_cast<Block*>(p);
    live_.fetch_sub(b->bytes);
    delete b;
  }
  c10::Allocator* base_;
  static std::atomic<int64_t> live_, peak_;
};
std::atomic<int64_t> CountingAllocator::live_{0};
std::atomic<int64_t> CountingAllocator::peak_{0};

// Waits for the other ranks without spinning on the cores the measured ranks use.
void quiet_barrier(loom::comm::Communicator& c) {
  auto w = c.ibarrier();
  while (!w->is_completed()) usleep(20000);
  w->wait();
}

double all_reduce_max(loom::comm::Communicator& c, double v) {
  return loom::comm::all_reduce_scalar(v, &c, loom::comm::ReduceOp::kMax);
}

struct Row {
  int64_t seq = 0;
  int cp = 1;
  double seconds = 0, peak = 0, hidden = NAN, max_diff = 0;
  double full_seconds = 0, full_peak = 0;  // cp = 1: full attention, where measured
  int64_t bytes = 0, formula = 0;
};

// Document lengths of a long-tail mix summing to s: Pareto-like (most short, a few near s / 2).
std::vector<int64_t> long_tail(int64_t s, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> u(0.0, 1.0);
  std::vector<int64_t> out;
  int64_t left = s;
  while (left > 0) {
    const double x = 16.0 / std::pow(1.0 - u(rng) * 0.999, 1.0 / 0.8);  // Pareto(16, 0.8)
    const int64_t len = std::min<int64_t>(left, std::max<int64_t>(1, static_cast<int64_t>(x)));
    out.push_back(len);
    left -= len;
  }
  std::shuffle(out.begin(), out.end(), rng);
  return out;
}

int run(int argc, char** argv) {
  loom::cli::CommandLine cl(
      argc, argv,
      {{"min-seq", "2048", "shortest sequence"},
       {"max-seq", "65536", "longest sequence (doubling from --min-seq)"},
       {"heads", "2", "query heads"},
       {"kv-heads", "1", "KV heads"},
       {"head-dim", "16", "head dimension"},
       {"block", "512", "attention tile (tokens)"},
       {"mem-max-seq", "16384", "longest sequence of the model-step memory table"},
       {"mem-hidden", "128", "hidden size of the model-step memory table"},
       {"threads", "0", "intra-op threads of the cp = 1 run (0: all cores); CP ranks use 1 each"},
       {"json", "", "also write the rows to this JSON file"}},
      "Context-parallel (ring) attention: K/V bytes against the formula, transfer hidden behind "
      "compute, peak memory and tokens/s against cp = 1, and the balanced split's work imbalance.");
  if (cl.handled_help()) return 0;
  static CountingAllocator counting(c10::GetDefaultCPUAllocator());
  c10::SetCPUAllocator(&counting, /*priority=*/100);
  loom::comm::Bootstrap boot;
  auto world = boot.world();
  {
    loom::log::LogOptions o;
    o.level = "warn";
    loom::log::init(o);
  }
  const int64_t nh = cl.get_int("heads"), nkv = cl.get_int("kv-heads"), d = cl.get_int("head-dim");
  const int64_t block = cl.get_int("block");
  const int cores = static_cast<int>(sysconf(_SC_NPROCESSORS_ONLN));
  const int base_threads =
      cl.get_int("threads") > 0 ? static_cast<int>(cl.get_int("threads")) : cores;
  std::vector<int> cps{1};
  for (int c = 2; c <= world->size() && c <= 4; c *= 2) cps.push_back(c);
  std::vector<std::shared_ptr<loom::comm::Communicator>> groups;
  for (int c : cps) groups.push_back(world->split(world->rank() < c ? 0 : -1, world->rank()));

  if (world->rank() == 0) {
    std::printf(
        "world %d ranks on %d cores; heads %lld, KV heads %lld, head dim %lld, tile %lld; "
        "cp = 1 runs %d intra-op thread(s), CP ranks 1 each\n",
        world->size(), cores, static_cast<long long>(nh), static_cast<long long>(nkv),
        static_cast<long long>(d), static_cast<long long>(block), base_threads);
    std::printf("%7s %3s %14s %14s %6s %8s %12s %8s %10s %8s %9s\n", "seq", "cp", "K/V bytes",
                "formula", "exact", "hidden", "peak/rank", "vs cp1", "tok/s", "vs cp1", "max diff");
  }
  nlohmann::json rows = nlohmann::json::array();
  for (int64_t s = cl.get_int("min-seq"); s <= cl.get_int("max-seq"); s *= 2) {
    // The same full q, k, v, dout on every rank (seeded); each CP rank keeps its tokens.
    auto gen = at::make_generator<at::CPUGeneratorImpl>(static_cast<uint64_t>(s));
    const auto opts = at::TensorOptions().dtype(at::kFloat);
    at::Tensor q = at::randn({1, nh, s, d}, gen, opts), k = at::randn({1, nkv, s, d}, gen, opts),
               v = at::randn({1, nkv, s, d}, gen, opts), g = at::randn({1, nh, s, d}, gen, opts);
    at::Tensor ref_out, ref_dq;  // cp = 1's, in global order (rank 0 of each group compares)
    double base_seconds = 0, base_peak = 0;
    for (size_t ci = 0; ci < cps.size(); ++ci) {
      const int cp = cps[ci];
      Row row;
      row.seq = s;
      row.cp = cp;
      auto group = groups[ci];
      if (group) {
        at::set_num_threads(cp == 1 ? base_threads : 1);
        const auto ctx = loom::parallel::make_context_parallel(
            cp > 1 ? group : nullptr, loom::parallel::CpCommType::kP2P, 0, block);
        const at::Tensor index = loom::parallel::balanced_cp_index(at::Tensor(), 1, s, cp);
        const at::Tensor docs = at::zeros_like(index);
        const at::Tensor mine = index[group->rank()];
        auto local = [&](const at::Tensor& x) { return x.index_select(2, mine[0]).contiguous(); };
        at::Tensor ql = local(q), kl = local(k), vl = local(v), gl = local(g);
        auto step = [&](at::Tensor* out, at::Tensor* dq) {
          at::Tensor qq = ql.clone().requires_grad_(true), kk = kl.clone().requires_grad_(true),
                     vv = vl.clone().requires_grad_(true);
          at::Tensor o = loom::ops::context_attention(qq, kk, vv, index, docs, ctx, block);
          o.backward(gl);
          if (out) *out = o.detach();
          if (dq) *dq = qq.grad();
        };
        // Validate: this split's output and dq against cp = 1's, in global order.
        at::Tensor o, dq;
        step(&o, &dq);
        if (cp == 1) {
          ref_out = o;
          ref_dq = dq;
        } else {
          at::Tensor all_o = at::empty({cp, 1, nh, s / cp, d}), all_dq = at::empty_like(all_o);
          group->all_gather(all_o, o.contiguous());
          group->all_gather(all_dq, dq.contiguous());
          if (group->rank() == 0) {
            double diff = 0;
            for (int r = 0; r < cp; ++r) {
              const at::Tensor idx = index[r][0];
              diff = std::max(
                  {diff, (all_o[r] - ref_out.index_select(2, idx)).abs().max().item<double>(),
                   (all_dq[r] - ref_dq.index_select(2, idx)).abs().max().item<double>() /
                       std::max(1e-30, ref_dq.abs().max().item<double>())});
            }
            row.max_diff = diff;
          }
        }
        // Timed steps (the median of up to 5; one at 64K), the peak counted above the inputs, the
        // counters of the last step.
        const int reps = static_cast<int>(std::clamp<int64_t>(65536 / s, 1, 5));
        std::vector<double> times;
        double peak = 0;
        loom::ops::CpCounters counters;
        for (int rep = 0; rep < reps; ++rep) {
          loom::ops::cp_counters() = {};
          CountingAllocator::reset_peak();
          const int64_t base = CountingAllocator::live();
          if (cp > 1) group->barrier();
          loom::Stopwatch clock;
          step(nullptr, nullptr);
          times.push_back(clock.seconds());
          peak = std::max(peak, static_cast<double>(CountingAllocator::peak() - base));
          counters = loom::ops::cp_counters();
        }
        std::sort(times.begin(), times.end());
        const double secs = times[times.size() / 2];
        if (std::getenv("CP_BENCH_DEBUG")) {
          std::fprintf(stderr,
                       "seq %lld cp %d rank %d: %.3f s, ring compute %.3f s, wait %.3f s, tiles "
                       "%lld/%lld/%lld\n",
                       static_cast<long long>(s), cp, world->rank(), secs, counters.ring_compute_s,
                       counters.ring_wait_s, static_cast<long long>(counters.tiles_full),
                       static_cast<long long>(counters.tiles_masked),
                       static_cast<long long>(counters.tiles_skipped));
        }
        row.seconds = cp > 1 ? all_reduce_max(*group, secs) : secs;
        row.peak = cp > 1 ? all_reduce_max(*group, peak) : peak;
        row.bytes = counters.kv_bytes + counters.grad_bytes;
        const int64_t n = s / cp;
        row.formula = cp > 1 ? 2 * (cp - 1) * 2 * nkv * n * d * 4 + cp * 2 * nkv * n * d * 4 : 0;
        if (cp > 1) {
          at::Tensor t = at::tensor(
              {static_cast<double>(counters.hidden_bytes), static_cast<double>(row.bytes)},
              at::kDouble);
          group->all_reduce(t);
          row.hidden = t[0].item<double>() / t[1].item<double>();
        }
        if (cp == 1) {
          base_seconds = row.seconds;
          base_peak = row.peak;
          // Full attention (the [s, s] score matrix) on the same rank, where it fits comfortably.
          if (s <= 8192) {
            at::Tensor qq = q.clone().requires_grad_(true), kk = k.clone().requires_grad_(true),
                       vv = v.clone().requires_grad_(true);
            CountingAllocator::reset_peak();
            const int64_t fbase = CountingAllocator::live();
            loom::Stopwatch full_clock;
            loom::ops::causal_attention(qq, kk, vv, at::Tensor()).backward(g);
            row.full_seconds = full_clock.seconds();
            row.full_peak = static_cast<double>(CountingAllocator::peak() - fbase);
          }
        }
      }
      quiet_barrier(*world);
      if (world->rank() == 0) {
        const bool exact = row.bytes == row.formula;
        std::printf("%7lld %3d %14lld %14lld %6s %8s %12.1f %8.3f %10.0f %8.2f %9.1e\n",
                    static_cast<long long>(s), cp, static_cast<long long>(row.bytes),
                    static_cast<long long>(row.formula), exact ? "yes" : "NO",
                    std::isnan(row.hidden) ? "-" : fmt::format("{:.0f}%", 100 * row.hidden).c_str(),
                    row.peak / (1 << 20), row.peak / base_peak,
                    static_cast<double>(s) / row.seconds, base_seconds / row.seconds, row.max_diff);
        if (row.full_seconds > 0) {
          std::printf(
              "%7s     full attention on one rank: %.0f tok/s, peak %.1f MiB (blockwise: "
              "%.2fx the speed, %.3fx the memory)\n",
              "", static_cast<double>(s) / row.full_seconds, row.full_peak / (1 << 20),
              row.full_seconds / row.seconds, row.peak / row.full_peak);
        }
        std::fflush(stdout);
        rows.push_back(
            {{"seq", s},
             {"cp", cp},
             {"kv_bytes", row.bytes},
             {"kv_formula", row.formula},
             {"hidden_fraction",
              std::isnan(row.hidden) ? nlohmann::json() : nlohmann::json(row.hidden)},
             {"peak_mib", row.peak / (1 << 20)},
             {"peak_vs_cp1", row.peak / base_peak},
             {"tokens_per_s", static_cast<double>(s) / row.seconds},
             {"speed_vs_cp1", base_seconds / row.seconds},
             {"max_diff", row.max_diff},
             {"full_attention_tokens_per_s",
              row.full_seconds > 0 ? nlohmann::json(static_cast<double>(s) / row.full_seconds)
                                   : nlohmann::json()},
             {"full_attention_peak_mib", row.full_seconds > 0
                                             ? nlohmann::json(row.full_peak / (1 << 20))
                                             : nlohmann::json()}});
        LOOM_CHECK(exact, "seq {} cp {}: {} K/V bytes moved, the formula says {}", s, cp, row.bytes,
                   row.formula);
        LOOM_CHECK(row.max_diff < 1e-4, "seq {} cp {}: differs from cp = 1 by {}", s, cp,
                   row.max_diff);
      }
    }
  }
  // Peak memory of a whole training step (a small model: activations, logits and the attention's
  // tiles), per rank, against cp = 1: the number to size a job by.
  nlohmann::json memory = nlohmann::json::array();
  if (world->rank() == 0) {
    std::printf(
        "\npeak bytes per rank of a model step (forward + backward; h %lld, %lld layers, "
        "vocab %lld, tile %lld) above the model and batch:\n%7s %3s %12s %8s %8s\n",
        static_cast<long long>(cl.get_int("mem-hidden")), static_cast<long long>(2),
        static_cast<long long>(1024), static_cast<long long>(block), "seq", "cp", "peak MiB",
        "vs cp1", "x cp");
  }
  for (int64_t s = cl.get_int("min-seq"); s <= cl.get_int("mem-max-seq"); s *= 2) {
    double base = 0;
    for (size_t ci = 0; ci < cps.size(); ++ci) {
      const int cp = cps[ci];
      auto group = groups[ci];
      double peak = 0;
      if (group) {
        at::set_num_threads(cp == 1 ? base_threads : 1);
        loom::config::ModelConfig mc;
        mc.set_vocab_size(1024);
        mc.set_hidden_size(static_cast<int>(cl.get_int("mem-hidden")));
        mc.set_num_layers(2);
        mc.set_num_heads(4);
        mc.set_num_kv_heads(1);
        mc.set_max_seq_len(static_cast<int>(s));
        mc.set_attention_block_size(static_cast<int>(block));
        const auto spec = loom::model::ModelSpec::from_config(mc);
        const auto ctx = loom::parallel::make_context_parallel(
            cp > 1 ? group : nullptr, loom::parallel::CpCommType::kP2P, 0, block);
        loom::model::GptModel model(spec, 7, at::kCPU, {}, 128, {}, ctx);
        auto gen = at::make_generator<at::CPUGeneratorImpl>(static_cast<uint64_t>(s));
        loom::model::Batch full;
        full.tokens = at::randint(1024, {1, s}, gen, at::kLong);
        full.targets = at::randint(1024, {1, s}, gen, at::kLong);
        const loom::model::Batch batch = loom::model::cp_shard(full, cp, group->rank());
        CountingAllocator::reset_peak();
        const int64_t before = CountingAllocator::live();
        model.forward(batch).loss_sum.backward();
        peak = static_cast<double>(CountingAllocator::peak() - before);
        if (cp > 1) peak = all_reduce_max(*group, peak);
        if (cp == 1) base = peak;
      }
      quiet_barrier(*world);
      if (world->rank() == 0) {
        std::printf("%7lld %3d %12.1f %8.3f %8.3f\n", static_cast<long long>(s), cp,
                    peak / (1 << 20), peak / base, peak / base * cp);
        std::fflush(stdout);
        memory.push_back({{"seq", s},
                          {"cp", cp},
                          {"peak_mib", peak / (1 << 20)},
                          {"vs_cp1", peak / base},
                          {"vs_cp1_times_cp", peak / base * cp}});
      }
    }
  }

  // The split's balance on a long-tail document mix (no communication).
  nlohmann::json balance = nlohmann::json::array();
  if (world->rank() == 0) {
    std::printf(
        "\nattention work imbalance (max / mean key visits per rank), long-tail documents, "
        "mean of 20 rows:\n%7s %3s %10s %12s\n",
        "seq", "cp", "balanced", "contiguous");
    for (int64_t s : {int64_t{8192}, int64_t{65536}}) {
      for (int cp : {2, 4, 8}) {
        double bal = 0, naive = 0;
        for (uint64_t seed = 0; seed < 20; ++seed) {
          const auto lengths = long_tail(s, seed);
          at::Tensor doc = at::empty({1, s}, at::kLong);
          int64_t at = 0;
          for (size_t i = 0; i < lengths.size(); ++i) {
            doc[0].narrow(0, at, lengths[i]).fill_(static_cast<int64_t>(i));
            at += lengths[i];
          }
          auto imb = [](const std::vector<double>& w) {
            return *std::max_element(w.begin(), w.end()) /
                   (std::accumulate(w.begin(), w.end(), 0.0) / static_cast<double>(w.size()));
          };
          bal += imb(loom::parallel::cp_attention_work(
              loom::parallel::balanced_cp_index(doc, 1, s, cp), doc));
          naive += imb(loom::parallel::cp_attention_work(
              loom::parallel::contiguous_cp_index(1, s, cp), doc));
        }
        std::printf("%7lld %3d %10.3f %12.3f\n", static_cast<long long>(s), cp, bal / 20,
                    naive / 20);
        balance.push_back(
            {{"seq", s}, {"cp", cp}, {"balanced", bal / 20}, {"contiguous", naive / 20}});
      }
    }
  }
  if (world->rank() == 0 && !cl.get("json").empty()) {
    std::ofstream out(cl.get("json"));
    LOOM_CHECK_KIND(loom::ErrorKind::kIO, out.good(), "cannot write '{}'", cl.get("json"));
    out << nlohmann::json{{"world", world->size()},
                          {"rows", rows},
                          {"memory", memory},
                          {"balance", balance}}
               .dump(2)
        << "\n";
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  return loom::cli::guarded_main(
      "cp_bench", [&] { return run(argc, argv); }, 2);
}
