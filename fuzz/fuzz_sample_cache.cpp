// The sample-index cache (Note: sample-index cache): a damaged cache file is detected and rebuilt,
// so the sampler always yields the samples of a fresh build: never a crash, an out-of-bounds read
// or another data order. Edits mutate the valid cache file. Inputs whose first byte is 3 mod 4
// also get a correct CRC-32C for their damaged arrays (a forged file), so the bounds, spacing and
// permutation checks behind the CRC are fuzzed too; such a file may pass as a consistent other
// order (a swapped shuffle), so only "no crash" is required of it.
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <vector>

#include "fuzz_common.h"
#include "loom/core/crc32c.h"
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
  std::string bytes = loom::fuzz::mutate(valid, data, size);
  constexpr size_t kHeader = 44;  // magic, key, three sizes, CRC (at 40) before the arrays
  const bool forged = size > 0 && data[0] % 4 == 3 && bytes.size() >= kHeader;
  if (forged) {
    const uint32_t crc = loom::crc32c(bytes.data() + kHeader, bytes.size() - kHeader);
    std::memcpy(&bytes[40], &crc, 4);
  }
  loom::fuzz::write_file(cache_file, bytes);
  loom::data::WindowSampler s(ds, options(dir + "/cache"));
  const auto got = all_samples(s);
  if (!forged && got != expected) std::abort();  // a damaged cache changed the data order
  return 0;
}
