// plan_sim: plans hybrid-data-parallel steps ([Note: hybrid data parallelism plan]) for pools of
// 1k to 12,288 ranks on long-tailed length distributions and compares them with the layouts they
// replace, by the cost model T(s) = a s^2 + b s + c:
//   hdp      data::plan_hdp: each long sequence on as many ranks as it needs, short ones packed;
//   pow2     the same with groups rounded up to a power of two (Megatron-Core's dynamic CP);
//   static   a static mesh: cp fixed for the longest length the distribution allows (the smallest
//            power of two with cp x capacity >= it), every sequence split over its DP group's cp
//            ranks, sequences spread over the DP groups longest first to the least loaded;
//   dp       data parallelism with packing, every sequence whole on one rank (the ones longer than
//            the capacity would not fit in memory: counted).
// For each it reports the per-rank time imbalance (max / mean), the simulated step time (the
// busiest rank's: compute by the cost model, and for a sequence split over D ranks ring
// attention's D steps per layer, each the longer of its block's compute and the next K/V block's
// transfer plus a latency), the ring-attention traffic (tokens of K/V sent: s (D - 1) per
// sequence split over D ranks) and plan_hdp's run time. Plans are made by the cost model alone
// (--ring-aware 1: also knowing the ring's transfer time, Note: hybrid data parallelism ring cost);
// "hdp in slots / hdp" is the step as the Trainer runs the plan (slots: a group starts when its
// last member is ready; data::simulate_hdp_step) over the busiest rank's sum.
// With --stages S > 1 it also compares the balance modes (Note: hybrid data parallelism balance
// modes) under S-stage 1F1B pipelines, simulated in slots, on the network given and on one whose
// transfers hide behind compute.
//
//   build/cpu/tools/plan_sim [--ranks 1024,2048,4096,8192,12288] [--stages 4] [--out plan_sim]
#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <fstream>
#include <functional>
#include <map>
#include <numeric>
#include <queue>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "loom/core/cli.h"
#include "loom/core/error.h"
#include "loom/data/balance_scheduler.h"

