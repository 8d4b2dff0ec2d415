// Text or JSONL -> Megatron indexed dataset (<output-prefix>.bin/.idx).
//
//   preprocess_data --input a.jsonl,b.jsonl --json-key text --output-prefix data/corpus
//                   [--tokenizer byte | --tokenizer sentencepiece --tokenizer-model m.model] [--workers 4]
//   preprocess_data --input notes.txt --format text --split paragraph --output-prefix data/notes
//
// Documents: one per JSONL line (the --json-key field), or from text files one per line, per
// blank-line-separated paragraph, per file, or ended by a separator line ("%" in fortune files).
// Each document is tokenised and followed by the tokenizer's end-of-document id. Tokenisation runs on --workers threads, in batches, and the
// output keeps the input order. Progress (MB/s, documents, tokens) is printed as it goes.
#include <fmt/format.h>
#include <nlohmann/json.hpp>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <thread>

#include "loom/core/cli.h"
#include "loom/core/error.h"
#include "loom/core/timer.h"
#include "loom/data/indexed_dataset.h"
#include "loom/data/tokenizer.h"

namespace {

struct Reader {
  std::vector<std::string> files;
  std::string format, split, key, separator;
  size_t file = 0;
  std::ifstream in;
  int64_t line_no = 0;
  uint64_t bytes = 0;

  bool open_next() {
    while (file < files.size()) {
      in = std::ifstream(files[file++]);
      LOOM_CHECK_KIND(loom::ErrorKind::kIO, in.good(), "cannot open input '{}'", files[file - 1]);
      line_no = 0;
      return true;
    }
    return false;
  }

