#include "loom/data/loader.h"

#include <fmt/format.h>

#include <cmath>
#include <cstring>
#include <set>

#include "loom/core/error.h"

namespace loom::data {

PlanLayout LoaderOptions::layout() const {
  PlanLayout l;
  l.mode = mode;
  l.dp_size = dp_size;
  l.dp_rank = dp_rank;
  l.micro_batch_size = micro_batch_size;
  l.micro_batch_tokens = micro_batch_tokens;
  l.max_piece_tokens = seq_len;
  l.pad_multiple = pad_multiple;
  l.equal_micro_batches = equal_micro_batches;
  l.hdp = hdp;
  l.cost = cost;
  l.hdp_balance = hdp_balance;
  l.stages = stages;
  l.ring = ring;
  return l;
}

LoaderOptions LoaderOptions::from_config(const config::JobConfig& job, int dp_size, int dp_rank,
                                         int tp_size, at::Device device, int cp_size) {
  const auto& t = job.train();
  LoaderOptions o;
  o.mode = job.data().mode() == config::DataConfig::DOCUMENTS ? BatchMode::kDocuments
                                                              : BatchMode::kWindows;
  o.seq_len = t.seq_len();
  o.vocab_size = job.model().vocab_size();
  o.micro_batch_size = t.micro_batch_size();
  o.global_batch = t.global_batch_size() > 0 ? t.global_batch_size() : o.micro_batch_size * dp_size;
  o.dp_size = dp_size;
  o.dp_rank = dp_rank;
  o.device = device;
  o.prefetch = t.prefetch();
  // The MoE GLOBAL_BATCH balance all-reduces in every training forward over the data-parallel
  // domain, and expert parallelism exchanges tokens between DP ranks in every forward and
  // backward: every DP rank runs the same number of micro-batches.
  const bool moe = job.model().moe().num_experts() > 0;
  o.equal_micro_batches =
      moe && ((job.model().moe().aux_loss_type() == config::MoeConfig::GLOBAL_BATCH &&
               job.model().moe().aux_loss_coeff() > 0) ||
              job.parallel().ep() > 1);
  const auto& d = job.data();
  LOOM_CHECK_CONFIG(d.outlier_tokens() >= 0 && d.outlier_delay() >= 0 && d.outlier_batch() >= 1,
                    "fields 'data.outlier_tokens' ({}), 'data.outlier_delay' ({}) and "
                    "'data.outlier_batch' ({}) must be >= 0, >= 0 and >= 1",
                    d.outlier_tokens(), d.outlier_delay(), d.outlier_batch());
  LOOM_CHECK_CONFIG(d.outlier_tokens() == 0 || o.mode == BatchMode::kDocuments,
                    "field 'data.outlier_tokens' ({}) delays long documents: it needs data.mode "
                    "DOCUMENTS",
                    d.outlier_tokens());
  LOOM_CHECK_CONFIG(d.outlier_tokens() == 0 || job.parallel().hdp() || dp_size == 1,
                    "field 'data.outlier_tokens' ({}) gives each step a varying number of "
                    "documents, which only the hybrid-data-parallel planner takes over several DP "
                    "ranks: set parallel.hdp: true (or run one DP rank)",
                    d.outlier_tokens());
  o.outlier_tokens = d.outlier_tokens();
  o.outlier_delay = d.outlier_delay();
  o.outlier_batch = d.outlier_batch();
  o.hdp = job.parallel().hdp();
  if (o.hdp) {
    LOOM_CHECK_CONFIG(o.mode == BatchMode::kDocuments,
                      "parallel.hdp plans whole documents: it needs data.mode DOCUMENTS");
    const auto& c = job.parallel().hdp_cost();
    LOOM_CHECK_CONFIG(c.empty() || c.size() == 3,
                      "field 'parallel.hdp_cost' holds {} numbers; it takes three, [a, b, c] of "
                      "T(s) = a s^2 + b s + c (or none: fitted at start-up)",
                      c.size());
    if (c.size() == 3) o.cost = CostModel{c[0], c[1], c[2]};
  }
  LOOM_CHECK_CONFIG(job.parallel().hdp_balance().empty() || o.hdp,
                    "field 'parallel.hdp_balance' ('{}') picks how the hybrid-data-parallel "
                    "scheduler balances: it needs parallel.hdp: true",
                    job.parallel().hdp_balance());
  o.stages = std::max(job.parallel().pp(), 1);
  o.hdp_balance = parse_hdp_balance(job.parallel().hdp_balance(), o.stages);
  LOOM_CHECK_CONFIG(
      std::isfinite(job.parallel().hdp_ring_gbps()) && job.parallel().hdp_ring_gbps() >= 0,
      "field 'parallel.hdp_ring_gbps' ({}) must be a bandwidth >= 0 in GB/s",
      job.parallel().hdp_ring_gbps());
  LOOM_CHECK_CONFIG(job.parallel().hdp_ring_gbps() == 0 || o.hdp,
                    "field 'parallel.hdp_ring_gbps' ({}) tells the hybrid-data-parallel scheduler "
                    "the ring's bandwidth: it needs parallel.hdp: true",
                    job.parallel().hdp_ring_gbps());
  const bool sp = job.parallel().sequence_parallel() && tp_size > 1;
  if (o.mode == BatchMode::kWindows) {
    LOOM_CHECK_CONFIG(
        o.global_batch % (o.micro_batch_size * dp_size) == 0,
        "field 'train.global_batch_size' ({}) must be a multiple of train.micro_batch_size ({}) x "
        "data-parallel size ({}) = {}",
        o.global_batch, o.micro_batch_size, dp_size, o.micro_batch_size * dp_size);
    LOOM_CHECK_CONFIG(!sp || o.seq_len % tp_size == 0,
                      "parallel.sequence_parallel splits the sequence over parallel.tp = {} ranks: "
                      "train.seq_len = "
                      "{} is not divisible by it",
                      tp_size, o.seq_len);
    const int64_t split = static_cast<int64_t>(cp_size) * (sp ? tp_size : 1);
    LOOM_CHECK_CONFIG(
        cp_size <= 1 || o.seq_len % split == 0,
        "context parallelism splits every sequence over parallel.cp = {} ranks{}: "
        "train.seq_len = {} is not divisible by {} ({} % {} = {})",
        cp_size,
        sp ? fmt::format(", then over parallel.tp = {} (sequence parallelism)", tp_size)
           : std::string(),
        o.seq_len, split, o.seq_len, split, o.seq_len % split);
    return o;
  }
  LOOM_CHECK_CONFIG(
      o.hdp || o.global_batch % dp_size == 0,
      "data.mode DOCUMENTS: field 'train.global_batch_size' ({} documents per step) must be a "
      "multiple of the data-parallel size ({})",
      o.global_batch, dp_size);
  LOOM_CHECK_CONFIG(t.micro_batch_tokens() >= 0,
                    "field 'train.micro_batch_tokens' must be >= 0, got {}",
                    t.micro_batch_tokens());
  o.micro_batch_tokens = t.micro_batch_tokens() > 0 ? t.micro_batch_tokens() : o.seq_len;
  // Sequence and context parallelism split each packed row over tp and cp: rows are padded to a
  // multiple (fewer than cp x tp positions that do not count; documents themselves never are).
  o.pad_multiple = (sp ? tp_size : 1) * std::max(cp_size, 1);
  return o;
}

std::string MicroBatchLoader::describe() const {
  const auto& o = options_;
  if (o.hdp) {
    return fmt::format(
        "{} documents per step (pieces of at most {} tokens) planned over a pool of {} rank(s) "
        "with hybrid data parallelism: a rank holds at most {} tokens per micro-batch, a longer "
        "piece runs on a group of ranks (ring attention); cost model {}; {}-balance{}; the loss is "
        "per token over the global batch{}",
        o.global_batch, o.seq_len, o.dp_size, o.micro_batch_tokens, o.cost.describe(),
        hdp_balance_name(o.hdp_balance),
        o.stages > 1 ? fmt::format(" over {} pipeline stages", o.stages) : std::string(),
        o.outlier_tokens > 0
            ? fmt::format("; documents over {} tokens wait in the outlier queue (batches of {}, "
                          "at most {} steps)",
                          o.outlier_tokens, o.outlier_batch, o.outlier_delay)
            : std::string());
  }
  if (o.mode == BatchMode::kDocuments) {
    return fmt::format(
        "{} documents per step over {} DP rank(s), packed into micro-batches of at most {} tokens "
        "(pieces of at "
        "most {}); the loss is per token over the global batch{}",
        o.global_batch, o.dp_size, o.micro_batch_tokens, o.seq_len,
        o.outlier_tokens > 0
            ? fmt::format("; documents over {} tokens wait in the outlier queue (batches of {}, "
                          "at most {} steps)",
                          o.outlier_tokens, o.outlier_batch, o.outlier_delay)
            : std::string());
  }
  return fmt::format(
      "{} sequences x {} tokens per step = {} micro-batches of {} on each of {} DP rank(s)",
      o.global_batch, o.seq_len, o.global_batch / (o.micro_batch_size * o.dp_size),
      o.micro_batch_size, o.dp_size);
}

MicroBatchLoader::MicroBatchLoader(const DataSource* source, LoaderOptions options)
    : source_(source), options_(std::move(options)) {
  LOOM_INTERNAL_CHECK(source_ != nullptr, "loader without a data source");
  num_sources_ = source_->source_names().size();
  LOOM_CHECK_CONFIG(options_.seq_len >= 1, "the loader needs train.seq_len >= 1, got {}",
                    options_.seq_len);
  if (options_.mode == BatchMode::kDocuments) {
    LOOM_CHECK_KIND(
        ErrorKind::kConfig, source_->has_documents(),
        "data.mode is DOCUMENTS, but the data source ({}) does not provide whole documents",
        source_->describe());
  }
  // Plan a batch of the right count once, so a layout that cannot be planned fails now, naming the
  // fields, not at the first step.
  std::vector<SampleRef> probe(static_cast<size_t>(std::max<int64_t>(options_.global_batch, 0)),
                               SampleRef{0, options_.seq_len + 1});
  (void)plan_step(probe, options_.layout());
}

MicroBatchLoader::~MicroBatchLoader() {
  if (prefetch_.valid()) prefetch_.wait();
}

std::vector<SampleRef> MicroBatchLoader::global_samples(Split split, int64_t first) const {
  std::vector<SampleRef> v;
  v.reserve(static_cast<size_t>(options_.global_batch));
  for (int64_t i = 0; i < options_.global_batch; ++i) {
    const int64_t index = first + i;
    const int64_t len = options_.mode == BatchMode::kWindows
                            ? options_.seq_len + 1
                            : source_->document_length(split, index);
    v.push_back({index, len});
  }
  return v;
}

void MicroBatchLoader::check_ids(Split split, int64_t sample, int64_t begin, const int64_t* ids,
                                 int64_t n) const {
  if (options_.vocab_size <= 0) return;
  for (int64_t i = 0; i < n; ++i) {
    LOOM_CHECK_KIND(ErrorKind::kIO, ids[i] >= 0 && ids[i] < options_.vocab_size,
                    "data: token {} of {} sample {} is {}, outside the model's vocabulary [0, {}) "
                    "(model.vocab_size; data.check_vocab: false only skips the up-front scan)",
                    begin + i, split == Split::kTrain ? "training" : "validation", sample, ids[i],
                    options_.vocab_size);
  }
}

int64_t MicroBatchLoader::source_of(Split split, int64_t index) const {
  const int32_t s = source_->source_of(split, index);
  LOOM_CHECK(s >= 0 && static_cast<size_t>(s) < num_sources_,
             "data: {} sample {} comes from source {}, but the data source ({}) names {}",
             split == Split::kTrain ? "training" : "validation", index, s, source_->describe(),
             num_sources_);
  return s;
}

model::Batch MicroBatchLoader::assemble(Split split, const std::vector<SampleRef>& samples,
                                        const MicroBatchPlan& mb) const {
  const auto rows = static_cast<int64_t>(mb.rows.size());
  const int64_t len = mb.row_len;
  at::Tensor inputs = at::zeros({rows, len}, at::kLong);   // [b, s]
  at::Tensor targets = at::zeros({rows, len}, at::kLong);  // [b, s]
  // Blended data: each position's source (padding: 0; it counts nowhere).
  at::Tensor source = num_sources_ > 1 ? at::zeros({rows, len}, at::kLong) : at::Tensor();
  if (options_.mode == BatchMode::kWindows) {
    // One window per row, read as seq_len + 1 tokens: inputs are the first seq_len, targets the
    // last.
    at::Tensor buf = at::empty({rows, len + 1}, at::kLong);
    int64_t* p = buf.data_ptr<int64_t>();
    for (int64_t r = 0; r < rows; ++r) {
      const Piece& piece = mb.rows[static_cast<size_t>(r)].front();
      const int64_t index = samples[static_cast<size_t>(piece.sample)].index;
      source_->sample(split, index, len + 1, p + r * (len + 1));
      check_ids(split, index, 0, p + r * (len + 1), len + 1);
      if (source.defined()) source[r].fill_(source_of(split, index));
    }
    model::Batch b;
    b.tokens = buf.narrow(1, 0, len).contiguous().to(options_.device);
    b.targets = buf.narrow(1, 1, len).contiguous().to(options_.device);
    if (source.defined()) b.source = source.to(options_.device);
    return b;
  }
  // Packed pieces (Note: packed sequences): each piece is its own document for attention and
  // positions; padding at the end of a row is one more "document" whose positions do not count.
  std::vector<std::vector<int64_t>> cu(static_cast<size_t>(rows));
  std::vector<int64_t> real(static_cast<size_t>(rows), 0);  // non-padding positions of each row
  std::vector<int64_t> buf;
  for (int64_t r = 0; r < rows; ++r) {
    auto& c = cu[static_cast<size_t>(r)];
    int64_t& at = real[static_cast<size_t>(r)];
    c.push_back(0);
    for (const Piece& piece : mb.rows[static_cast<size_t>(r)]) {
      buf.resize(static_cast<size_t>(piece.tokens + 1));
      const int64_t index = samples[static_cast<size_t>(piece.sample)].index;
      source_->document(split, index, piece.begin, piece.tokens + 1, buf.data());
      check_ids(split, index, piece.begin, buf.data(), piece.tokens + 1);
      inputs[r]
          .narrow(0, at, piece.tokens)
          .copy_(at::from_blob(buf.data(), {piece.tokens}, at::kLong));
      targets[r]
          .narrow(0, at, piece.tokens)
          .copy_(at::from_blob(buf.data() + 1, {piece.tokens}, at::kLong));
      if (source.defined()) source[r].narrow(0, at, piece.tokens).fill_(source_of(split, index));
      at += piece.tokens;
      c.push_back(at);
    }
    if (at < len) c.push_back(len);
  }
  model::Batch b = model::packed_batch(inputs, targets, cu);
  b.source = source;
  bool padded = false;
  for (int64_t n : real) padded = padded || n < len;
  if (padded) {
    at::Tensor mask = at::zeros({rows, len}, at::kFloat);  // [b, s]
    for (int64_t r = 0; r < rows; ++r)
      mask[r].narrow(0, 0, real[static_cast<size_t>(r)]).fill_(1.0);
    b.loss_mask = mask;
    b.padding = mask.eq(0);
  }
  return b.to(options_.device);
}

StepData MicroBatchLoader::load_samples(Split split, int64_t first_sample,
                                        std::vector<SampleRef> samples) const {
  StepData d;
  d.first_sample = first_sample;
  d.plan = plan_step(samples, options_.layout());
  for (const auto& mb : d.plan.micro_batches) d.batches.push_back(assemble(split, samples, mb));
  return d;
}

StepData MicroBatchLoader::load(Split split, int64_t first_sample) const {
  return load_samples(split, first_sample, global_samples(split, first_sample));
}

std::vector<SampleRef> MicroBatchLoader::step_samples(int64_t first, std::deque<Outlier>& queue,
                                                      bool take_all) const {
  std::vector<SampleRef> read = global_samples(Split::kTrain, first);
  if (options_.outlier_tokens <= 0 && queue.empty()) return read;
  std::vector<SampleRef> out;
  int64_t targets = 0;
  for (const SampleRef& s : read) {
    if (options_.outlier_tokens > 0 && s.length > options_.outlier_tokens) {
      queue.push_back({s.index, s.length, first});
    } else {
      out.push_back(s);
      targets += std::max<int64_t>(s.length - 1, 0);
    }
  }
  // Note: outlier queue. Off (a resumed run that turned it off): everything waiting goes now.
  const bool all = take_all || options_.outlier_tokens <= 0 ||
                   static_cast<int64_t>(queue.size()) >= options_.outlier_batch;
  const int64_t due = first - options_.outlier_delay * options_.global_batch;  // read at or before
  while (!queue.empty() && (all || queue.front().read_at <= due || targets == 0)) {
    out.push_back({queue.front().index, queue.front().length});
    targets += std::max<int64_t>(queue.front().length - 1, 0);
    queue.pop_front();
  }
  return out;
}

StepData MicroBatchLoader::next(bool prefetch_next, bool last) {
  StepData d;
  bool have = false;
  std::deque<Outlier> queue = outliers_;
  const bool flush = last && !outliers_.empty();  // the run's last step takes the whole queue
  const std::vector<SampleRef> samples = step_samples(position_, queue, last);
  if (prefetch_.valid()) {
    StepData ready = prefetch_.get();  // waits only if reading is slower than a step
    if (prefetch_position_ == position_ && prefetch_outliers_ == outliers_ && !flush) {
      d = std::move(ready);
      have = true;
    }
  }
  if (!have) d = load_samples(Split::kTrain, position_, samples);
  position_ += options_.global_batch;
  outliers_ = std::move(queue);
  if (prefetch_next && options_.prefetch) {
    prefetch_position_ = position_;
    prefetch_outliers_ = outliers_;
    std::deque<Outlier> after = outliers_;
    std::vector<SampleRef> next_samples = step_samples(position_, after);
    const int64_t at = position_;
    prefetch_ = std::async(std::launch::async, [this, at, s = std::move(next_samples)] {
      return load_samples(Split::kTrain, at, s);
    });
  }
  return d;
}

void MicroBatchLoader::set_position(int64_t consumed_samples) {
  LOOM_CHECK(consumed_samples >= 0, "loader position must be >= 0, got {}", consumed_samples);
  position_ = consumed_samples;
}

std::map<std::string, int64_t> MicroBatchLoader::state() const {
  std::map<std::string, int64_t> s{
      {"data.consumed_samples", position_},
      {"data.documents", options_.mode == BatchMode::kDocuments ? 1 : 0}};
  if (cost_fitted_) {  // the fitted cost model, as the bits of its non-negative doubles
    auto bits = [](double v) {
      int64_t b = 0;
      std::memcpy(&b, &v, sizeof b);
      return b;
    };
    s["data.hdp_cost.a"] = bits(options_.cost.a);
    s["data.hdp_cost.b"] = bits(options_.cost.b);
    s["data.hdp_cost.c"] = bits(options_.cost.c);
  }
  if (!outliers_.empty()) {  // Note: outlier queue
    s["data.outliers"] = static_cast<int64_t>(outliers_.size());
    for (size_t i = 0; i < outliers_.size(); ++i) {
      s[fmt::format("data.outlier.{}", i)] = outliers_[i].index;
      s[fmt::format("data.outlier.{}.read_at", i)] = outliers_[i].read_at;
    }
  }
  return s;
}

void MicroBatchLoader::check_state(const std::map<std::string, int64_t>& state) const {
  auto it = state.find("data.consumed_samples");
  LOOM_CHECK_KIND(ErrorKind::kIO, it != state.end(),
                  "loader state: 'data.consumed_samples' is missing");
  LOOM_CHECK_KIND(ErrorKind::kIO, it->second >= 0,
                  "loader state: 'data.consumed_samples' is {}, must be >= 0", it->second);
  // The position counts windows in one mode and documents in the other (absent: written before
  // DOCUMENTS mode existed, so WINDOWS).
  auto mode = state.find("data.documents");
  const bool saved_docs = mode != state.end() && mode->second != 0;
  const bool docs = options_.mode == BatchMode::kDocuments;
  LOOM_CHECK_KIND(
      ErrorKind::kIO, saved_docs == docs,
      "loader state: the position was saved with data.mode {}, this run uses {}; it counts "
      "{} there, so it cannot be resumed here (start fresh or keep the mode)",
      saved_docs ? "DOCUMENTS" : "WINDOWS", docs ? "DOCUMENTS" : "WINDOWS",
      saved_docs ? "documents" : "windows");
  // The outlier queue: each entry a document read before the position, by a step at or before it.
  auto count = state.find("data.outliers");
  const int64_t n = count == state.end() ? 0 : count->second;
  LOOM_CHECK_KIND(ErrorKind::kIO, n >= 0 && (n == 0 || docs),
                  "loader state: 'data.outliers' is {} ({})", n,
                  n < 0 ? "a count must be >= 0" : "an outlier queue needs data.mode DOCUMENTS");
  LOOM_CHECK_KIND(ErrorKind::kIO, n == 0 || options_.hdp || options_.dp_size == 1,
                  "loader state: {} documents wait in the outlier queue, which this run cannot "
                  "take over {} DP ranks without parallel.hdp (resume with it, or as saved)",
                  n, options_.dp_size);
  std::set<int64_t> seen;
  for (int64_t i = 0; i < n; ++i) {
    const std::string key = fmt::format("data.outlier.{}", i);
    auto index = state.find(key), read_at = state.find(key + ".read_at");
    LOOM_CHECK_KIND(ErrorKind::kIO, index != state.end() && read_at != state.end(),
                    "loader state: the outlier queue holds {} documents but '{}' or '{}.read_at' "
                    "is missing",
                    n, key, key);
    LOOM_CHECK_KIND(
        ErrorKind::kIO,
        index->second >= read_at->second && index->second < it->second && read_at->second >= 0,
        "loader state: '{}' = {} (read by the step at {}) is not a document read "
        "before the position {}",
        key, index->second, read_at->second, it->second);
    LOOM_CHECK_KIND(ErrorKind::kIO, seen.insert(index->second).second,
                    "loader state: '{}' = {} is queued twice", key, index->second);
  }
}

void MicroBatchLoader::load_state(const std::map<std::string, int64_t>& state) {
  check_state(state);
  position_ = state.at("data.consumed_samples");
  if (cost_fitted_ && state.count("data.hdp_cost.a") && state.count("data.hdp_cost.b") &&
      state.count("data.hdp_cost.c")) {
    auto value = [&](const char* key) {
      double v = 0;
      const int64_t b = state.at(key);
      std::memcpy(&v, &b, sizeof v);
      return v;
    };
    const CostModel saved{value("data.hdp_cost.a"), value("data.hdp_cost.b"),
                          value("data.hdp_cost.c")};
    if (std::isfinite(saved.a) && std::isfinite(saved.b) && std::isfinite(saved.c) &&
        saved.a >= 0 && saved.b >= 0 && saved.c >= 0 && (saved.a > 0 || saved.b > 0)) {
      options_.cost = saved;  // the steps are planned as the saved run planned them
    }
  }
  outliers_.clear();
  auto it = state.find("data.outliers");
  const int64_t n = it == state.end() ? 0 : it->second;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t index = state.at(fmt::format("data.outlier.{}", i));
    outliers_.push_back({index, source_->document_length(Split::kTrain, index),
                         state.at(fmt::format("data.outlier.{}.read_at", i))});
  }
}

}  // namespace loom::data