namespace {

using loom::data::CostModel;
using loom::data::HdpOptions;
using loom::data::SampleRef;

// A length distribution: bins of (share of samples, lengths log-uniform in [lo, hi]).
struct Bin {
  double share, lo, hi;
};
struct Distribution {
  std::string name, description;
  std::vector<Bin> bins;
  double max_len() const {
    double m = 0;
    for (const auto& b : bins) m = std::max(m, b.hi);
    return m;
  }
};

// ByteScale's Byted corpus shape (their Fig. 4): 80% of samples <= 4K; 1% >= 128K holding about
// 44% of the tokens; 0.05% at 2M holding about 12%.
Distribution byted() {
  return {"byted",
          "ByteScale's production mix",
          {{0.80, 128, 4096},
           {0.19, 4096, 65536},
           {0.0095, 131072, 524288},
           {0.0005, 2097152, 2097152}}};
}

// A code-like corpus (GitHub in ByteScale's Fig. 4): about 16% of tokens in sequences > 128K and
// about 10% in > 256K.
Distribution code() {
  return {"code",
          "a code-like mix",
          {{0.70, 128, 4096},
           {0.25, 4096, 32768},
           {0.0455, 32768, 131072},
           {0.003, 131072, 262144},
           {0.0015, 262144, 1048576}}};
}

int64_t draw(const Distribution& d, std::mt19937_64& rng) {
  std::uniform_real_distribution<double> u(0, 1);
  double r = u(rng), acc = 0;
  const Bin* bin = &d.bins.back();
  for (const auto& b : d.bins) {
    acc += b.share;
    if (r < acc) {
      bin = &b;
      break;
    }
  }
  const double len =
      bin->lo == bin->hi
          ? bin->lo
          : std::exp(std::log(bin->lo) + u(rng) * (std::log(bin->hi) - std::log(bin->lo)));
  return static_cast<int64_t>(len);
}

// One global batch of at least `tokens` tokens (lengths are token counts + 1).
std::vector<SampleRef> batch(const Distribution& d, std::mt19937_64& rng, double tokens) {
  std::vector<SampleRef> v;
  double total = 0;
  while (total < tokens) {
    const int64_t s = draw(d, rng);
    v.push_back({static_cast<int64_t>(v.size()), s + 1});
    total += static_cast<double>(s);
  }
  return v;
}

// The time model: compute by the cost model, plus ring attention's transfers for a sequence split
// over D > 1 ranks. Per layer, each of the D ring steps computes a block (a s^2 / (D^2 L)) while
// the next K/V block (s / D tokens) moves, three times over (forward K/V, backward K/V and dK/dV):
// a step takes the longer of the two, plus the link latency.
struct Network {
  double kv_bytes = 0;  // K and V bytes per token and layer
  double layers = 1;
  double bandwidth = 1;     // bytes/s per rank
  double latency = 0;       // s per ring step
  bool ring_aware = false;  // the planner knows ring() (Note: hybrid data parallelism ring cost)
  // Seconds per token a group member spends streaming K/V through every layer (3 transfers).
  double ring() const { return 3 * kv_bytes * layers / bandwidth; }
};

double share_time(double s, double d, const CostModel& cost, const Network& net) {
  if (d <= 1) return cost(s);
  const double block = cost.a * s * s / (d * d * net.layers);
  const double move = 3 * net.kv_bytes * (s / d) / net.bandwidth + net.latency;
  return cost.c + cost.b * s / d + net.layers * d * std::max(block, move);
}

// A planned micro-batch's time on its rank by the time model.
double micro_batch_time(const loom::data::HdpPlan& plan, const loom::data::HdpMicroBatch& mb,
                        const std::vector<SampleRef>& b, const CostModel& cost,
                        const Network& net) {
  double t = 0;
  const double d =
      mb.group >= 0 ? static_cast<double>(plan.groups[static_cast<size_t>(mb.group)].ranks.size())
                    : 1.0;
  for (const int64_t i : mb.samples)
    t += share_time(static_cast<double>(b[static_cast<size_t>(i)].length - 1), d, cost, net);
  return t;
}

struct Result {
  double max = 0, mean = 0, traffic = 0, plan_ms = 0;
  double slots = 0;           // hdp: the step as the Trainer runs it (slots; simulate_hdp_step)
  double plan_imbalance = 0;  // hdp: by the cost model the plan balanced
  int64_t too_long = 0;       // dp: sequences longer than the capacity
  double imbalance() const { return mean > 0 ? max / mean : 1.0; }
};

// A plan of `b` under `o` (its cost and ring from the arguments), timed, and its step as the
// Trainer runs it on `stages` pipeline stages (simulate_hdp_step by the time model).
struct Timed {
  loom::data::HdpPlan plan;
  double plan_ms = 0, step = 0;
};

Timed plan_and_run(const std::vector<SampleRef>& b, HdpOptions o, const CostModel& cost,
                   const Network& net, int stages) {
  o.cost = cost;
  o.stages = stages;
  o.ring = net.ring_aware ? net.ring() : 0.0;
  Timed t;
  const auto start = std::chrono::steady_clock::now();
  t.plan = loom::data::plan_hdp(b, o);
  t.plan_ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
  const auto finish =
      loom::data::simulate_hdp_step(t.plan, stages, [&](int, const loom::data::HdpMicroBatch& mb) {
        return micro_batch_time(t.plan, mb, b, cost, net);
      });
  t.step = *std::max_element(finish.begin(), finish.end());
  return t;
}

Result hdp(const std::vector<SampleRef>& b, int ranks, int64_t capacity, const CostModel& cost,
           const Network& net, bool pow2) {
  HdpOptions o;
  o.pool = ranks;
  o.capacity = capacity;
  o.power_of_two_groups = pow2;
  const Timed t = plan_and_run(b, o, cost, net, 1);
  const auto& plan = t.plan;
  Result r;
  r.plan_ms = t.plan_ms;
  r.slots = t.step;
  std::vector<double> time(static_cast<size_t>(ranks), 0.0);
  for (size_t k = 0; k < plan.ranks.size(); ++k) {
    for (const auto& mb : plan.ranks[k]) time[k] += micro_batch_time(plan, mb, b, cost, net);
  }
  r.max = *std::max_element(time.begin(), time.end());
  r.mean = std::accumulate(time.begin(), time.end(), 0.0) / ranks;
  r.plan_imbalance = plan.imbalance();
  for (const auto& g : plan.groups) {
    const auto s = static_cast<double>(b[static_cast<size_t>(g.sample)].length - 1);
    r.traffic += s * static_cast<double>(g.ranks.size() - 1);
  }
  return r;
}

// Under pipeline parallelism: the step of a plan made in `balance` mode for `stages` stages, as the
// Trainer runs it (slots, 1F1B; simulate_hdp_step), and the real micro-batches per pipeline.
struct PipelineResult {
  double step = 0, ideal = 0, plan_ms = 0;
  size_t fewest = 0, most = 0;  // real micro-batches of a pipeline
};

PipelineResult pipelined(const std::vector<SampleRef>& b, int ranks, int64_t capacity,
                         const CostModel& cost, const Network& net, int stages,
                         loom::data::HdpBalance balance) {
  HdpOptions o;
  o.pool = ranks;
  o.capacity = capacity;
  o.balance = balance;
  const Timed t = plan_and_run(b, o, cost, net, stages);
  const auto& plan = t.plan;
  PipelineResult r;
  r.plan_ms = t.plan_ms;
  r.step = t.step;
  double total = 0;
  r.fewest = plan.ranks.front().size();
  for (const auto& mbs : plan.ranks) {
    for (const auto& mb : mbs) total += micro_batch_time(plan, mb, b, cost, net);
    r.fewest = std::min(r.fewest, mbs.size());
    r.most = std::max(r.most, mbs.size());
  }
  r.ideal = total / ranks / stages;  // every stage busy all the time
  return r;
}

// Sequences spread over `groups` equal groups of `width` ranks (of `ranks` in all), longest first
// to the least loaded by the cost model. With width > 1 (a static CP mesh) each group packs its
// sequences first fit into micro-batches of width x capacity tokens and runs one ring per
// micro-batch: its D = width steps per layer each compute the micro-batch's block (a sum s^2 /
// (D^2 L), every sequence attends itself) while the next K/V block of tokens / D moves. With
// width 1 (DP packing) every sequence runs whole on one rank; those longer than the capacity would
// not fit in memory (counted in too_long).
Result spread(const std::vector<SampleRef>& b, int groups, int width, int ranks, int64_t capacity,
              const CostModel& cost, const Network& net) {
  std::vector<double> lengths;
  for (const auto& x : b) lengths.push_back(static_cast<double>(x.length - 1));
  std::sort(lengths.begin(), lengths.end(), std::greater<>());
  using Entry = std::pair<double, int>;
  std::priority_queue<Entry, std::vector<Entry>, std::greater<>> least;
  for (int g = 0; g < groups; ++g) least.emplace(0.0, g);
  std::vector<std::vector<double>> members(static_cast<size_t>(groups));
  Result r;
  for (const double s : lengths) {
    auto [c, g] = least.top();
    least.pop();
    least.emplace(c + cost(s), g);
    members[static_cast<size_t>(g)].push_back(s);
    r.traffic += s * (width - 1);
    if (width == 1 && s > static_cast<double>(capacity)) ++r.too_long;
  }
  std::vector<double> time(static_cast<size_t>(ranks), 0.0);  // ranks outside the groups idle
  const double room = static_cast<double>(width) * static_cast<double>(capacity);
  for (int g = 0; g < groups; ++g) {
    double t = 0;
    if (width == 1) {
      for (const double s : members[static_cast<size_t>(g)]) t += cost(s);
    } else {
      struct MicroBatch {
        double tokens = 0, square = 0, count = 0;
      };
      std::vector<MicroBatch> mbs;
      for (const double s : members[static_cast<size_t>(g)]) {
        size_t at = 0;
        while (at < mbs.size() && mbs[at].tokens + s > room) ++at;
        if (at == mbs.size()) mbs.emplace_back();
        mbs[at].tokens += s;
        mbs[at].square += s * s;
        mbs[at].count += 1;
      }
      const double d = width;
      for (const auto& mb : mbs) {
        const double block = cost.a * mb.square / (d * d * net.layers);
        const double move = 3 * net.kv_bytes * (mb.tokens / d) / net.bandwidth + net.latency;
        t += cost.c * mb.count + cost.b * mb.tokens / d + net.layers * d * std::max(block, move);
      }
    }
    for (int k = 0; k < width; ++k) time[static_cast<size_t>(g * width + k)] = t;
  }
  r.max = *std::max_element(time.begin(), time.end());
  r.mean = std::accumulate(time.begin(), time.end(), 0.0) / ranks;
  return r;
}

std::vector<int> parse_ranks(const std::string& s) {
  std::vector<int> v;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) {
    const int n = std::stoi(item);
    LOOM_CHECK_CONFIG(n >= 1, "--ranks: {} is not a rank count", item);
    v.push_back(n);
  }
  LOOM_CHECK_CONFIG(!v.empty(), "--ranks is empty");
  std::sort(v.begin(), v.end());
  v.erase(std::unique(v.begin(), v.end()), v.end());
  return v;
}

