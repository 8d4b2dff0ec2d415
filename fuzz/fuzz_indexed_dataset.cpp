// The Megatron indexed-dataset reader (.idx + .bin): any index is a checked dataset or a
// loom::Error (kIO naming the file and field), and every sequence it then admits reads inside the
// .bin. Edits mutate a valid index.
#include <vector>

#include "fuzz_common.h"
#include "loom/core/error.h"
#include "loom/data/indexed_dataset.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const std::string prefix = loom::fuzz::scratch_dir() + "/ds";
  static const std::string valid_idx = [] {
    loom::data::IndexedDatasetBuilder b(prefix, loom::data::dtype_code_for_vocab(1000));
    b.add_document({1, 2, 3, 4, 5});
    b.add_document({6, 7});
    b.add_document({8, 9, 10, 11});
    b.finish();
    return loom::fuzz::read_file(prefix + ".idx");
  }();
  loom::fuzz::write_file(prefix + ".idx", loom::fuzz::mutate(valid_idx, data, size));
  try {
    loom::data::IndexedDataset ds(prefix);
    std::vector<int64_t> out;
    for (int64_t s = 0; s < ds.num_sequences(); ++s) {
      out.resize(static_cast<size_t>(ds.sequence_length(s)));
      ds.read(s, 0, ds.sequence_length(s), out.data());
    }
    ds.check_vocab(1000);
  } catch (const loom::Error&) {
  }
  return 0;
}
