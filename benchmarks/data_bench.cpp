// Data pipeline throughput against the raw sequential read bandwidth of the same files, measured in
// the same run: preprocessing (tools/preprocess_data: MB/s of text, tokens/s) and the fixed-window
// loader (samples/s, and the token bytes it delivers per second vs reading the .bin straight).
// Validates first: the preprocessed dataset must hold every document's bytes (checked by size).
//
//   data_bench [--input a.txt,b.txt | (default) a generated corpus] [--mb 64] [--seq-len 1024]
#include <fmt/format.h>
#include <nlohmann/json.hpp>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <random>
#include <vector>

#include "loom/core/cli.h"
#include "loom/core/error.h"
#include "loom/core/logging.h"
#include "loom/core/timer.h"
#include "loom/data/gpt_dataset.h"

namespace {
namespace fs = std::filesystem;

double read_bandwidth(const std::vector<std::string>& files, uint64_t* bytes_out) {
  std::vector<char> buf(1 << 20);
  std::vector<double> times;
  uint64_t bytes = 0;
  for (int rep = 0; rep < 3; ++rep) {
    loom::Stopwatch sw;
    bytes = 0;
    for (const auto& f : files) {
      std::ifstream in(f, std::ios::binary);
      while (in.read(buf.data(), static_cast<std::streamsize>(buf.size())) || in.gcount() > 0) bytes += in.gcount();
    }
    times.push_back(sw.seconds());
  }
  std::sort(times.begin(), times.end());
  *bytes_out = bytes;
  return static_cast<double>(bytes) / times[1];
}

int run(int argc, char** argv) {
  loom::cli::CommandLine cl(argc, argv,
                            {{"input", "", "text files (comma list); empty: generate --mb of text"},
                             {"mb", "32", "size of the generated corpus"},
                             {"workers", "0", "preprocessing threads (0: all cores)"},
                             {"seq-len", "1024", "loader window"},
                             {"samples", "20000", "loader samples to read"},
                             {"json", "", "also write the results as JSON here"}},
                            "Data pipeline throughput vs raw read bandwidth.");
  if (cl.handled_help()) return 0;
  loom::log::LogOptions lo;
  lo.level = "warn";
  loom::log::init(lo);
  const fs::path tmp = fs::temp_directory_path() / ("loom-data-bench-" + std::to_string(getpid()));
  fs::create_directories(tmp);
  std::vector<std::string> inputs = cl.get_list("input");
  inputs.erase(std::remove(inputs.begin(), inputs.end(), ""), inputs.end());
  if (inputs.empty()) {
    // Paragraphs of pseudo-words: a tokenizer and a loader see realistic structure, no file needed.
    const std::string path = (tmp / "generated.txt").string();
    std::ofstream out(path);
    std::mt19937_64 rng(1);
    const uint64_t target = static_cast<uint64_t>(cl.get_int("mb")) << 20;
    uint64_t written = 0;
    while (written < target) {
      std::string para;
      const int words = 5 + static_cast<int>(rng() % 400);
      for (int w = 0; w < words; ++w) {
        const int len = 1 + static_cast<int>(rng() % 9);
        for (int c = 0; c < len; ++c) para.push_back(static_cast<char>('a' + rng() % 26));
        para.push_back(w % 12 == 11 ? '\n' : ' ');
      }
      para += "\n\n";
      out << para;
      written += para.size();
    }
    inputs.push_back(path);
  }
  uint64_t text_bytes = 0;
  const double text_bw = read_bandwidth(inputs, &text_bytes);

  std::string list;
  for (const auto& f : inputs) list += (list.empty() ? "" : ",") + f;
  const std::string prefix = (tmp / "corpus").string();
  const std::string cmd = fmt::format("{} --input {} --format text --split paragraph --output-prefix {} --workers {} 2>/dev/null",
                                      LOOM_PREPROCESS_TOOL, list, prefix, cl.get_int("workers"));
  loom::Stopwatch sw;
  LOOM_CHECK_KIND(loom::ErrorKind::kIO, std::system(cmd.c_str()) == 0, "'{}' failed", cmd);
  const double pre_s = sw.seconds();
  auto ds = std::make_shared<const loom::data::IndexedDataset>(prefix);
  // Byte tokens: every text byte except paragraph separators, plus one end-of-document per document.
  LOOM_CHECK(ds->num_tokens() <= static_cast<int64_t>(text_bytes) + ds->num_documents() &&
                 ds->num_tokens() >= static_cast<int64_t>(text_bytes) / 2,
             "validation: {} tokens from {} bytes of text is implausible", ds->num_tokens(), text_bytes);

  uint64_t bin_bytes = 0;
  const double bin_bw = read_bandwidth({prefix + ".bin"}, &bin_bytes);
  const int64_t window = cl.get_int("seq-len") + 1;
  const int64_t samples = cl.get_int("samples");
  loom::data::WindowOptions o;
  o.seq_len_plus_one = window;
  o.num_samples = samples;
  o.seed = 1;
  sw.reset();
  loom::data::WindowSampler sampler(ds, o);
  const double index_s = sw.seconds();
  std::vector<int64_t> buf(static_cast<size_t>(window));
  int64_t checksum = 0;
  sw.reset();
  for (int64_t i = 0; i < samples; ++i) {
    sampler.sample(i, buf.data());
    checksum += buf[0];
  }
  const double load_s = sw.seconds();
  const double sample_rate = static_cast<double>(samples) / load_s;
  const double load_bw = sample_rate * static_cast<double>(window) * loom::data::dtype_code_size(ds->dtype_code());

  std::printf("# data_bench: %zu input file(s), %.1f MB of text -> %lld documents, %lld tokens (%s)\n", inputs.size(),
              static_cast<double>(text_bytes) / 1e6, static_cast<long long>(ds->num_documents()),
              static_cast<long long>(ds->num_tokens()), loom::data::dtype_code_name(ds->dtype_code()));
  std::printf("# %-28s %14s %16s %8s\n", "stage", "throughput", "raw read (same)", "ratio");
  std::printf("  %-28s %9.1f MB/s %11.1f MB/s %8.3f\n", "preprocess (text in)", static_cast<double>(text_bytes) / 1e6 / pre_s,
              text_bw / 1e6, static_cast<double>(text_bytes) / pre_s / text_bw);
  std::printf("  %-28s %9.2f Mtok/s\n", "preprocess (tokens out)", static_cast<double>(ds->num_tokens()) / 1e6 / pre_s);
  std::printf("  %-28s %9.1f ms\n", "sample index build", index_s * 1e3);
  std::printf("  %-28s %9.0f samples/s (%lld tokens each)\n", "loader", sample_rate, static_cast<long long>(window));
  std::printf("  %-28s %9.1f MB/s %11.1f MB/s %8.3f\n", "loader (token bytes)", load_bw / 1e6, bin_bw / 1e6,
              load_bw / bin_bw);
  std::printf("# checksum %lld\n", static_cast<long long>(checksum));
  if (!cl.get("json").empty()) {
    nlohmann::json j = {{"text_bytes", text_bytes},         {"tokens", ds->num_tokens()},
                        {"preprocess_s", pre_s},            {"text_read_bytes_per_s", text_bw},
                        {"bin_read_bytes_per_s", bin_bw},   {"loader_samples_per_s", sample_rate},
                        {"loader_bytes_per_s", load_bw},    {"index_build_s", index_s}};
    std::ofstream(cl.get("json")) << j.dump(2);
  }
  fs::remove_all(tmp);
  return 0;
}
}  // namespace

int main(int argc, char** argv) {
  return loom::cli::guarded_main("data_bench", [&] { return run(argc, argv); }, 2);
}
