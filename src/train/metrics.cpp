#include "loom/train/metrics.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "loom/core/error.h"
#include "loom/core/fs.h"
#include "loom/core/logging.h"
#include "loom/train/system.h"

namespace loom::train {

void MetricsSinks::start(int64_t first_step) {
  if (progress_) progress_->restart(first_step);
  for (auto& s : sinks_) s->start(first_step);
}

void MetricsSinks::step(const StepMetrics& m) {
  for (auto& s : sinks_) s->step(m);
}

void MetricsSinks::eval(const EvalMetrics& e) {
  clear();
  for (auto& s : sinks_) s->eval(e);
}

void MetricsSinks::clear() {
  if (progress_) progress_->clear();
}

void MetricsSinks::finish() {
  for (auto& s : sinks_) s->finish();
  if (progress_) progress_->finish();
}

namespace {

// TensorBoard gets a layer's share table as scalars up to this many cells (sources x experts).
constexpr int64_t kMaxShareScalars = 256;

// The steps the sinks write the specialisation table at: every log_every-th and the last.
bool report_now(int64_t step, const MetricsContext& ctx) {
  return step % std::max<int64_t>(ctx.log_every, 1) == 0 || step == ctx.total_steps;
}

std::unique_ptr<SpecialisationTable> make_table(const MetricsContext& ctx) {
  if (!ctx.moe || ctx.sources.size() < 2 || ctx.num_experts <= 0) return nullptr;
  return std::make_unique<SpecialisationTable>(ctx.sources, ctx.num_experts);
}

nlohmann::json specialisation_json(const SpecialisationTable& t) {
  nlohmann::json share = nlohmann::json::array(), assignments = nlohmann::json::array(),
                 mi = nlohmann::json::array();
  for (int64_t l = 0; l < t.layers(); ++l) {
    nlohmann::json layer = nlohmann::json::array(), counts = nlohmann::json::array();
    for (size_t src = 0; src < t.sources().size(); ++src) {
      std::vector<double> row;
      for (int64_t e = 0; e < t.experts(); ++e)
        row.push_back(t.share(l, static_cast<int64_t>(src), e));
      layer.push_back(row);
      counts.push_back(t.assignments(l, static_cast<int64_t>(src)));
    }
    share.push_back(layer);
    assignments.push_back(counts);
    mi.push_back(t.mutual_information_bits(l));
  }
  return {{"steps", t.steps()},
          {"sources", t.sources()},
          {"assignments", assignments},
          {"share", share},
          {"mi_bits", mi}};
}

class ConsoleSink : public MetricsSink {
 public:
  ConsoleSink(const MetricsContext& ctx, std::shared_ptr<Progress> progress)
      : ctx_(ctx), progress_(std::move(progress)) {}

  void step(const StepMetrics& m) override {
    const bool log_now = m.step % ctx_.log_every == 0 || m.step == ctx_.total_steps || m.step == 1;
    if (log_now) {
      if (progress_) progress_->clear();
      const double t = std::max(m.seconds, 1e-12);
      std::string line = fmt::format(
          "step {}/{} | loss {:.4f} | lr {:.3e} | grad {:.3f} | {:.0f} tok/s | {:.3f} TFLOP/s | "
          "MFU {:.1f}% "
          "| mem {} | data {:.0f}% fwd {:.0f}% bwd {:.0f}% comm {:.0f}% opt {:.0f}%",
          m.step, ctx_.total_steps, m.loss, m.lr, m.grad_norm, m.tokens_per_s, m.tflops_per_device,
          m.mfu * 100,
          ctx_.cuda ? format_bytes(static_cast<double>(m.device_peak)) + " GPU peak"
                    : format_bytes(static_cast<double>(m.rss)),
          100 * m.data_s / t, 100 * m.forward_s / t, 100 * m.backward_s / t, 100 * m.comm_s / t,
          100 * m.optimizer_s / t);
      if (ctx_.pipeline) line += fmt::format(" | pp wait {:.0f}%", 100 * m.pp_wait_s / t);
      if (ctx_.ring) line += fmt::format(" | ring wait {:.0f}%", 100 * m.ring_wait_s / t);
      if (ctx_.moe) {
        line += fmt::format(" | aux {:.4f} | max load {:.2f}", m.aux_loss, m.moe_max_load);
        if (m.moe_dropped > 0) line += fmt::format(" | dropped {}", m.moe_dropped);
      }
      if (progress_ && !progress_->active())
        line += fmt::format(" | ETA {}", format_duration(progress_->eta(m.step)));
      LOOM_LOG_INFO("{}", line);
    }
    if (progress_) {
      progress_->update(m.step, fmt::format("loss {:.4f} | lr {:.2e} | {:.0f} tok/s | MFU {:.1f}%",
                                            m.loss, m.lr, m.tokens_per_s, m.mfu * 100));
    }
  }