// A line chart of y against log2(x) per series, as an SVG document.
std::string svg_chart(const std::string& title, const std::vector<int>& xs,
                      const std::vector<std::pair<std::string, std::vector<double>>>& series,
                      const std::string& y_label) {
  const double w = 640, h = 400, left = 70, right = 170, top = 40, bottom = 50;
  double ymax = 0;
  for (const auto& [name, ys] : series)
    for (double y : ys) ymax = std::max(ymax, y);
  ymax = ymax > 0 ? std::ceil(ymax * 1.1) : 1.0;
  const double lx0 = std::log2(xs.front()), lx1 = std::log2(xs.back());
  auto px = [&](double x) {
    return left + (lx1 > lx0 ? (std::log2(x) - lx0) / (lx1 - lx0) : 0.5) * (w - left - right);
  };
  auto py = [&](double y) { return top + (1 - y / ymax) * (h - top - bottom); };
  std::string out = fmt::format(
      "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{}\" "
      "font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" "
      "fill=\"white\"/>\n<text x=\"{}\" y=\"22\" font-size=\"14\">{}</text>\n",
      w, h, left, title);
  out += fmt::format("<line x1=\"{0}\" y1=\"{1}\" x2=\"{0}\" y2=\"{2}\" stroke=\"black\"/>\n", left,
                     top, h - bottom);
  out += fmt::format("<line x1=\"{0}\" y1=\"{1}\" x2=\"{2}\" y2=\"{1}\" stroke=\"black\"/>\n", left,
                     h - bottom, w - right);
  for (int i = 0; i <= 4; ++i) {
    const double y = ymax * i / 4;
    out += fmt::format(
        "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{:.2f}</text><line x1=\"{}\" y1=\"{}\" "
        "x2=\"{}\" y2=\"{}\" stroke=\"#ddd\"/>\n",
        left - 6, py(y) + 4, y, left, py(y), w - right, py(y));
  }
  for (int x : xs)
    out += fmt::format("<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n", px(x),
                       h - bottom + 18, x);
  out += fmt::format("<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">pool ranks</text>\n",
                     (left + w - right) / 2, h - 10);
  out += fmt::format(
      "<text x=\"16\" y=\"{}\" transform=\"rotate(-90 16 {})\" text-anchor=\"middle\">{}</text>\n",
      (top + h - bottom) / 2, (top + h - bottom) / 2, y_label);
  const char* colours[] = {"#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"};
  for (size_t k = 0; k < series.size(); ++k) {
    const auto& [name, ys] = series[k];
    const char* c = colours[k % 6];
    // A missing value (<= 0: the layout cannot run there) breaks the line.
    std::string points;
    auto flush = [&] {
      if (!points.empty())
        out += fmt::format(
            "<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"2\" points=\"{}\"/>\n", c,
            points);
      points.clear();
    };
    for (size_t i = 0; i < xs.size(); ++i) {
      if (!(ys[i] > 0)) {
        flush();
        continue;
      }
      points += fmt::format("{},{} ", px(xs[i]), py(ys[i]));
      out += fmt::format("<circle cx=\"{}\" cy=\"{}\" r=\"3\" fill=\"{}\"/>\n", px(xs[i]),
                         py(ys[i]), c);
    }
    flush();
    out += fmt::format(
        "<line x1=\"{0}\" y1=\"{1}\" x2=\"{2}\" y2=\"{1}\" stroke=\"{3}\" stroke-width=\"2\"/>"
        "<text x=\"{4}\" y=\"{5}\">{6}</text>\n",
        w - right + 10, top + 20 * k + 10, w - right + 30, c, w - right + 36, top + 20 * k + 14,
        name);
  }
  return out + "</svg>\n";
}