  // The next document, or false at the end of all inputs.
  bool next(std::string* doc) {
    doc->clear();
    std::string line;
    while (true) {
      if (!in.is_open() || in.eof()) {
        if (!doc->empty()) return true;
        if (!open_next()) return false;
      }
      if (format == "text" && split == "file") {
        std::string all((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
        bytes += all.size();
        in.close();
        *doc = std::move(all);
        if (!doc->empty()) return true;
        continue;
      }
      if (!std::getline(in, line)) {
        in.close();
        if (!doc->empty()) return true;
        continue;
      }
      ++line_no;
      bytes += line.size() + 1;
      if (format == "jsonl") {
        if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
        nlohmann::json j;
        try {
          j = nlohmann::json::parse(line);
        } catch (const std::exception& e) {
          LOOM_THROW(loom::ErrorKind::kIO, "{}:{}: not valid JSON ({})", files[file - 1], line_no, e.what());
        }
        LOOM_CHECK_KIND(loom::ErrorKind::kIO, j.is_object() && j.contains(key) && j[key].is_string(),
                        "{}:{}: no string field '{}' (set --json-key)", files[file - 1], line_no, key);
        *doc = j[key].get<std::string>();
        return true;
      }
      if (split == "line") {
        if (line.empty()) continue;
        *doc = line;
        return true;
      }
      if (split == "separator") {
        if (line == separator) {
          if (!doc->empty()) return true;
          continue;
        }
        if (!doc->empty()) doc->push_back('\n');
        *doc += line;
        continue;
      }
      // paragraph
      if (line.find_first_not_of(" \t\r") == std::string::npos) {
        if (!doc->empty()) return true;
        continue;
      }
      if (!doc->empty()) doc->push_back('\n');
      *doc += line;
    }
  }
};

int run(int argc, char** argv) {
  loom::cli::CommandLine cl(argc, argv,
                            {{"input", "", "input files, comma separated"},
                             {"format", "auto", "jsonl, text, or auto (by extension: .jsonl/.json = jsonl)"},
                             {"json-key", "text", "the JSONL field holding the document"},
                             {"split", "paragraph", "text documents: line, paragraph, file, or separator"},
                             {"separator", "%", "with --split separator: the line that ends a document (fortune files)"},
                             {"output-prefix", "", "writes <prefix>.bin and <prefix>.idx"},
                             {"tokenizer", "byte", "byte or sentencepiece"},
                             {"tokenizer-model", "", "the SentencePiece .model"},
                             {"workers", "0", "tokenising threads (0: all cores)"},
                             {"batch", "2048", "documents per batch"},
                             {"no-eod", "", "do not append the end-of-document id", true}},
                            "Tokenise text or JSONL into a Megatron indexed dataset (.bin/.idx).");
  if (cl.handled_help()) return 0;
  Reader r;
  r.files = cl.get_list("input");
  LOOM_CHECK_CONFIG(!r.files.empty() && !r.files[0].empty(), "flag --input is required");
  const std::string prefix = cl.get("output-prefix");
  LOOM_CHECK_CONFIG(!prefix.empty(), "flag --output-prefix is required");
  r.format = cl.get("format");
  if (r.format == "auto") {
    const auto ext = std::filesystem::path(r.files[0]).extension().string();
    r.format = ext == ".jsonl" || ext == ".json" ? "jsonl" : "text";
  }
  LOOM_CHECK_CONFIG(r.format == "jsonl" || r.format == "text", "flag --format must be jsonl, text or auto");
  r.split = cl.get("split");
  LOOM_CHECK_CONFIG(r.split == "line" || r.split == "paragraph" || r.split == "file" || r.split == "separator",
                    "flag --split must be line, paragraph, file or separator");
  r.separator = cl.get("separator");
  r.key = cl.get("json-key");
  uint64_t total_bytes = 0;
  for (const auto& f : r.files) {
    std::error_code ec;
    const auto n = std::filesystem::file_size(f, ec);
    LOOM_CHECK_KIND(loom::ErrorKind::kIO, !ec, "cannot read input '{}': {}", f, ec.message());
    total_bytes += n;
  }
  auto tok = loom::data::make_tokenizer(cl.get("tokenizer"), cl.get("tokenizer-model"));
  const bool eod = !cl.get_bool("no-eod");
  int workers = static_cast<int>(cl.get_int("workers"));
  if (workers <= 0) workers = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  const auto batch = static_cast<size_t>(std::max<int64_t>(1, cl.get_int("batch")));
  if (auto parent = std::filesystem::path(prefix).parent_path(); !parent.empty()) {
    std::filesystem::create_directories(parent);
  }
  loom::data::IndexedDatasetBuilder builder(prefix, loom::data::dtype_code_for_vocab(tok->vocab_size()));
  std::fprintf(stderr, "preprocess_data: %zu file(s), %.1f MB, %s, %d worker(s) -> %s.bin/.idx\n", r.files.size(),
               static_cast<double>(total_bytes) / 1e6, tok->describe().c_str(), workers, prefix.c_str());
  const bool tty = isatty(fileno(stderr)) == 1;
  loom::Stopwatch clock;
  double last_report = 0;
  std::vector<std::string> docs;
  std::vector<std::vector<int64_t>> ids;
  bool more = true;
  while (more) {
    docs.clear();
    std::string d;
    while (docs.size() < batch && (more = r.next(&d))) docs.push_back(std::move(d));
    ids.assign(docs.size(), {});
    std::atomic<size_t> next{0};
    std::vector<std::thread> pool;
    for (int w = 0; w < workers; ++w) {
      pool.emplace_back([&] {
        for (size_t i; (i = next.fetch_add(1)) < docs.size();) {
          ids[i] = tok->encode(docs[i]);
          if (eod) ids[i].push_back(tok->eod());
        }
      });
    }
    for (auto& t : pool) t.join();
    for (const auto& v : ids) builder.add_document(v);
    const double t = clock.seconds();
    if (t - last_report > (tty ? 0.2 : 5.0) || !more) {
      last_report = t;
      std::fprintf(stderr, "%s%5.1f%% | %.1f MB/s | %lld docs | %lld tokens (%.0f tokens/s)%s",
                   tty ? "\r\033[K" : "",
                   total_bytes ? 100.0 * static_cast<double>(r.bytes) / static_cast<double>(total_bytes) : 100.0,
                   static_cast<double>(r.bytes) / 1e6 / std::max(t, 1e-9),
                   static_cast<long long>(builder.num_documents()), static_cast<long long>(builder.num_tokens()),
                   static_cast<double>(builder.num_tokens()) / std::max(t, 1e-9), tty ? "" : "\n");
    }
  }
  builder.finish();
  std::fprintf(stderr, "%sdone: %lld documents, %lld tokens in %.2f s\n", tty ? "\n" : "",
               static_cast<long long>(builder.num_documents()), static_cast<long long>(builder.num_tokens()),
               clock.seconds());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  return loom::cli::guarded_main("preprocess_data", [&] { return run(argc, argv); });
}
