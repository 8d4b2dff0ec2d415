// The sample-index cache (Note: sample-index cache): a damaged cache file is detected and rebuilt,
// so the sampler always yields the samples of a fresh build: never a crash, an out-of-bounds read
// or another data order. Edits mutate the valid cache file.
#include <cstdlib>
#include <filesystem>
#include <vector>

#include "fuzz_common.h"
#include "loom/core/error.h"
#include "loom/core/logging.h"
#include "loom/data/gpt_dataset.h"

namespace {
loom::data::WindowOptions options(const std::string& cache) {
  loom::data::WindowOptions o;
  o.seq_len_plus_one = 5;
  o.num_samples = 40;
  o.seed = 3;
  o.cache_dir = cache;
  return o;
}

std::vector<int64_t> all_samples(const loom::data::WindowSampler& s) {
  std::vector<int64_t> out(static_cast<size_t>(s.num_samples()) * 5);
  for (int64_t i = 0; i < s.num_samples(); ++i) s.sample(i, out.data() + i * 5);
  return out;
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  namespace fs = std::filesystem;
  static const std::string dir = loom::fuzz::scratch_dir();
  static std::shared_ptr<const loom::data::IndexedDataset> ds;
  static std::string cache_file, valid;
  static std::vector<int64_t> expected;
  if (!ds) {
    loom::log::logger().set_level(spdlog::level::off);
    loom::data::IndexedDatasetBuilder b(dir + "/ds", loom::data::dtype_code_for_vocab(1000));
    for (int d = 0; d < 7; ++d) {
      std::vector<int64_t> doc(static_cast<size_t>(3 + d));
      for (size_t k = 0; k < doc.size(); ++k) doc[k] = static_cast<int64_t>(d * 10 + k);
      b.add_document(doc);
    }
    b.finish();
    ds = std::make_shared<loom::data::IndexedDataset>(dir + "/ds");
    expected = all_samples(loom::data::WindowSampler(ds, options("")));
    loom::data::WindowSampler made(ds, options(dir + "/cache"));
    for (const auto& e : fs::directory_iterator(dir + "/cache")) cache_file = e.path().string();
    if (cache_file.empty()) std::abort();
    valid = loom::fuzz::read_file(cache_file);
  }
  loom::fuzz::write_file(cache_file, loom::fuzz::mutate(valid, data, size));
  loom::data::WindowSampler s(ds, options(dir + "/cache"));
  if (all_samples(s) != expected) std::abort();  // a damaged cache changed the data order
  return 0;
}