int run(int argc, char** argv) {
  loom::cli::CommandLine cl(
      argc, argv,
      {{"ranks", "1024,2048,4096,8192,12288", "pool sizes (dp x cp ranks) to plan for"},
       {"capacity", "8192", "tokens per rank and micro-batch"},
       {"tokens-per-rank", "32768", "global batch tokens per pool rank"},
       {"steps", "3", "global batches planned per configuration (figures are their means)"},
       {"cost-a", "1.97e-9",
        "T(s) = a s^2 + b s + c: a (default: LLaMA-7B attention at 400 TFLOP/s)"},
       {"cost-b", "1e-4", "b (default: LLaMA-7B GEMMs per token at 400 TFLOP/s)"},
       {"cost-c", "0", "c: per-sequence overhead"},
       {"kv-bytes", "16384", "K and V bytes per token and layer (LLaMA-7B, bf16: 2 x 4096 x 2)"},
       {"layers", "32", "layers"},
       {"bandwidth", "25e9", "bytes/s a rank sends and receives in ring attention"},
       {"latency", "2e-5", "seconds per ring step (a transfer's fixed cost)"},
       {"ring-aware", "0",
        "1: the planner knows the ring's transfer time per token (HdpOptions::ring); 0: not"},
       {"stages", "4", "pipeline stages for the balance-mode table (1F1B; 1: no such table)"},
       {"seed", "1", "random seed"},
       {"out", "plan_sim", "output prefix: <out>.md (tables) and <out>.svg (the plot)"}},
      "Plan hybrid-data-parallel steps at scale and compare them with a static mesh, "
      "power-of-two groups and DP packing.");
  if (cl.handled_help()) return 0;
  const auto ranks = parse_ranks(cl.get("ranks"));
  const int64_t capacity = cl.get_int("capacity");
  LOOM_CHECK_CONFIG(capacity >= 1, "--capacity must be >= 1, got {}", capacity);
  const double per_rank = cl.get_double("tokens-per-rank");
  const int steps = static_cast<int>(cl.get_int("steps"));
  LOOM_CHECK_CONFIG(steps >= 1 && per_rank > 0, "--steps and --tokens-per-rank must be positive");
  const CostModel cost{cl.get_double("cost-a"), cl.get_double("cost-b"), cl.get_double("cost-c")};
  Network net;
  net.kv_bytes = cl.get_double("kv-bytes");
  net.layers = cl.get_double("layers");
  net.bandwidth = cl.get_double("bandwidth");
  net.latency = cl.get_double("latency");
  LOOM_CHECK_CONFIG(net.layers >= 1 && net.bandwidth > 0 && net.kv_bytes >= 0 && net.latency >= 0,
                    "--layers, --bandwidth, --kv-bytes and --latency must be positive");
  net.ring_aware = cl.get_int("ring-aware") != 0;
  const int stages = static_cast<int>(cl.get_int("stages"));
  LOOM_CHECK_CONFIG(stages >= 1, "--stages must be >= 1, got {}", stages);
  // The plan cost imbalance and plan_hdp's time are the worst of the steps; the rest are means.
  std::string md = fmt::format(
      "Cost model {} (seconds); ring attention moves {} bytes of K/V per token and layer over {} "
      "layers at {:.3g} bytes/s with {:.3g} s per step; capacity {} tokens per rank and "
      "micro-batch; {} tokens per rank per step; means of {} steps (the plan cost imbalance and "
      "plan_hdp ms: the worst step). The dp layout runs every sequence whole on one rank; those "
      "longer than the capacity would not fit in memory.\n",
      cost.describe(), net.kv_bytes, net.layers, net.bandwidth, net.latency, capacity, per_rank,
      steps);
  std::vector<std::pair<std::string, std::vector<double>>> speedups;
  for (const Distribution& dist : {byted(), code()}) {
    // The distribution's shape as drawn (one large sample).
    {
      std::mt19937_64 rng(cl.get_int("seed"));
      const auto big = batch(dist, rng, 2e9);
      double total = 0, over128 = 0, at2m = 0, short4 = 0;
      for (const auto& s : big) {
        const auto n = static_cast<double>(s.length - 1);
        total += n;
        if (n >= 131072) over128 += n;
        if (n >= 2097152) at2m += n;
        if (n <= 4096) short4 += 1;
      }
      md += fmt::format(
          "\n### {} ({}): {:.1f}% of samples <= 4K; {:.1f}% of tokens in sequences >= 128K, "
          "{:.1f}% at 2M\n\n",
          dist.name, dist.description, 100 * short4 / static_cast<double>(big.size()),
          100 * over128 / total, 100 * at2m / total);
    }
    const int cp_static = [&] {
      int cp = 1;
      while (static_cast<double>(cp) * static_cast<double>(capacity) < dist.max_len()) cp *= 2;
      return cp;
    }();
    md += fmt::format(
        "static mesh: cp {} (the longest, {:.0f} tokens, over ranks of {}).\n\n"
        "| ranks | sequences | hdp plan cost imbalance | time imbalance hdp | pow2 | static | dp | "
        "step time static / hdp | pow2 / hdp | dp / hdp | dp: sequences > capacity | "
        "traffic static / hdp | pow2 / hdp | plan_hdp ms | hdp in slots / hdp |\n"
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- "
        "|\n",
        cp_static, dist.max_len(), capacity);
    std::vector<double> sp_static, sp_pow2, pp_gain;
    for (const int n : ranks) {
      std::mt19937_64 rng(cl.get_int("seed") + static_cast<uint64_t>(n));
      std::map<std::string, Result> sum;
      double sequences = 0, plan_ms = 0;
      bool pow2_fits = true, static_fits = cp_static <= n;
      for (int s = 0; s < steps; ++s) {
        const auto b = batch(dist, rng, per_rank * n);
        sequences += static_cast<double>(b.size());
        auto add = [&](const std::string& k, const Result& r) {
          sum[k].max += r.max / steps;
          sum[k].slots += r.slots / steps;
          sum[k].mean += r.mean / steps;
          sum[k].traffic += r.traffic / steps;
          sum[k].plan_imbalance = std::max(sum[k].plan_imbalance, r.plan_imbalance);
          sum[k].too_long += r.too_long;
        };
        const Result h = hdp(b, n, capacity, cost, net, false);
        add("hdp", h);
        plan_ms = std::max(plan_ms, h.plan_ms);
        try {
          add("pow2", hdp(b, n, capacity, cost, net, true));
        } catch (const loom::Error&) {
          pow2_fits = false;  // a group rounded up past the pool
        }
        if (static_fits) add("static", spread(b, n / cp_static, cp_static, n, capacity, cost, net));
        add("dp", spread(b, n, 1, n, capacity, cost, net));
      }
      const Result& h = sum["hdp"];
      auto ratio = [&](const std::string& k, bool time) {
        const Result& r = sum[k];
        return time ? r.max / h.max : (h.traffic > 0 ? r.traffic / h.traffic : 0.0);
      };
      auto cell = [](bool ok, double v, const char* f) {
        return ok ? fmt::format(fmt::runtime(f), v) : std::string("-");
      };
      md += fmt::format(
          "| {} | {:.0f} | {:.3f} | {:.3f} | {} | {} | {:.3f} | {} | {} | {:.2f} | {:.0f} | {} | "
          "{} | {:.1f} | {:.3f} |\n",
          n, sequences / steps, h.plan_imbalance, h.imbalance(),
          cell(pow2_fits, sum["pow2"].imbalance(), "{:.3f}"),
          cell(static_fits, sum["static"].imbalance(), "{:.3f}"), sum["dp"].imbalance(),
          cell(static_fits, ratio("static", true), "{:.2f}"),
          cell(pow2_fits, ratio("pow2", true), "{:.2f}"), ratio("dp", true),
          static_cast<double>(sum["dp"].too_long) / steps,
          cell(static_fits, ratio("static", false), "{:.1f}"),
          cell(pow2_fits, ratio("pow2", false), "{:.2f}"), plan_ms, h.slots / h.max);
      sp_static.push_back(static_fits ? ratio("static", true) : 0.0);
      sp_pow2.push_back(pow2_fits ? ratio("pow2", true) : 0.0);
    }
    // Under pipeline parallelism: the two balance modes, with the planner knowing the ring's
    // transfer time, on this network and on one whose transfers always hide behind compute.
    for (int hidden = 0; hidden < 2 && stages > 1; ++hidden) {
      Network pnet = net;
      pnet.ring_aware = true;
      if (hidden == 1) {
        pnet.bandwidth = 1e30;
        pnet.latency = 0;
      }
      md += fmt::format(
          "\nUnder pipeline parallelism ({} stages, 1F1B; each pool rank one pipeline), {}: the "
          "simulated step (the slots as the Trainer runs them; simulate_hdp_step) of DP-balance "
          "and PP-balance plans made knowing the ring's transfer time. Efficiency: the step if "
          "every stage were busy throughout (the work over ranks x stages) over the simulated "
          "one.\n\n"
          "| ranks | dp-balance step (s) | pp-balance step (s) | dp / pp | efficiency dp | pp | "
          "real micro-batches per pipeline, dp (fewest-most) | pp | plan_hdp ms, pp |\n"
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n",
          stages,
          hidden == 1 ? "K/V transfers hidden behind compute (a fast link)"
                      : "on the network above");
      for (const int n : ranks) {
        std::mt19937_64 rng(cl.get_int("seed") + static_cast<uint64_t>(n));
        PipelineResult dp, pp;
        size_t dp_few = SIZE_MAX, dp_most = 0, pp_few = SIZE_MAX, pp_most = 0;
        for (int s = 0; s < steps; ++s) {
          const auto b = batch(dist, rng, per_rank * n);
          const auto x = pipelined(b, n, capacity, cost, pnet, stages, loom::data::HdpBalance::kDp);
          const auto y = pipelined(b, n, capacity, cost, pnet, stages, loom::data::HdpBalance::kPp);
          dp.step += x.step / steps;
          dp.ideal += x.ideal / steps;
          pp.step += y.step / steps;
          pp.ideal += y.ideal / steps;
          pp.plan_ms = std::max(pp.plan_ms, y.plan_ms);
          dp_few = std::min(dp_few, x.fewest);
          dp_most = std::max(dp_most, x.most);
          pp_few = std::min(pp_few, y.fewest);
          pp_most = std::max(pp_most, y.most);
        }
        md += fmt::format(
            "| {} | {:.3f} | {:.3f} | {:.2f} | {:.3f} | {:.3f} | {}-{} | {}-{} | {:.1f} |\n", n,
            dp.step, pp.step, dp.step / pp.step, dp.ideal / dp.step, pp.ideal / pp.step, dp_few,
            dp_most, pp_few, pp_most, pp.plan_ms);
        if (hidden == 1) pp_gain.push_back(dp.step / pp.step);
      }
    }
    speedups.emplace_back(dist.name + ": vs static", sp_static);
    speedups.emplace_back(dist.name + ": vs pow2", sp_pow2);
    if (!pp_gain.empty()) speedups.emplace_back(dist.name + ": pp / dp-balance", pp_gain);
  }
  const std::string out = cl.get("out");
  {
    std::ofstream f(out + ".md");
    LOOM_CHECK_KIND(loom::ErrorKind::kIO, f.good(), "cannot write '{}.md'", out);
    f << md;
  }
  {
    std::ofstream f(out + ".svg");
    LOOM_CHECK_KIND(loom::ErrorKind::kIO, f.good(), "cannot write '{}.svg'", out);
    f << svg_chart("hybrid data parallelism: simulated step-time speedup", ranks, speedups,
                   "speedup (x)");
  }
  std::fputs(md.c_str(), stdout);
  std::printf("\nwrote %s.md and %s.svg\n", out.c_str(), out.c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "plan_sim: %s\n", e.what());
    return 1;
  }
}
