// Where training tokens come from. The trainer asks for sample `index` of a split; a source must
// answer deterministically, so the global batch sequence depends only on (seed, step) and a resumed
// run continues exactly. The indexed-dataset loader (Megatron .bin/.idx) implements the same
// interface.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "loom/config.pb.h"

namespace loom::data {

enum class Split { kTrain, kValid };

class DataSource {
 public:
  virtual ~DataSource() = default;
  // Fills out[0 .. len) with the tokens of sample `index` of `split`.
  virtual void sample(Split split, int64_t index, int64_t len, int64_t* out) const = 0;
  // DOCUMENTS mode (Note: step plan): whole documents. document_length() is known without reading
  // the tokens, so a step can be planned before it is loaded; document() fills out[0 .. len) with
  // tokens [begin, begin + len) of document `index` of `split`. Sources without documents throw a
  // kUnsupported error naming themselves.
  virtual bool has_documents() const { return false; }
  virtual int64_t document_length(Split split, int64_t index) const;
  virtual void document(Split split, int64_t index, int64_t begin, int64_t len, int64_t* out) const;
  virtual int64_t vocab_size() const = 0;
  virtual std::string describe() const = 0;
  // Blended sources (INDEXED data.paths, SYNTHETIC data.synthetic_sources): their names, and the
  // source sample / document `index` of `split` comes from (an index into the names). A source of
  // one part answers {"<what>"} and 0. The loader tags every token with it (Batch::source) when
  // there are several, and MoE layers count the experts each source's tokens choose.
  virtual std::vector<std::string> source_names() const { return {describe()}; }
  virtual int32_t source_of(Split /*split*/, int64_t /*index*/) const { return 0; }
};

// [Note: synthetic corpus]
// A first-order Markov chain over the vocabulary: token v is followed by one of `branching`
// successors succ(v, j), chosen with probability proportional to 2^-j. The successors are a hash of
// (seed, v, j), so the corpus is fixed by its seed and needs no files. A model that learns the
// chain reaches the chain's entropy (about 1.14 nats for branching 4, H = -sum p_j ln p_j), against
// ln(vocab) for one that learned nothing: the demo and the tests can see learning happen.
//
// With `sources` > 1 the corpus is a blend of that many chains (chain 0 is the one above; chain j
// draws its successors from (seed, j)): sample i belongs to the chain a seeded draw over (seed,
// split, i) picks with the shares `weights` (empty: equal), and follows that chain's table. The
// tests and benchmarks use it to see experts specialise by source without files.
//
// As documents (DOCUMENTS mode), document i is sample i's chain cut to a length drawn from (seed,
// split, i): with probability 7/8 uniform in [2, max_document_len], else uniform in
// (max_document_len, 4 max_document_len] (a long tail, so some documents need splitting).
class SyntheticMarkovCorpus : public DataSource {
 public:
  SyntheticMarkovCorpus(int64_t vocab_size, int32_t branching, uint64_t seed,
                        int64_t max_document_len = 256, int32_t sources = 1,
                        std::vector<double> weights = {});
  void sample(Split split, int64_t index, int64_t len, int64_t* out) const override;
  bool has_documents() const override { return true; }
  int64_t document_length(Split split, int64_t index) const override;
  void document(Split split, int64_t index, int64_t begin, int64_t len,
                int64_t* out) const override;
  int64_t vocab_size() const override { return vocab_; }
  std::string describe() const override;
  std::vector<std::string> source_names() const override;
  int32_t source_of(Split split, int64_t index) const override;
  // The chain's entropy rate in nats per token: the loss a perfect model reaches.
  double entropy() const;

 private:
  int64_t vocab_;
  int32_t branching_;
  uint64_t seed_;
  int64_t max_document_len_;
  int32_t sources_ = 1;
  std::vector<double> shares_;       // [sources] cumulative, ending at 1
  std::vector<int64_t> successors_;  // [sources, vocab, branching]
  std::vector<double> cumulative_;   // [branching]
};

// The source a job's config asks for; `global_batch` (sequences per step) sizes what an indexed
// source lays out (train.steps global batches, plus train.eval_batches for validation).
std::unique_ptr<DataSource> make_source(const config::JobConfig& job, int64_t vocab_size,
                                        int64_t global_batch);

}  // namespace loom::data