  void eval(const EvalMetrics& e) override {
    LOOM_LOG_INFO("eval step {} | loss {:.4f} | perplexity {:.2f} | {} tokens", e.step, e.loss,
                  e.perplexity, e.tokens);
  }

 private:
  MetricsContext ctx_;
  std::shared_ptr<Progress> progress_;
};

class JsonlSink : public MetricsSink {
 public:
  JsonlSink(const std::string& path, const MetricsContext& ctx) : ctx_(ctx), path_(path) {
    std::error_code ec;
    auto parent = std::filesystem::path(path).parent_path();
    if (!parent.empty()) std::filesystem::create_directories(parent, ec);
    out_.open(path, std::ios::app);
    LOOM_CHECK_KIND(ErrorKind::kIO, out_.good(), "cannot open metrics file '{}'", path);
  }

  void start(int64_t first_step) override {
    out_.close();
    std::error_code ec;
    const std::string stamp = utc_stamp();
    int64_t moved = 0;
    if (first_step == 0 && std::filesystem::file_size(path_, ec) > 0 && !ec) {
      // A fresh run: an earlier run's records are kept under another name, not mixed in.
      const std::string kept = path_ + ".before-" + stamp;
      rename_durably(path_, kept);
      LOOM_LOG_INFO("metrics file '{}': an earlier run's records moved to '{}'", path_, kept);
    } else if (first_step > 0) {
      // A resumed run: records after its checkpoint came from a run that crashed or was rolled
      // back; they move to a side file (so each step appears once here) with a torn last line.
      std::string kept, dropped;
      std::ifstream in(path_);
      std::string line;
      while (std::getline(in, line)) {
        if (line.empty()) continue;
        const auto j = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
        const bool keep = j.is_object() && j.contains("step") && j["step"].is_number_integer() &&
                          j["step"].get<int64_t>() <= first_step;
        (keep ? kept : dropped) += line + '\n';
        moved += keep ? 0 : 1;
      }
      if (moved > 0) {
        const std::string side = path_ + ".abandoned-" + stamp;
        AtomicFile aside(side);
        aside.write(dropped.data(), dropped.size());
        aside.commit();
        AtomicFile rewrite(path_);
        rewrite.write(kept.data(), kept.size());
        rewrite.commit();
        LOOM_LOG_INFO(
            "metrics file '{}': {} record(s) after step {} (a run that did not reach its "
            "next checkpoint) moved to '{}'",
            path_, moved, first_step, side);
      }
    }
    out_.open(path_, std::ios::app);
    LOOM_CHECK_KIND(ErrorKind::kIO, out_.good(), "cannot open metrics file '{}'", path_);
    write(nlohmann::json({{"type", "start"}, {"step", first_step}, {"moved", moved}}).dump());
  }

  void step(const StepMetrics& m) override {
    nlohmann::json j = {{"type", "train"},
                        {"step", m.step},
                        {"loss", m.loss},
                        {"aux_loss", m.aux_loss},
                        {"lr", m.lr},
                        {"grad_norm", m.grad_norm},
                        {"tokens", m.tokens},
                        {"micro_batches", m.micro_batches},
                        {"seconds", m.seconds},
                        {"tokens_per_s", m.tokens_per_s},
                        {"tokens_per_s_per_device", m.tokens_per_s_per_device},
                        {"tflops_per_device", m.tflops_per_device},
                        {"mfu", m.mfu},
                        {"rss_bytes", m.rss},
                        {"peak_rss_bytes", m.peak_rss},
                        {"device_peak_bytes", m.device_peak},
                        {"time",
                         {{"data", m.data_s},
                          {"forward", m.forward_s},
                          {"backward", m.backward_s},
                          {"comm", m.comm_s},
                          {"optimizer", m.optimizer_s},
                          {"pp_wait", m.pp_wait_s},
                          {"ring_wait", m.ring_wait_s}}}};
    if (ctx_.moe) {
      j["moe_dropped"] = m.moe_dropped;
      j["moe_max_load"] = m.moe_max_load;
      j["moe_layer_max_load"] = m.moe_layer_max_load;
      j["moe_layer_dropped_fraction"] = m.moe_layer_dropped_fraction;
      j["moe_layer_balance_loss"] = m.moe_layer_balance_loss;
      j["moe_layer_z_loss"] = m.moe_layer_z_loss;
    }
    if (table_) {
      table_->add(m);
      if (report_now(m.step, ctx_) && table_->steps() > 0) {
        j["moe_specialisation"] = specialisation_json(*table_);
        table_->reset();
      }
    }
    write(j.dump());
  }

