#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

#include "loom/core/error.h"
#include "loom/core/hash.h"
#include "loom/data/gpt_dataset.h"
#include "loom/data/source.h"

namespace loom::data {

int64_t DataSource::document_length(Split, int64_t) const {
  LOOM_THROW(ErrorKind::kUnsupported,
             "data.mode DOCUMENTS needs whole documents, which the {} does not provide",
             describe());
}

void DataSource::document(Split split, int64_t index, int64_t, int64_t, int64_t*) const {
  (void)document_length(split, index);
}

SyntheticMarkovCorpus::SyntheticMarkovCorpus(int64_t vocab_size, int32_t branching, uint64_t seed,
                                             int64_t max_document_len, int32_t sources,
                                             std::vector<double> weights)
    : vocab_(vocab_size),
      branching_(branching),
      seed_(seed),
      max_document_len_(max_document_len),
      sources_(sources) {
  // Each chain is a [vocab, branching] table of its own.
  LOOM_CHECK_CONFIG(sources >= 1 && sources <= 16,
                    "field 'data.synthetic_sources' must be in [1, 16], got {}", sources);
  LOOM_CHECK_CONFIG(weights.empty() || static_cast<int32_t>(weights.size()) == sources,
                    "'data.weights' has {} entries for data.synthetic_sources = {}", weights.size(),
                    sources);
  if (weights.empty()) weights.assign(static_cast<size_t>(sources), 1.0);
  double weight_sum = 0;
  for (double w : weights) {
    LOOM_CHECK_CONFIG(std::isfinite(w) && w >= 0, "'data.weights' must be finite and >= 0, got {}",
                      w);
    weight_sum += w;
  }
  LOOM_CHECK_CONFIG(weight_sum > 0, "'data.weights' sum to 0: no source would be drawn");
  double share = 0;
  for (double w : weights) shares_.push_back(share += w / weight_sum);
  shares_.back() = 1.0;
  LOOM_CHECK_CONFIG(max_document_len >= 2,
                    "synthetic corpus: documents need at least 2 tokens, got a maximum of {}",
                    max_document_len);
  LOOM_CHECK_CONFIG(vocab_size >= 2, "synthetic corpus: vocab size must be >= 2, got {}",
                    vocab_size);
  LOOM_CHECK_CONFIG(branching >= 1 && branching <= 64,
                    "field 'data.synthetic_branching' must be in [1, 64], got {}", branching);
  successors_.resize(static_cast<size_t>(sources_ * vocab_ * branching_));
  for (int32_t c = 0; c < sources_; ++c) {
    const uint64_t chain_seed =
        c == 0 ? seed_ : splitmix64(seed_ + 0xC2B2AE3D27D4EB4Full * static_cast<uint64_t>(c));
    int64_t* table = successors_.data() + static_cast<int64_t>(c) * vocab_ * branching_;
    for (int64_t v = 0; v < vocab_; ++v) {
      for (int32_t j = 0; j < branching_; ++j) {
        table[v * branching_ + j] =
            static_cast<int64_t>(splitmix64(splitmix64(chain_seed ^ static_cast<uint64_t>(v)) +
                                            static_cast<uint64_t>(j)) %
                                 static_cast<uint64_t>(vocab_));
      }
    }
  }
  double total = 0;
  for (int32_t j = 0; j < branching_; ++j) total += std::ldexp(1.0, -j);
  double acc = 0;
  for (int32_t j = 0; j < branching_; ++j) {
    acc += std::ldexp(1.0, -j) / total;
    cumulative_.push_back(acc);
  }
  cumulative_.back() = 1.0;
}

void SyntheticMarkovCorpus::sample(Split split, int64_t index, int64_t len, int64_t* out) const {
  std::mt19937_64 rng(splitmix64(seed_ * 0x100000001B3ull + static_cast<uint64_t>(index) * 2 +
                                 (split == Split::kValid ? 1 : 0)));
  std::uniform_real_distribution<double> u(0.0, 1.0);
  const int64_t* table =
      successors_.data() + static_cast<int64_t>(source_of(split, index)) * vocab_ * branching_;
  int64_t tok = static_cast<int64_t>(rng() % static_cast<uint64_t>(vocab_));
  for (int64_t i = 0; i < len; ++i) {
    out[i] = tok;
    const double r = u(rng);
    int32_t j = 0;
    while (j + 1 < branching_ && r > cumulative_[j]) ++j;
    tok = table[tok * branching_ + j];
  }
}

int32_t SyntheticMarkovCorpus::source_of(Split split, int64_t index) const {
  if (sources_ == 1) return 0;
  const uint64_t h =
      splitmix64(splitmix64(seed_ ^ 0xD6E8FEB86659FD93ull) + static_cast<uint64_t>(index) * 2 +
                 (split == Split::kValid ? 1 : 0));
  const double r = static_cast<double>(h >> 11) * 0x1.0p-53;  // uniform in [0, 1)
  int32_t c = 0;
  while (c + 1 < sources_ && r >= shares_[static_cast<size_t>(c)]) ++c;
  return c;
}

std::vector<std::string> SyntheticMarkovCorpus::source_names() const {
  if (sources_ == 1) return {"synthetic"};
  std::vector<std::string> names;
  for (int32_t c = 0; c < sources_; ++c) names.push_back(fmt::format("chain{}", c));
  return names;
}

int64_t SyntheticMarkovCorpus::document_length(Split split, int64_t index) const {
  const uint64_t h =
      splitmix64(splitmix64(seed_ ^ 0x9E3779B97F4A7C15ull) + static_cast<uint64_t>(index) * 2 +
                 (split == Split::kValid ? 1 : 0));
  const auto m = static_cast<uint64_t>(max_document_len_);
  if ((h >> 61) == 0) return static_cast<int64_t>(m + 1 + (h % (3 * m)));  // 1 in 8: the long tail
  return static_cast<int64_t>(2 + h % (m - 1));
}

void SyntheticMarkovCorpus::document(Split split, int64_t index, int64_t begin, int64_t len,
                                     int64_t* out) const {
  const int64_t n = document_length(split, index);
  LOOM_CHECK(begin >= 0 && len >= 0 && begin + len <= n,
             "synthetic document {} has {} tokens; asked for [{}, {})", index, n, begin,
             begin + len);
  std::vector<int64_t> all(static_cast<size_t>(begin + len));
  sample(split, index, begin + len, all.data());  // the chain's prefix: a document is a cut sample
  std::copy(all.begin() + begin, all.end(), out);
}

double SyntheticMarkovCorpus::entropy() const {
  double h = 0, prev = 0;
  for (double c : cumulative_) {
    const double p = c - prev;
    prev = c;
    if (p > 0) h -= p * std::log(p);
  }
  return h;
}

std::string SyntheticMarkovCorpus::describe() const {
  std::string blend;
  if (sources_ > 1) {
    blend = fmt::format(", {} chains blended", sources_);
    double prev = 0;
    for (int32_t c = 0; c < sources_; ++c) {
      blend += fmt::format("{}{:.3g}", c == 0 ? " " : ":", shares_[static_cast<size_t>(c)] - prev);
      prev = shares_[static_cast<size_t>(c)];
    }
  }
  return fmt::format(
      "synthetic Markov corpus (vocab {}, branching {}, seed {}, entropy {:.3f} nats{})", vocab_,
      branching_, seed_, entropy(), blend);
}

std::unique_ptr<DataSource> make_source(const config::JobConfig& job, int64_t vocab_size,
                                        int64_t global_batch) {
  const auto& d = job.data();
  const uint64_t seed = d.seed() != 0 ? d.seed() : job.seed();
  switch (d.source()) {
    case config::DataConfig::INDEXED:
      return std::make_unique<IndexedSource>(
          d, seed, job.train().seq_len(), vocab_size, job.train().steps() * global_batch,
          static_cast<int64_t>(job.train().eval_batches()) * global_batch,
          d.mode() == config::DataConfig::DOCUMENTS);
    case config::DataConfig::SYNTHETIC:
      return std::make_unique<SyntheticMarkovCorpus>(
          vocab_size, d.synthetic_branching(), d.seed() != 0 ? d.seed() : job.seed(),
          std::max<int64_t>(2, job.train().seq_len()), d.synthetic_sources(),
          d.synthetic_sources() > 1 ? std::vector<double>(d.weights().begin(), d.weights().end())
                                    : std::vector<double>{});
  }
  LOOM_THROW(ErrorKind::kConfig, "field 'data.source': unknown source {}",
             static_cast<int>(d.source()));
}

}  // namespace loom::data
