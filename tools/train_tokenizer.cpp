// Trains a small SentencePiece model (BPE or unigram) on text files, for preprocess_data:
//   train_tokenizer --input corpus.txt --model-prefix data/tok --vocab-size 4096 [--model-type bpe]
#include <cstdio>
#include <thread>

#include "loom/core/cli.h"
#include "loom/core/error.h"
#include "loom/data/tokenizer.h"

int main(int argc, char** argv) try {
  loom::cli::CommandLine cl(argc, argv,
                            {{"input", "", "text files, comma separated (one sentence per line)"},
                             {"model-prefix", "", "writes <prefix>.model and <prefix>.vocab"},
                             {"vocab-size", "4096", "pieces"},
                             {"model-type", "bpe", "bpe or unigram"},
                             {"threads", "0", "0: all cores"}},
                            "Train a SentencePiece tokenizer.");
  if (cl.handled_help()) return 0;
  LOOM_CHECK_CONFIG(!cl.get("model-prefix").empty(), "flag --model-prefix is required");
  int threads = static_cast<int>(cl.get_int("threads"));
  if (threads <= 0) threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  loom::data::train_sentencepiece(cl.get_list("input"), cl.get("model-prefix"),
                                  static_cast<int>(cl.get_int("vocab-size")), cl.get("model-type"), threads);
  auto tok = loom::data::make_tokenizer("sentencepiece", cl.get("model-prefix") + ".model");
  std::printf("trained %s\n", tok->describe().c_str());
  return 0;
} catch (const loom::Error& e) {
  std::fprintf(stderr, "train_tokenizer: %s\n", e.what());
  return 1;
}