  void eval(const EvalMetrics& e) override {
    nlohmann::json j = {{"type", "eval"},
                        {"step", e.step},
                        {"loss", e.loss},
                        {"perplexity", e.perplexity},
                        {"tokens", e.tokens}};
    write(j.dump());
  }

 private:
  void write(const std::string& line) {
    out_ << line << '\n';
    out_.flush();
  }
  MetricsContext ctx_;
  std::string path_;
  std::ofstream out_;
  std::unique_ptr<SpecialisationTable> table_ = make_table(ctx_);
};

class TensorBoardSink : public MetricsSink {
 public:
  TensorBoardSink(const std::string& dir, const MetricsContext& ctx) : ctx_(ctx), writer_(dir) {}

  void step(const StepMetrics& m) override {
    std::vector<std::pair<std::string, double>> v = {
        {"train/loss", m.loss},
        {"train/lr", m.lr},
        {"train/grad_norm", m.grad_norm},
        {"perf/tokens_per_s", m.tokens_per_s},
        {"perf/tflops_per_device", m.tflops_per_device},
        {"perf/mfu", m.mfu},
        {"memory/rss_gib", static_cast<double>(m.rss) / (1 << 30)}};
    if (ctx_.moe) {
      v.emplace_back("train/aux_loss", m.aux_loss);
      v.emplace_back("moe/max_load", m.moe_max_load);
      for (size_t i = 0; i < m.moe_layer_max_load.size(); ++i) {
        v.emplace_back(fmt::format("moe/max_load_layer{}", i), m.moe_layer_max_load[i]);
        if (i < m.moe_layer_dropped_fraction.size()) {
          v.emplace_back(fmt::format("moe/dropped_fraction_layer{}", i),
                         m.moe_layer_dropped_fraction[i]);
          v.emplace_back(fmt::format("moe/balance_loss_layer{}", i), m.moe_layer_balance_loss[i]);
          v.emplace_back(fmt::format("moe/z_loss_layer{}", i), m.moe_layer_z_loss[i]);
        }
      }
    }
    if (table_) {
      table_->add(m);
      if (report_now(m.step, ctx_) && table_->steps() > 0) {
        const SpecialisationTable& t = *table_;
        for (int64_t l = 0; l < t.layers(); ++l) {
          v.emplace_back(fmt::format("moe/specialisation_mi_layer{}", l),
                         t.mutual_information_bits(l));
          // The shares as scalars only for small tables (JSONL has them all).
          const auto cells = static_cast<int64_t>(t.sources().size()) * t.experts();
          for (size_t src = 0; src < t.sources().size() && cells <= kMaxShareScalars; ++src) {
            for (int64_t e = 0; e < t.experts(); ++e) {
              v.emplace_back(fmt::format("moe/share_layer{}/{}/expert{}", l, t.sources()[src], e),
                             t.share(l, static_cast<int64_t>(src), e));
            }
          }
        }
        table_->reset();
      }
    }
    writer_.add_scalars(m.step, v);
    if (m.step % ctx_.log_every == 0) writer_.flush();
  }

  void eval(const EvalMetrics& e) override {
    writer_.add_scalars(e.step, {{"eval/loss", e.loss}, {"eval/perplexity", e.perplexity}});
    writer_.flush();
  }

  void finish() override { writer_.flush(); }

