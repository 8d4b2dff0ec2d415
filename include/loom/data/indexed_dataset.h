// Megatron-LM's memory-mapped indexed dataset: `<prefix>.bin` (the tokens of every sequence, back
// to back, little-endian) and `<prefix>.idx`:
//   9 bytes  magic "MMIDIDX\0\0"
//   u64      version (1)
//   u8       dtype code: 1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64, 7 float32, 8 uint16
//   u64      sequence count N
//   u64      document count D (the length of the document index: documents + 1)
//   i32[N]   sequence lengths (elements)
//   i64[N]   sequence pointers (byte offsets into .bin)
//   i64[D]   document index: sequence index where each document starts, then N
//   (i8[N]   sequence modes, multimodal files only)
// Files written by Megatron's preprocessing load unchanged. Both files are memory-mapped and read
// in place (zero copy). Every field is checked when the dataset opens, and a bad file is refused
// with a message naming the file, the field and what was expected.
#pragma once

#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

namespace loom::data {

// A read-only memory mapping, owned; unmapped on destruction.
class MappedFile {
 public:
  explicit MappedFile(const std::string& path);
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  const uint8_t* data() const { return data_; }
  uint64_t size() const { return size_; }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  const uint8_t* data_ = nullptr;
  uint64_t size_ = 0;
};

// Element size in bytes of a dtype code (0 for an unknown code).
int dtype_code_size(int code);
const char* dtype_code_name(int code);
// The smallest unsigned/signed integer code that holds token ids < vocab_size (uint16 or int32).
int dtype_code_for_vocab(int64_t vocab_size);

class IndexedDataset {
 public:
  // Opens `<prefix>.idx` and `<prefix>.bin`; throws kIO naming the file and field on any problem.
  explicit IndexedDataset(const std::string& prefix);

  const std::string& prefix() const { return prefix_; }
  int dtype_code() const { return dtype_code_; }
  int64_t num_sequences() const { return num_sequences_; }
  int64_t num_documents() const { return num_doc_index_ - 1; }
  int32_t sequence_length(int64_t i) const { return load_at<int32_t>(lengths_, i); }
  int64_t sequence_pointer(int64_t i) const { return load_at<int64_t>(pointers_, i); }
  // Sequence index where document d starts (d in [0, num_documents]).
  int64_t document_start(int64_t d) const { return load_at<int64_t>(doc_index_, d); }
  int64_t num_tokens() const { return num_tokens_; }

  // Copies `length` tokens of sequence `seq` from `offset` into `out` as int64.
  void read(int64_t seq, int64_t offset, int64_t length, int64_t* out) const;

  // Scans every token; throws kIO naming the sequence when a token id is < 0 or >= vocab_size.
  void check_vocab(int64_t vocab_size) const;

 private:
  std::string prefix_;
  std::unique_ptr<MappedFile> idx_, bin_;
  int dtype_code_ = 0;
  int item_size_ = 0;
  int64_t num_sequences_ = 0, num_doc_index_ = 0, num_tokens_ = 0;
  // The index's arrays in the mapped file (unaligned: read with load_at()).
  const uint8_t* lengths_ = nullptr;    // int32 per sequence
  const uint8_t* pointers_ = nullptr;   // int64 per sequence
  const uint8_t* doc_index_ = nullptr;  // int64 per document + 1
  template <typename T>
  static T load_at(const uint8_t* base, int64_t i) {
    T v;
    std::memcpy(&v, base + i * static_cast<int64_t>(sizeof(T)), sizeof(T));
    return v;
  }
};

// Writes a dataset in the same format: one sequence per document, as Megatron's preprocessing
// does. Writes <prefix>.bin while documents are added and <prefix>.idx on finish().
class IndexedDatasetBuilder {
 public:
  IndexedDatasetBuilder(const std::string& prefix, int dtype_code);
  ~IndexedDatasetBuilder();
  IndexedDatasetBuilder(const IndexedDatasetBuilder&) = delete;
  IndexedDatasetBuilder& operator=(const IndexedDatasetBuilder&) = delete;

  // Appends one document; every id must fit the dtype.
  void add_document(const int64_t* tokens, int64_t count);
  void add_document(const std::vector<int64_t>& tokens) {
    add_document(tokens.data(), static_cast<int64_t>(tokens.size()));
  }
  void finish();
  int64_t num_documents() const { return static_cast<int64_t>(lengths_.size()); }
  int64_t num_tokens() const { return num_tokens_; }

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  std::string prefix_;
  int dtype_code_;
  std::vector<int32_t> lengths_;
  int64_t num_tokens_ = 0;
  bool finished_ = false;
};

}  // namespace loom::data
