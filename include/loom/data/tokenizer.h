// Tokenizers for preprocessing and inspection: a byte-level tokenizer that needs no vocabulary file
// (ids 0..255 are the bytes, 256 is end-of-document) and SentencePiece models (`.model`, BPE or
// unigram), plus training a small SentencePiece model on a corpus.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace loom::data {

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;
  virtual std::vector<int64_t> encode(const std::string& text) const = 0;
  virtual std::string decode(const std::vector<int64_t>& ids) const = 0;
  virtual int64_t vocab_size() const = 0;
  virtual int64_t eod() const = 0;  // appended after every document
  virtual std::string describe() const = 0;
};

class ByteTokenizer : public Tokenizer {
 public:
  std::vector<int64_t> encode(const std::string& text) const override;
  std::string decode(const std::vector<int64_t>& ids) const override;
  int64_t vocab_size() const override { return 257; }
  int64_t eod() const override { return 256; }
  std::string describe() const override { return "byte-level (256 bytes + end-of-document 256)"; }
};

// kind: "byte" or "sentencepiece" (then `model` is the .model file). SentencePiece runs in worker
// processes (tools/loom_spm; see Note: SentencePiece in its own process in tokenizer.cpp).
// The tokenizers are safe to call from several threads.
std::unique_ptr<Tokenizer> make_tokenizer(const std::string& kind, const std::string& model = "");

// Whether this build has the SentencePiece worker (libsentencepiece-dev was found).
bool sentencepiece_available();

// Trains a SentencePiece model on text files (in a worker process); writes <model_prefix>.model and
// .vocab. model_type: "bpe" or "unigram". Throws kUnsupported when built without SentencePiece.

void train_sentencepiece(const std::vector<std::string>& inputs, const std::string& model_prefix,
                         int vocab_size, const std::string& model_type, int threads);

}  // namespace loom::data