 private:
  MetricsContext ctx_;
  TensorBoardWriter writer_;
  std::unique_ptr<SpecialisationTable> table_ = make_table(ctx_);
};

}  // namespace

void add_performance(StepMetrics& m, double flops, int devices, double peak_flops,
                     at::Device device) {
  m.tokens_per_s = static_cast<double>(m.tokens) / m.seconds;
  m.tokens_per_s_per_device = m.tokens_per_s / devices;
  m.tflops_per_device = flops / m.seconds / devices / 1e12;
  m.mfu = peak_flops > 0 ? m.tflops_per_device * 1e12 / peak_flops : 0;
  const MemoryStats mem = memory_stats(device);
  m.device_peak = mem.device_peak;
  m.rss = mem.rss;
  m.peak_rss = mem.peak_rss;
}

SummaryTracker::SummaryTracker(int64_t first_step) {
  s_.first_step = first_step;
  s_.best_eval_loss = std::nan("");
}

void SummaryTracker::step(const StepMetrics& m) {
  if (steps_++ == 0) s_.first_loss = m.loss;
  s_.last_loss = m.loss;
  last_tps_ = m.tokens_per_s;
  last_mfu_ = m.mfu;
  if (steps_ > 1) {
    tps_sum_ += m.tokens_per_s;
    mfu_sum_ += m.mfu;
  }
}

void SummaryTracker::eval(const EvalMetrics& e) {
  if (!(e.loss >= s_.best_eval_loss)) s_.best_eval_loss = e.loss;  // NaN: nothing yet
}

TrainSummary SummaryTracker::finish(int64_t last_step, const std::string& checkpoint) const {
  TrainSummary s = s_;
  s.last_step = last_step;
  s.seconds = clock_.seconds();
  const double timed = static_cast<double>(steps_ - 1);
  s.mean_tokens_per_s = steps_ > 1 ? tps_sum_ / timed : last_tps_;
  s.mean_mfu = steps_ > 1 ? mfu_sum_ / timed : last_mfu_;
  s.checkpoint = checkpoint;
  LOOM_LOG_INFO(
      "done: steps {}..{} in {} | loss {:.4f} -> {:.4f} | best eval loss {:.4f} | {:.0f} tok/s | "
      "MFU {:.1f}%{}",
      s.first_step, s.last_step, format_duration(s.seconds), s.first_loss, s.last_loss,
      s.best_eval_loss, s.mean_tokens_per_s, s.mean_mfu * 100,
      s.checkpoint.empty() ? "" : " | checkpoint " + s.checkpoint);
  return s;
}

void SpecialisationTable::add(const StepMetrics& m) {
  if (m.moe_source_counts.empty()) return;
  const auto cells = static_cast<size_t>(static_cast<int64_t>(sources_.size()) * experts_);
  if (counts_.size() != m.moe_source_counts.size())
    counts_.assign(m.moe_source_counts.size(), std::vector<double>(cells, 0.0));
  for (size_t l = 0; l < counts_.size(); ++l) {
    const auto& step = m.moe_source_counts[l];
    LOOM_INTERNAL_CHECK(step.size() == cells, "specialisation: layer {} has {} cells, not {}", l,
                        step.size(), cells);
    for (size_t i = 0; i < cells; ++i) counts_[l][i] += step[i];
  }
  ++steps_;
}

void SpecialisationTable::reset() {
  for (auto& layer : counts_) std::fill(layer.begin(), layer.end(), 0.0);
  steps_ = 0;
}

double SpecialisationTable::assignments(int64_t layer, int64_t source) const {
  const auto& c = counts_.at(static_cast<size_t>(layer));
  double n = 0;
  for (int64_t e = 0; e < experts_; ++e) n += c[static_cast<size_t>(source * experts_ + e)];
  return n;
}

double SpecialisationTable::share(int64_t layer, int64_t source, int64_t expert) const {
  const double n = assignments(layer, source);
  return n > 0 ? counts_.at(
                     static_cast<size_t>(layer))[static_cast<size_t>(source * experts_ + expert)] /
                     n
               : 0.0;
}

double SpecialisationTable::mutual_information_bits(int64_t layer) const {
  // I(S; E) = sum_{s,e} p(s,e) log2(p(s,e) / (p(s) p(e))) over the layer's assignments.
  const auto& c = counts_.at(static_cast<size_t>(layer));
  const auto ns = static_cast<int64_t>(sources_.size());
  std::vector<double> ps(static_cast<size_t>(ns), 0.0), pe(static_cast<size_t>(experts_), 0.0);
  double total = 0;
  for (int64_t src = 0; src < ns; ++src) {
    for (int64_t e = 0; e < experts_; ++e) {
      const double v = c[static_cast<size_t>(src * experts_ + e)];
      ps[static_cast<size_t>(src)] += v;
      pe[static_cast<size_t>(e)] += v;
      total += v;
    }
  }
  if (total <= 0) return 0.0;
  double mi = 0;
  for (int64_t src = 0; src < ns; ++src) {
    for (int64_t e = 0; e < experts_; ++e) {
      const double v = c[static_cast<size_t>(src * experts_ + e)];
      if (v <= 0) continue;
      mi += v / total *
            std::log2(v * total / (ps[static_cast<size_t>(src)] * pe[static_cast<size_t>(e)]));
    }
  }
  return std::max(mi, 0.0);
}

void add_moe_stats(StepMetrics& m, const std::vector<std::unique_ptr<model::GptModel>>& chunks,
                   const std::vector<model::MoeStepStats>& layers, comm::Communicator* pp,
                   int64_t num_sources) {
  if (chunks.empty() || !chunks.front()->spec().is_moe()) return;
  const model::ModelSpec& spec = chunks.front()->spec();
  // Layer l's place among the model's MoE layers; each stage fills its own, the sum over the
  // pipeline completes the lists.
  std::vector<int64_t> slot(static_cast<size_t>(spec.num_layers), -1);
  int64_t n = 0;
  for (int64_t l = 0; l < spec.num_layers; ++l) {
    if (spec.is_moe_layer(l)) slot[static_cast<size_t>(l)] = n++;
  }
  // [dropped | 4 x n: max load, dropped fraction, balance, z | n source tables]. The same size on
  // every stage, one without MoE layers too.
  const int64_t cells = num_sources > 1 ? num_sources * spec.moe.num_experts : 0;
  constexpr int64_t kFigures = 4;
  at::Tensor buf = at::zeros({1 + kFigures * n + n * cells}, at::kDouble);
  double* b = buf.data_ptr<double>();
  size_t next = 0;
  for (const auto& chunk : chunks) {
    for (const auto& [block, st] : chunk->moe_stats()) {
      b[0] += static_cast<double>(st.dropped);
      const int64_t layer = chunk->stage().first_layer + block;
      if (next < layers.size() && layers[next].loads.defined() && layer < spec.num_layers) {
        const model::MoeStepStats& ls = layers[next];
        const int64_t at = slot[static_cast<size_t>(layer)];
        const double mean = ls.loads.mean().item<double>();
        if (mean > 0) b[1 + at] = ls.loads.max().item<double>() / mean;
        b[1 + n + at] = ls.dropped_fraction;
        b[1 + 2 * n + at] = ls.balance_loss;
        b[1 + 3 * n + at] = ls.z_loss;
        if (cells > 0) {
          LOOM_INTERNAL_CHECK(ls.sources.defined() && ls.sources.numel() == cells,
                              "layer {}: no source table of {} cells", layer, cells);
          buf.narrow(0, 1 + kFigures * n + at * cells, cells)
              .copy_(ls.sources.reshape({-1}).to(at::kDouble));
        }
      }
      ++next;
    }
  }
  comm::all_reduce_host(buf, pp);
  b = buf.data_ptr<double>();
  m.moe_dropped = static_cast<int64_t>(b[0] + 0.5);
  m.moe_layer_max_load.assign(b + 1, b + 1 + n);
  m.moe_layer_dropped_fraction.assign(b + 1 + n, b + 1 + 2 * n);
  m.moe_layer_balance_loss.assign(b + 1 + 2 * n, b + 1 + 3 * n);
  m.moe_layer_z_loss.assign(b + 1 + 3 * n, b + 1 + 4 * n);
  m.moe_max_load = 0;
  for (double v : m.moe_layer_max_load) m.moe_max_load = std::max(m.moe_max_load, v);
  m.moe_source_counts.clear();
  for (int64_t l = 0; cells > 0 && l < n; ++l) {
    const double* p = b + 1 + kFigures * n + l * cells;
    m.moe_source_counts.emplace_back(p, p + cells);
  }
}

std::unique_ptr<MetricsSink> make_console_sink(const MetricsContext& ctx,
                                               std::shared_ptr<Progress> progress) {
  return std::make_unique<ConsoleSink>(ctx, std::move(progress));
}

std::unique_ptr<MetricsSink> make_jsonl_sink(const std::string& path, const MetricsContext& ctx) {
  return std::make_unique<JsonlSink>(path, ctx);
}

std::unique_ptr<MetricsSink> make_tensorboard_sink(const std::string& dir,
                                                   const MetricsContext& ctx) {
  return std::make_unique<TensorBoardSink>(dir, ctx);
}

std::unique_ptr<MetricsSinks> make_metrics_sinks(const config::JobConfig& job,
                                                 const MetricsContext& ctx, bool rank0) {
  auto sinks = std::make_unique<MetricsSinks>();
  if (!rank0) return sinks;
  const auto& t = job.train();
  std::string path = t.metrics_jsonl();
  if (path.empty() && !job.logging().dir().empty()) path = job.logging().dir() + "/metrics.jsonl";
  if (!path.empty()) sinks->add(make_jsonl_sink(path, ctx));
  std::string tb = t.tensorboard_dir();
  if (tb.empty() && !job.logging().dir().empty()) tb = job.logging().dir() + "/tensorboard";
  if (!tb.empty() && tb != "off") sinks->add(make_tensorboard_sink(tb, ctx));
  auto progress = std::make_shared<Progress>(t.progress(), ctx.first_step, ctx.total_steps,
                                             t.progress() != "off");
  sinks->add(make_console_sink(ctx, progress));
  sinks->set_progress(progress);
  return sinks;
}

}  // namespace loom::train
