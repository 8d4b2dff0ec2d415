#include "loom/data/tokenizer.h"

#include <fmt/format.h>

#include "loom/core/error.h"

#ifdef LOOM_HAVE_SENTENCEPIECE
#include <sentencepiece_processor.h>
#include <sentencepiece_trainer.h>
#endif

namespace loom::data {

std::vector<int64_t> ByteTokenizer::encode(const std::string& text) const {
  std::vector<int64_t> ids(text.size());
  for (size_t i = 0; i < text.size(); ++i) ids[i] = static_cast<unsigned char>(text[i]);
  return ids;
}

std::string ByteTokenizer::decode(const std::vector<int64_t>& ids) const {
  std::string s;
  for (int64_t id : ids) {
    if (id >= 0 && id < 256) s.push_back(static_cast<char>(id));
  }
  return s;
}

#ifdef LOOM_HAVE_SENTENCEPIECE
namespace {
class SentencePieceTokenizer : public Tokenizer {
 public:
  explicit SentencePieceTokenizer(const std::string& model) : path_(model) {
    const auto status = sp_.Load(model);
    LOOM_CHECK_KIND(ErrorKind::kIO, status.ok(), "cannot load SentencePiece model '{}': {}", model,
                    status.ToString());
    eod_ = sp_.eos_id() >= 0 ? sp_.eos_id() : sp_.GetPieceSize() - 1;
  }
  std::vector<int64_t> encode(const std::string& text) const override {
    std::vector<int> ids;
    const auto status = sp_.Encode(text, &ids);
    LOOM_CHECK_KIND(ErrorKind::kValue, status.ok(), "SentencePiece encode failed: {}", status.ToString());
    return std::vector<int64_t>(ids.begin(), ids.end());
  }
  std::string decode(const std::vector<int64_t>& ids) const override {
    std::vector<int> v(ids.begin(), ids.end());
    std::string out;
    (void)sp_.Decode(v, &out);
    return out;
  }
  int64_t vocab_size() const override { return sp_.GetPieceSize(); }
  int64_t eod() const override { return eod_; }
  std::string describe() const override {
    return fmt::format("SentencePiece '{}' ({} pieces, end-of-document id {})", path_, vocab_size(), eod_);
  }

 private:
  std::string path_;
  sentencepiece::SentencePieceProcessor sp_;
  int64_t eod_ = 0;
};
}  // namespace
#endif

std::unique_ptr<Tokenizer> make_tokenizer(const std::string& kind, const std::string& model) {
  if (kind == "byte") return std::make_unique<ByteTokenizer>();
  if (kind == "sentencepiece") {
#ifdef LOOM_HAVE_SENTENCEPIECE
    LOOM_CHECK_CONFIG(!model.empty(), "tokenizer 'sentencepiece' needs a model file (--tokenizer-model)");
    return std::make_unique<SentencePieceTokenizer>(model);
#else
    LOOM_THROW(ErrorKind::kUnsupported,
             "SentencePiece is off in this build (cmake -DLOOM_WITH_SENTENCEPIECE=ON; see src/CMakeLists.txt "
             "for the protobuf conflict that keeps it off by default)");
#endif
  }
  LOOM_THROW(ErrorKind::kConfig, "unknown tokenizer '{}' (byte, sentencepiece)", kind);
}

void train_sentencepiece(const std::vector<std::string>& inputs, const std::string& model_prefix, int vocab_size,
                         const std::string& model_type, int threads) {
#ifdef LOOM_HAVE_SENTENCEPIECE
  LOOM_CHECK_CONFIG(!inputs.empty(), "train_tokenizer: no input files");
  LOOM_CHECK_CONFIG(model_type == "bpe" || model_type == "unigram", "model type must be bpe or unigram, got '{}'",
                    model_type);
  std::string files;
  for (const auto& f : inputs) files += (files.empty() ? "" : ",") + f;
  const std::string args = fmt::format(
      "--input={} --model_prefix={} --vocab_size={} --model_type={} --num_threads={} "
      "--character_coverage=1.0 --byte_fallback=true --pad_id=-1 --bos_id=-1 --eos_id=1 --unk_id=0 "
      "--input_sentence_size=2000000 --shuffle_input_sentence=true --minloglevel=2",
      files, model_prefix, vocab_size, model_type, threads);
  const auto status = sentencepiece::SentencePieceTrainer::Train(args);
  LOOM_CHECK_KIND(ErrorKind::kIO, status.ok(), "SentencePiece training failed: {}", status.ToString());
#else
  (void)inputs, (void)model_prefix, (void)vocab_size, (void)model_type, (void)threads;
  LOOM_THROW(ErrorKind::kUnsupported,
             "SentencePiece is off in this build (cmake -DLOOM_WITH_SENTENCEPIECE=ON; see src/CMakeLists.txt "
             "for the protobuf conflict that keeps it off by default)");
#endif
}

}  // namespace loom::data
