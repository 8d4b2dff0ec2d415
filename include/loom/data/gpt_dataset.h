// Fixed-window sampling over Megatron indexed datasets, as Megatron's GPTDataset does it, plus
// blending of several datasets by weight.
//
// [Note: sample indices]
// For one dataset and split (a contiguous range of its documents):
//   document index: the split's documents, once per epoch, each epoch shuffled (seeded);
//   sample index:   for sample i, (position in the document index, token offset) where it starts;
//                   a sample is seq_len + 1 consecutive tokens across document boundaries, and
//                   consecutive samples share one token (the last target of one is the first input
//                   of the next), so every token of an epoch is an input exactly once;
//   shuffle index:  a seeded permutation of the samples.
// Enough epochs are laid out for the samples the run will draw. The three arrays are computed once
// and cached on disk, keyed by everything they depend on.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "loom/data/indexed_dataset.h"
#include "loom/data/source.h"

namespace loom::data {

struct WindowOptions {
  int64_t seq_len_plus_one = 0;  // tokens per sample
  int64_t num_samples = 0;       // samples the run needs from this split (at least)
  uint64_t seed = 0;
  double first = 0, last = 1;  // the split as a fraction range of the documents
  std::string cache_dir;       // "" : no cache
};

class WindowSampler {
 public:
  WindowSampler(std::shared_ptr<const IndexedDataset> dataset, const WindowOptions& options);
  // Fills out[0 .. seq_len_plus_one) with sample `index` (taken modulo the laid-out samples).
  void sample(int64_t index, int64_t* out) const;
  int64_t num_samples() const { return static_cast<int64_t>(shuffle_.size()); }
  int64_t samples_per_epoch() const { return samples_per_epoch_; }
  int64_t num_epochs() const { return epochs_; }
  int64_t num_documents() const { return doc_end_ - doc_begin_; }
  bool loaded_from_cache() const { return from_cache_; }
  // (document-index position, offset) of sample i before shuffling; for tests.
  std::pair<int64_t, int64_t> sample_start(int64_t i) const {
    return {sample_index_[2 * i], sample_index_[2 * i + 1]};
  }
  int64_t document_at(int64_t position) const { return document_index_[position]; }

 private:
  void build(uint64_t seed);
  bool load_cache(const std::string& path, uint64_t key,
                  int64_t tokens);  // Note: sample-index cache
  void save_cache(const std::string& path, uint64_t key) const;

  std::shared_ptr<const IndexedDataset> dataset_;
  int64_t window_ = 0, doc_begin_ = 0, doc_end_ = 0, epochs_ = 0, samples_per_epoch_ = 0;
  std::vector<int64_t> document_index_;  // [epochs * docs] document ids
  std::vector<int64_t> sample_index_;    // [(samples + 1) * 2]
  std::vector<int64_t> shuffle_;         // [samples]
  bool from_cache_ = false;
};

// Greedy blending (Megatron's build_blending_indices): sample i goes to the dataset whose count is
// furthest below weight * (i + 1), so every prefix of the stream follows the weights as closely as
// whole samples allow. Returns, per sample, (dataset, index within that dataset).
std::vector<std::pair<int32_t, int64_t>> blend(const std::vector<double>& weights,
                                               int64_t num_samples);

class DocumentSampler;

// The INDEXED data source: datasets, blended, train and validation splits.
class IndexedSource : public DataSource {
 public:
  // `train_samples` / `valid_samples`: what the run will draw from each split.
  // `documents`: serve whole documents (data.mode DOCUMENTS: DocumentSampler per dataset, blended
  // by the same weights) instead of fixed windows.
  IndexedSource(const config::DataConfig& config, uint64_t seed, int64_t seq_len,
                int64_t vocab_size, int64_t train_samples, int64_t valid_samples,
                bool documents = false);
  void sample(Split split, int64_t index, int64_t len, int64_t* out) const override;
  bool has_documents() const override { return documents_; }
  int64_t document_length(Split split, int64_t index) const override;
  void document(Split split, int64_t index, int64_t begin, int64_t len,
                int64_t* out) const override;
  int64_t vocab_size() const override { return vocab_; }
  std::string describe() const override;
  // The datasets' file names (data.paths without their directories; repeated names get "#i").
  std::vector<std::string> source_names() const override;
  int32_t source_of(Split split, int64_t index) const override;

 private:
  struct SplitData {
    std::vector<std::unique_ptr<WindowSampler>> samplers;     // one per dataset (WINDOWS)
    std::vector<std::unique_ptr<DocumentSampler>> documents;  // one per dataset (DOCUMENTS)
    std::vector<std::pair<int32_t, int64_t>> blend;
  };
  const SplitData& split_data(Split split) const;
  int64_t vocab_, window_;
  bool documents_ = false;
  std::vector<std::shared_ptr<const IndexedDataset>> datasets_;
  std::vector<double> weights_;
  SplitData train_, valid_;
};

}  // namespace loom::data

namespace loom::data {

// [Note: variable-length mode]
// Whole documents instead of fixed windows, for the balance scheduler: sample i is document
// order[i mod D] of epoch i / D (each epoch a seeded shuffle of the split's documents), truncated
// to `max_len` tokens. Every document of the split appears exactly once per epoch; the lengths are
// known without reading the tokens, so a scheduler can plan a global batch before it is loaded.
class DocumentSampler {
 public:
  DocumentSampler(std::shared_ptr<const IndexedDataset> dataset, double first, double last,
                  int64_t max_len, uint64_t seed);
  int64_t num_documents() const { return end_ - begin_; }
  // Length of sample i after truncation.
  int64_t length(int64_t index) const;
  // The tokens of sample i (length(index) of them).
  std::vector<int64_t> sample(int64_t index) const;
  // The document id behind sample i.
  int64_t document(int64_t index) const;
  // Tokens [begin, begin + len) of sample i into out.
  void read(int64_t index, int64_t begin, int64_t len, int64_t* out) const;

 private:
  std::shared_ptr<const IndexedDataset> dataset_;
  int64_t begin_ = 0, end_ = 0, max_len_ = 0;
  uint64_t seed_ = 0;
  mutable std::mutex mutex_;                          // guards epochs_ (prefetch vs. callers)
  mutable std::vector<std::vector<int64_t>> epochs_;  // lazily built permutations
};

}  // namespace loom::data
