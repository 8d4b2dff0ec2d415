#include "loom/data/indexed_dataset.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <limits>

#include "loom/core/error.h"
#include "loom/core/fs.h"

namespace loom::data {

namespace {
constexpr char kMagic[9] = {'M', 'M', 'I', 'D', 'I', 'D', 'X', '\0', '\0'};
constexpr uint64_t kHeaderBytes = 9 + 8 + 1 + 8 + 8;

template <typename T>
T load(const uint8_t* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}

std::string printable(const uint8_t* p, size_t n) {
  std::string s;
  for (size_t i = 0; i < n; ++i) {
    if (p[i] >= 32 && p[i] < 127) {
      s += static_cast<char>(p[i]);
    } else {
      s += fmt::format("\\x{:02x}", p[i]);
    }
  }
  return s;
}
}  // namespace

MappedFile::MappedFile(const std::string& path) : path_(path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  LOOM_CHECK_KIND(ErrorKind::kIO, fd >= 0, "cannot open '{}': {}", path, std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    const int e = errno;
    ::close(fd);
    LOOM_THROW(ErrorKind::kIO, "cannot stat '{}': {}", path, std::strerror(e));
  }
  size_ = static_cast<uint64_t>(st.st_size);
  if (size_ > 0) {
    void* m = ::mmap(nullptr, size_, PROT_READ, MAP_SHARED, fd, 0);
    const int e = errno;
    ::close(fd);
    LOOM_CHECK_KIND(ErrorKind::kIO, m != MAP_FAILED, "cannot mmap '{}': {}", path,
                    std::strerror(e));
    data_ = static_cast<const uint8_t*>(m);
  } else {
    ::close(fd);
  }
}

MappedFile::~MappedFile() {
  if (data_ != nullptr) ::munmap(const_cast<uint8_t*>(data_), size_);
}

int dtype_code_size(int code) {
  switch (code) {
    case 1:
    case 2:
      return 1;
    case 3:
    case 8:
      return 2;
    case 4:
    case 7:
      return 4;
    case 5:
    case 6:
      return 8;
    default:
      return 0;
  }
}

const char* dtype_code_name(int code) {
  static const char* names[] = {"?",     "uint8",   "int8",    "int16", "int32",
                                "int64", "float64", "float32", "uint16"};
  return code >= 1 && code <= 8 ? names[code] : "unknown";
}

int dtype_code_for_vocab(int64_t vocab_size) { return vocab_size <= 65536 ? 8 : 4; }

IndexedDataset::IndexedDataset(const std::string& prefix) : prefix_(prefix) {
  idx_ = std::make_unique<MappedFile>(prefix + ".idx");
  const std::string& ip = idx_->path();
  const uint8_t* p = idx_->data();
  const uint64_t n = idx_->size();
  LOOM_CHECK_KIND(ErrorKind::kIO, n >= kHeaderBytes,
                  "'{}' is {} bytes, shorter than the {}-byte MMIDIDX header", ip, n, kHeaderBytes);
  LOOM_CHECK_KIND(
      ErrorKind::kIO, std::memcmp(p, kMagic, 9) == 0,
      "'{}': wrong magic '{}' (expected 'MMIDIDX\\x00\\x00': not a Megatron mmap indexed dataset)",
      ip, printable(p, 9));
  const auto version = load<uint64_t>(p + 9);
  LOOM_CHECK_KIND(ErrorKind::kIO, version == 1, "'{}': version {} (this reader knows version 1)",
                  ip, version);
  dtype_code_ = p[17];
  item_size_ = dtype_code_size(dtype_code_);
  LOOM_CHECK_KIND(ErrorKind::kIO, item_size_ > 0, "'{}': dtype code {} is out of range (1..8)", ip,
                  dtype_code_);
  LOOM_CHECK_KIND(ErrorKind::kIO, dtype_code_ != 6 && dtype_code_ != 7,
                  "'{}': dtype code {} ({}) cannot hold token ids", ip, dtype_code_,
                  dtype_code_name(dtype_code_));
  const auto seqs = load<uint64_t>(p + 18);
  const auto docs = load<uint64_t>(p + 26);
  LOOM_CHECK_KIND(ErrorKind::kIO, seqs < (1ull << 40) && docs < (1ull << 40) && docs >= 1,
                  "'{}': sequence count {} / document index count {} are not plausible", ip, seqs,
                  docs);
  const uint64_t body = seqs * 4 + seqs * 8 + docs * 8;
  LOOM_CHECK_KIND(
      ErrorKind::kIO, n == kHeaderBytes + body || n == kHeaderBytes + body + seqs,
      "'{}' is {} bytes, but its header (sequences {}, document index {}) needs {} (or {} "
      "with sequence modes): truncated or corrupt",
      ip, n, seqs, docs, kHeaderBytes + body, kHeaderBytes + body + seqs);
  num_sequences_ = static_cast<int64_t>(seqs);
  num_doc_index_ = static_cast<int64_t>(docs);
  // The arrays are 4- and 8-byte values at offsets 34 and 34 + 4N: unaligned, so they are read
  // with memcpy (the accessors), never through typed pointers (undefined behaviour, found by
  // fuzz_indexed_dataset under UBSan), and never copied (the index of a large corpus is gigabytes).
  lengths_ = p + kHeaderBytes;
  pointers_ = p + kHeaderBytes + seqs * 4;
  doc_index_ = p + kHeaderBytes + seqs * 12;

  LOOM_CHECK_KIND(ErrorKind::kIO,
                  document_start(0) == 0 && document_start(num_doc_index_ - 1) == num_sequences_,
                  "'{}': the document index must run from 0 to the sequence count {}, got {} .. {}",
                  ip, num_sequences_, document_start(0), document_start(num_doc_index_ - 1));
  for (int64_t d = 1; d < num_doc_index_; ++d) {
    LOOM_CHECK_KIND(ErrorKind::kIO, document_start(d) >= document_start(d - 1),
                    "'{}': document index entry {} ({}) is below entry {} ({})", ip, d,
                    document_start(d), d - 1, document_start(d - 1));
  }
  bin_ = std::make_unique<MappedFile>(prefix + ".bin");
  int64_t expect = 0;
  for (int64_t i = 0; i < num_sequences_; ++i) {
    LOOM_CHECK_KIND(ErrorKind::kIO, sequence_length(i) >= 0, "'{}': sequence {} has length {}", ip,
                    i, sequence_length(i));
    LOOM_CHECK_KIND(
        ErrorKind::kIO, sequence_pointer(i) == expect,
        "'{}': sequence {} points at byte {}, but the sequences before it end at byte {}", ip, i,
        sequence_pointer(i), expect);
    expect += static_cast<int64_t>(sequence_length(i)) * item_size_;
    num_tokens_ += sequence_length(i);
  }
  LOOM_CHECK_KIND(ErrorKind::kIO, static_cast<uint64_t>(expect) == bin_->size(),
                  "'{}' is {} bytes, but '{}' describes {} tokens of {} = {} bytes: {}",
                  bin_->path(), bin_->size(), ip, num_tokens_, dtype_code_name(dtype_code_), expect,
                  static_cast<uint64_t>(expect) > bin_->size() ? "the .bin is truncated"
                                                               : "the .bin has extra bytes");
}

void IndexedDataset::read(int64_t seq, int64_t offset, int64_t length, int64_t* out) const {
  LOOM_CHECK(seq >= 0 && seq < num_sequences_, "{}: sequence {} is out of range [0, {})", prefix_,
             seq, num_sequences_);
  LOOM_CHECK(offset >= 0 && length >= 0 && offset + length <= sequence_length(seq),
             "{}: tokens [{}, {}) are outside sequence {} of length {}", prefix_, offset,
             offset + length, seq, sequence_length(seq));
  if (length == 0) return;  // (out may be null: memcpy of nothing from/to null is undefined)
  const uint8_t* src = bin_->data() + sequence_pointer(seq) + offset * item_size_;
  switch (dtype_code_) {
    case 1:
      for (int64_t i = 0; i < length; ++i) out[i] = src[i];
      break;
    case 2:
      for (int64_t i = 0; i < length; ++i) out[i] = static_cast<int8_t>(src[i]);
      break;
    case 3:
      for (int64_t i = 0; i < length; ++i) out[i] = load<int16_t>(src + 2 * i);
      break;
    case 8:
      for (int64_t i = 0; i < length; ++i) out[i] = load<uint16_t>(src + 2 * i);
      break;
    case 4:
      for (int64_t i = 0; i < length; ++i) out[i] = load<int32_t>(src + 4 * i);
      break;
    case 5:
      std::memcpy(out, src, static_cast<size_t>(length) * 8);
      break;
    default:
      LOOM_THROW(ErrorKind::kInternal, "dtype code {}", dtype_code_);
  }
}

void IndexedDataset::check_vocab(int64_t vocab_size) const {
  std::vector<int64_t> buf;
  for (int64_t s = 0; s < num_sequences_; ++s) {
    buf.resize(static_cast<size_t>(sequence_length(s)));
    read(s, 0, sequence_length(s), buf.data());
    for (int64_t i = 0; i < sequence_length(s); ++i) {
      LOOM_CHECK_KIND(ErrorKind::kIO, buf[i] >= 0 && buf[i] < vocab_size,
                      "'{}.bin': token {} of sequence {} is {}, outside the vocabulary [0, {})",
                      prefix_, i, s, buf[i], vocab_size);
    }
  }
}

struct IndexedDatasetBuilder::Impl {
  explicit Impl(const std::string& prefix) : bin(prefix + ".bin") {}
  AtomicFile bin;  // both files appear under their names only when finish() succeeds
};

IndexedDatasetBuilder::IndexedDatasetBuilder(const std::string& prefix, int dtype_code)
    : prefix_(prefix), dtype_code_(dtype_code) {
  LOOM_CHECK(dtype_code_size(dtype_code) > 0 && dtype_code != 6 && dtype_code != 7,
             "indexed dataset: dtype code {} cannot hold token ids", dtype_code);
  impl_ = std::make_unique<Impl>(prefix);
}

IndexedDatasetBuilder::~IndexedDatasetBuilder() = default;

void IndexedDatasetBuilder::add_document(const int64_t* tokens, int64_t count) {
  LOOM_CHECK(!finished_, "indexed dataset '{}': add_document after finish", prefix_);
  LOOM_CHECK(count <= std::numeric_limits<int32_t>::max(),
             "document of {} tokens exceeds the format's int32 length", count);
  int64_t lo = 0, hi = 0;
  switch (dtype_code_) {
    case 1:
      hi = 255;
      break;
    case 2:
      lo = -128;
      hi = 127;
      break;
    case 3:
      lo = -32768;
      hi = 32767;
      break;
    case 8:
      hi = 65535;
      break;
    case 4:
      lo = std::numeric_limits<int32_t>::min();
      hi = std::numeric_limits<int32_t>::max();
      break;
    default:
      lo = std::numeric_limits<int64_t>::min();
      hi = std::numeric_limits<int64_t>::max();
  }
  const int size = dtype_code_size(dtype_code_);
  std::vector<uint8_t> buf(static_cast<size_t>(count * size));
  for (int64_t i = 0; i < count; ++i) {
    LOOM_CHECK(tokens[i] >= lo && tokens[i] <= hi, "token id {} does not fit dtype {}", tokens[i],
               dtype_code_name(dtype_code_));
    std::memcpy(buf.data() + i * size, &tokens[i], static_cast<size_t>(size));  // little-endian
  }
  impl_->bin.write(buf.data(), buf.size());
  lengths_.push_back(static_cast<int32_t>(count));
  num_tokens_ += count;
}

void IndexedDatasetBuilder::finish() {
  LOOM_CHECK(!finished_, "indexed dataset '{}': finish called twice", prefix_);
  finished_ = true;
  std::string idx;
  auto put = [&](const void* p, size_t n) { idx.append(static_cast<const char*>(p), n); };
  const uint64_t version = 1, seqs = lengths_.size(), docs = lengths_.size() + 1;
  const auto code = static_cast<uint8_t>(dtype_code_);
  put(kMagic, 9);
  put(&version, 8);
  put(&code, 1);
  put(&seqs, 8);
  put(&docs, 8);
  put(lengths_.data(), seqs * 4);
  int64_t ptr = 0;
  const int size = dtype_code_size(dtype_code_);
  for (int32_t len : lengths_) {
    put(&ptr, 8);
    ptr += static_cast<int64_t>(len) * size;
  }
  for (uint64_t d = 0; d <= seqs; ++d) {
    const auto v = static_cast<int64_t>(d);
    put(&v, 8);
  }
  // Both files complete and on disk before either replaces an existing one.
  AtomicFile idx_file(prefix_ + ".idx");
  idx_file.write(idx.data(), idx.size());
  impl_->bin.sync();
  idx_file.sync();
  impl_->bin.commit();
  idx_file.commit();
}

}  // namespace loom::data
