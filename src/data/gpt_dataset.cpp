#include "loom/data/gpt_dataset.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <numeric>
#include <sstream>

#include "loom/core/crc32c.h"
#include "loom/core/error.h"
#include "loom/core/fs.h"
#include "loom/core/hash.h"
#include "loom/core/logging.h"

namespace loom::data {

namespace {
// Fisher-Yates with splitmix64: the same permutation on every machine and standard library.
void shuffle(std::vector<int64_t>& v, size_t begin, size_t end, uint64_t seed) {
  uint64_t state = splitmix64(seed);
  for (size_t i = end - begin; i > 1; --i) {
    state = splitmix64(state);
    const size_t j = static_cast<size_t>(state % i);
    std::swap(v[begin + i - 1], v[begin + j]);
  }
}

int64_t document_tokens(const IndexedDataset& d, int64_t doc) {
  int64_t n = 0;
  for (int64_t s = d.document_start(doc); s < d.document_start(doc + 1); ++s)
    n += d.sequence_length(s);
  return n;
}

// Copies `len` tokens of document `doc` from `offset` (across its sequences).
void read_document(const IndexedDataset& d, int64_t doc, int64_t offset, int64_t len,
                   int64_t* out) {
  for (int64_t s = d.document_start(doc); s < d.document_start(doc + 1) && len > 0; ++s) {
    const int64_t n = d.sequence_length(s);
    if (offset >= n) {
      offset -= n;
      continue;
    }
    const int64_t take = std::min(len, n - offset);
    d.read(s, offset, take, out);
    out += take;
    len -= take;
    offset = 0;
  }
}
}  // namespace

WindowSampler::WindowSampler(std::shared_ptr<const IndexedDataset> dataset, const WindowOptions& o)
    : dataset_(std::move(dataset)), window_(o.seq_len_plus_one) {
  LOOM_CHECK(window_ >= 2, "sampler: a sample needs at least 2 tokens, got {}", window_);
  const int64_t docs = dataset_->num_documents();
  doc_begin_ = static_cast<int64_t>(std::llround(o.first * static_cast<double>(docs)));
  doc_end_ = static_cast<int64_t>(std::llround(o.last * static_cast<double>(docs)));
  int64_t tokens = 0;
  uint32_t lengths_crc = 0;  // in the cache key: a rebuilt dataset with the same counts differs
  for (int64_t d = doc_begin_; d < doc_end_; ++d) {
    const int64_t n = document_tokens(*dataset_, d);
    tokens += n;
    lengths_crc = crc32c(&n, sizeof(n), lengths_crc);
  }
  LOOM_CHECK_KIND(
      ErrorKind::kConfig, tokens >= window_,
      "dataset '{}': the split [{:.3f}, {:.3f}) holds documents {}..{} with {} tokens, fewer than "
      "one sample of {}",
      dataset_->prefix(), o.first, o.last, doc_begin_, doc_end_, tokens, window_);
  samples_per_epoch_ = (tokens - 1) / (window_ - 1);
  epochs_ = 1;
  while ((epochs_ * tokens - 1) / (window_ - 1) < o.num_samples) ++epochs_;

  const uint64_t key = splitmix64(
      fnv1a64(dataset_->prefix()) ^ splitmix64(static_cast<uint64_t>(dataset_->num_tokens())) ^
      splitmix64(static_cast<uint64_t>(doc_begin_) * 1315423911ull +
                 static_cast<uint64_t>(doc_end_)) ^
      splitmix64(static_cast<uint64_t>(window_) << 20 ^ static_cast<uint64_t>(epochs_)) ^
      splitmix64(o.seed + 7) ^ splitmix64(0x5eed0000ull + lengths_crc));
  std::string path;
  if (!o.cache_dir.empty()) {
    path = fmt::format("{}/{}-{:016x}.samples", o.cache_dir,
                       std::filesystem::path(dataset_->prefix()).filename().string(), key);
    if (load_cache(path, key, tokens)) {
      from_cache_ = true;
      return;
    }
  }
  build(o.seed);
  if (!path.empty()) save_cache(path, key);
}

void WindowSampler::build(uint64_t seed) {
  const int64_t docs = doc_end_ - doc_begin_;
  document_index_.resize(static_cast<size_t>(epochs_ * docs));
  for (int64_t e = 0; e < epochs_; ++e) {
    std::iota(document_index_.begin() + e * docs, document_index_.begin() + (e + 1) * docs,
              doc_begin_);
    shuffle(document_index_, static_cast<size_t>(e * docs), static_cast<size_t>((e + 1) * docs),
            seed * 1000003ull + e);
  }
  int64_t total_tokens = 0;
  for (int64_t d = doc_begin_; d < doc_end_; ++d) total_tokens += document_tokens(*dataset_, d);
  const int64_t total = (epochs_ * total_tokens - 1) / (window_ - 1);
  sample_index_.resize(static_cast<size_t>((total + 1) * 2));
  int64_t p = 0, off = 0;
  sample_index_[0] = 0;
  sample_index_[1] = 0;
  for (int64_t s = 1; s <= total; ++s) {
    int64_t remaining = window_ - 1;
    while (remaining > 0) {
      const int64_t left = document_tokens(*dataset_, document_index_[p]) - off;
      if (left > remaining) {
        off += remaining;
        remaining = 0;
      } else {
        remaining -= left;
        ++p;
        off = 0;
      }
    }
    sample_index_[2 * s] = p;
    sample_index_[2 * s + 1] = off;
  }
  shuffle_.resize(static_cast<size_t>(total));
  std::iota(shuffle_.begin(), shuffle_.end(), 0);
  shuffle(shuffle_, 0, shuffle_.size(), seed * 7919ull + 17);
}

void WindowSampler::sample(int64_t index, int64_t* out) const {
  const int64_t s = shuffle_[static_cast<size_t>(index % static_cast<int64_t>(shuffle_.size()))];
  int64_t p = sample_index_[2 * s], off = sample_index_[2 * s + 1];
  int64_t need = window_;
  while (need > 0) {
    const int64_t doc = document_index_[p];
    const int64_t take = std::min(need, document_tokens(*dataset_, doc) - off);
    if (take > 0) read_document(*dataset_, doc, off, take, out);
    out += std::max<int64_t>(take, 0);
    need -= std::max<int64_t>(take, 0);
    ++p;
    off = 0;
  }
}

namespace {
constexpr char kCacheMagic[9] = "LOOMSMP2";  // v2: a CRC-32C of the three arrays after the sizes

uint32_t cache_crc(const std::vector<int64_t>& a, const std::vector<int64_t>& b,
                   const std::vector<int64_t>& c) {
  uint32_t crc = crc32c(a.data(), a.size() * 8);
  crc = crc32c(b.data(), b.size() * 8, crc);
  return crc32c(c.data(), c.size() * 8, crc);
}
}  // namespace

// [Note: sample-index cache]
// The cache is a file any process or person may have touched, so nothing in it is trusted: the
// format and key, the sizes the split implies, a CRC-32C of the contents (a swapped entry changes
// the data order silently), and every entry's bounds (an out-of-range one would read outside the
// dataset). Any failure is logged with the reason and the index is rebuilt.
bool WindowSampler::load_cache(const std::string& path, uint64_t key, int64_t tokens) {
  std::ifstream in(path, std::ios::binary);
  if (!in.good()) return false;
  auto reject = [&](const std::string& why) {
    LOOM_LOG_WARN("sample-index cache '{}' {}; rebuilding it", path, why);
    document_index_.clear();
    sample_index_.clear();
    shuffle_.clear();
    return false;
  };
  char magic[8];
  uint64_t k = 0, n[3] = {0, 0, 0};
  uint32_t crc = 0;
  in.read(magic, 8);
  in.read(reinterpret_cast<char*>(&k), 8);
  in.read(reinterpret_cast<char*>(n), 24);
  in.read(reinterpret_cast<char*>(&crc), 4);
  if (!in.good() || std::memcmp(magic, kCacheMagic, 8) != 0) {
    return reject("has another format (written by another version?)");
  }
  if (k != key) return reject("belongs to another dataset, split, window or seed");
  const int64_t docs = doc_end_ - doc_begin_;
  const int64_t total = (epochs_ * tokens - 1) / (window_ - 1);
  const uint64_t expect[3] = {static_cast<uint64_t>(epochs_ * docs),
                              static_cast<uint64_t>(2 * (total + 1)), static_cast<uint64_t>(total)};
  if (n[0] != expect[0] || n[1] != expect[1] || n[2] != expect[2]) {
    return reject(
        fmt::format("holds arrays of {}, {}, {} entries where this split needs {}, {}, {}", n[0],
                    n[1], n[2], expect[0], expect[1], expect[2]));
  }
  document_index_.resize(n[0]);
  sample_index_.resize(n[1]);
  shuffle_.resize(n[2]);
  in.read(reinterpret_cast<char*>(document_index_.data()), static_cast<std::streamsize>(n[0] * 8));
  in.read(reinterpret_cast<char*>(sample_index_.data()), static_cast<std::streamsize>(n[1] * 8));
  in.read(reinterpret_cast<char*>(shuffle_.data()), static_cast<std::streamsize>(n[2] * 8));
  if (!in.good()) return reject("is truncated");
  if (in.peek() != EOF) return reject("has bytes after its arrays");
  const uint32_t actual = cache_crc(document_index_, sample_index_, shuffle_);
  if (actual != crc) {
    return reject(
        fmt::format("fails its CRC-32C check (stored {:08x}, computed {:08x})", crc, actual));
  }
  for (size_t i = 0; i < document_index_.size(); ++i) {
    const int64_t d = document_index_[i];
    if (d < doc_begin_ || d >= doc_end_) {
      return reject(fmt::format("holds document {} at {}, outside the split's [{}, {})", d, i,
                                doc_begin_, doc_end_));
    }
  }
  // Each sample starts window - 1 tokens after the previous one, at a token that exists.
  const int64_t positions = static_cast<int64_t>(document_index_.size());
  std::vector<int64_t> before(static_cast<size_t>(positions) + 1, 0);  // tokens before a position
  for (int64_t q = 0; q < positions; ++q)
    before[q + 1] = before[q] + document_tokens(*dataset_, document_index_[q]);
  int64_t previous = -(window_ - 1);
  for (int64_t s = 0; s <= total; ++s) {
    const int64_t p = sample_index_[2 * s], off = sample_index_[2 * s + 1];
    const bool in_range = p >= 0 && p < positions && off >= 0 &&
                          off < std::max<int64_t>(1, before[p + 1] - before[p]);
    const int64_t at = in_range ? before[p] + off : -1;
    if (!in_range || at != previous + window_ - 1 || at >= before[positions]) {
      return reject(
          fmt::format("has sample {} start at ({}, {}), which is not {} tokens after the "
                      "previous one inside the data",
                      s, p, off, window_ - 1));
    }
    previous = at;
  }
  std::vector<bool> seen(static_cast<size_t>(total), false);
  for (int64_t v : shuffle_) {
    if (v < 0 || v >= total || seen[static_cast<size_t>(v)]) {
      return reject(
          fmt::format("has a shuffle that is not a permutation of [0, {}) (entry {})", total, v));
    }
    seen[static_cast<size_t>(v)] = true;
  }
  return true;
}

void WindowSampler::save_cache(const std::string& path, uint64_t key) const {
  std::error_code ec;
  std::filesystem::create_directories(std::filesystem::path(path).parent_path(), ec);
  try {
    // A temporary file per process, renamed into place: concurrent ranks write identical content.
    AtomicFile out(path);
    const uint64_t n[3] = {document_index_.size(), sample_index_.size(), shuffle_.size()};
    const uint32_t crc = cache_crc(document_index_, sample_index_, shuffle_);
    out.write(kCacheMagic, 8);
    out.write(&key, 8);
    out.write(n, 24);
    out.write(&crc, 4);
    out.write(document_index_.data(), n[0] * 8);
    out.write(sample_index_.data(), n[1] * 8);
    out.write(shuffle_.data(), n[2] * 8);
    out.commit();
  } catch (const Error& e) {
    LOOM_LOG_WARN("cannot write the sample-index cache '{}' (continuing without it): {}", path,
                  e.message());
  }
}

std::vector<std::pair<int32_t, int64_t>> blend(const std::vector<double>& weights,
                                               int64_t num_samples) {
  LOOM_CHECK(!weights.empty(), "blend: no datasets");
  double sum = 0;
  for (double w : weights) {
    LOOM_CHECK(w >= 0 && std::isfinite(w), "blend: weight {} must be finite and >= 0", w);
    sum += w;
  }
  LOOM_CHECK(sum > 0, "blend: the weights sum to 0");
  std::vector<int64_t> counts(weights.size(), 0);
  std::vector<std::pair<int32_t, int64_t>> out(static_cast<size_t>(num_samples));
  for (int64_t i = 0; i < num_samples; ++i) {
    size_t best = 0;
    double best_err = -1e300;
    for (size_t d = 0; d < weights.size(); ++d) {
      const double err =
          weights[d] / sum * static_cast<double>(i + 1) - static_cast<double>(counts[d]);
      if (err > best_err) {
        best_err = err;
        best = d;
      }
    }
    out[static_cast<size_t>(i)] = {static_cast<int32_t>(best), counts[best]++};
  }
  return out;
}

IndexedSource::IndexedSource(const config::DataConfig& c, uint64_t seed, int64_t seq_len,
                             int64_t vocab_size, int64_t train_samples, int64_t valid_samples,
                             bool documents)
    : vocab_(vocab_size), window_(seq_len + 1), documents_(documents) {
  LOOM_CHECK_CONFIG(c.paths_size() > 0, "data.source is INDEXED but 'data.paths' is empty");
  LOOM_CHECK_CONFIG(c.weights_size() == 0 || c.weights_size() == c.paths_size(),
                    "'data.weights' has {} entries for {} paths", c.weights_size(), c.paths_size());
  double a = 0, b = 0;
  {
    char comma = 0;
    std::istringstream ss(c.split());
    ss >> a >> comma >> b;
    LOOM_CHECK_CONFIG(
        !ss.fail() && comma == ',' && a > 0 && b >= 0 && ss.peek() == EOF,
        "field 'data.split' must be 'train,valid' proportions like \"98,2\", got '{}'", c.split());
  }
  const double cut = a / (a + b);
  for (int i = 0; i < c.paths_size(); ++i) {
    auto ds = std::make_shared<const IndexedDataset>(c.paths(i));
    if (c.check_vocab()) ds->check_vocab(vocab_size);
    datasets_.push_back(ds);
    weights_.push_back(c.weights_size() > 0 ? c.weights(i) : static_cast<double>(ds->num_tokens()));
  }
  auto make_split = [&](SplitData* split, double first, double last, int64_t samples,
                        uint64_t split_seed) {
    split->blend = blend(weights_, std::max<int64_t>(samples, 1));
    std::vector<int64_t> per(datasets_.size(), 0);
    for (const auto& [d, i] : split->blend)
      per[static_cast<size_t>(d)] = std::max(per[static_cast<size_t>(d)], i + 1);
    for (size_t d = 0; d < datasets_.size(); ++d) {
      if (documents_) {  // whole documents, no window indices to build (Note: variable-length mode)
        split->documents.push_back(weights_[d] > 0 ? std::make_unique<DocumentSampler>(
                                                         datasets_[d], first, last,
                                                         std::numeric_limits<int64_t>::max() / 4,
                                                         split_seed + d * 101)
                                                   : nullptr);
        continue;
      }
      WindowOptions o;
      o.seq_len_plus_one = window_;
      o.num_samples = std::max<int64_t>(per[d], 1);
      o.seed = split_seed + d * 101;
      o.first = first;
      o.last = last;
      o.cache_dir = c.cache_dir().empty() ? datasets_[d]->prefix() + ".cache" : c.cache_dir();
      split->samplers.push_back(weights_[d] > 0 ? std::make_unique<WindowSampler>(datasets_[d], o)
                                                : nullptr);
    }
  };
  make_split(&train_, 0.0, cut, train_samples, seed);
  if (b > 0 && valid_samples > 0) make_split(&valid_, cut, 1.0, valid_samples, seed + 1);
}

const IndexedSource::SplitData& IndexedSource::split_data(Split split) const {
  const SplitData& s = split == Split::kTrain ? train_ : valid_;
  LOOM_CHECK_CONFIG(!s.blend.empty(),
                    "there is no validation data: 'data.split' gives it no documents");
  return s;
}

int64_t IndexedSource::document_length(Split split, int64_t index) const {
  if (!documents_) return DataSource::document_length(split, index);
  const SplitData& s = split_data(split);
  const auto& [d, i] = s.blend[static_cast<size_t>(index % static_cast<int64_t>(s.blend.size()))];
  return s.documents[static_cast<size_t>(d)]->length(i);
}

void IndexedSource::document(Split split, int64_t index, int64_t begin, int64_t len,
                             int64_t* out) const {
  if (!documents_) return DataSource::document(split, index, begin, len, out);
  const SplitData& s = split_data(split);
  const auto& [d, i] = s.blend[static_cast<size_t>(index % static_cast<int64_t>(s.blend.size()))];
  s.documents[static_cast<size_t>(d)]->read(i, begin, len, out);
}

void IndexedSource::sample(Split split, int64_t index, int64_t len, int64_t* out) const {
  LOOM_CHECK(!documents_,
             "indexed source: built for whole documents (data.mode DOCUMENTS), asked for a window");
  LOOM_CHECK(len == window_, "indexed source: built for samples of {} tokens, asked for {}",
             window_, len);
  const SplitData& s = split_data(split);
  // Past the planned samples (a run longer than its config said), the stream starts over.
  const auto& [d, i] = s.blend[static_cast<size_t>(index % static_cast<int64_t>(s.blend.size()))];
  s.samplers[static_cast<size_t>(d)]->sample(i, out);
}

int32_t IndexedSource::source_of(Split split, int64_t index) const {
  const SplitData& s = split_data(split);
  return s.blend[static_cast<size_t>(index % static_cast<int64_t>(s.blend.size()))].first;
}

std::vector<std::string> IndexedSource::source_names() const {
  std::vector<std::string> names;
  for (const auto& d : datasets_) {
    const std::string& p = d->prefix();
    names.push_back(
        p.substr(p.find_last_of('/') == std::string::npos ? 0 : p.find_last_of('/') + 1));
  }
  for (size_t i = 0; i < names.size(); ++i) {
    for (size_t j = 0; j < i; ++j) {
      if (names[j] == names[i]) {
        names[i] += fmt::format("#{}", i);
        break;
      }
    }
  }
  return names;
}

std::string IndexedSource::describe() const {
  std::string s = "indexed datasets:";
  for (size_t d = 0; d < datasets_.size(); ++d) {
    s += fmt::format(
        " {} ({} docs, {} tokens, {}, weight {:.3g}; {} train epochs{})", datasets_[d]->prefix(),
        datasets_[d]->num_documents(), datasets_[d]->num_tokens(),
        dtype_code_name(datasets_[d]->dtype_code()), weights_[d],
        d < train_.samplers.size() && train_.samplers[d] ? train_.samplers[d]->num_epochs() : 0,
        d < train_.samplers.size() && train_.samplers[d] && train_.samplers[d]->loaded_from_cache()
            ? ", cached indices"
            : "");
  }
  return s;
}

}  // namespace loom::data

namespace loom::data {

DocumentSampler::DocumentSampler(std::shared_ptr<const IndexedDataset> dataset, double first,
                                 double last, int64_t max_len, uint64_t seed)
    : dataset_(std::move(dataset)), max_len_(max_len), seed_(seed) {
  LOOM_CHECK(max_len >= 1, "document sampler: max_len must be >= 1, got {}", max_len);
  const int64_t docs = dataset_->num_documents();
  begin_ = static_cast<int64_t>(std::llround(first * static_cast<double>(docs)));
  end_ = static_cast<int64_t>(std::llround(last * static_cast<double>(docs)));
  LOOM_CHECK_KIND(ErrorKind::kConfig, end_ > begin_,
                  "dataset '{}': the split [{}, {}) holds no documents", dataset_->prefix(), first,
                  last);
}

int64_t DocumentSampler::document(int64_t index) const {
  const int64_t n = end_ - begin_;
  const auto epoch = static_cast<size_t>(index / n);
  // Permutations are built on first use, under a lock: the loader's prefetch thread and its
  // callers may ask at once.
  std::lock_guard<std::mutex> lock(mutex_);
  while (epochs_.size() <= epoch) {
    std::vector<int64_t> perm(static_cast<size_t>(n));
    std::iota(perm.begin(), perm.end(), begin_);
    shuffle(perm, 0, perm.size(), seed_ * 2654435761ull + epochs_.size());
    epochs_.push_back(std::move(perm));
  }
  return epochs_[epoch][static_cast<size_t>(index % n)];
}

int64_t DocumentSampler::length(int64_t index) const {
  return std::min(max_len_, document_tokens(*dataset_, document(index)));
}

void DocumentSampler::read(int64_t index, int64_t begin, int64_t len, int64_t* out) const {
  const int64_t n = length(index);
  LOOM_CHECK(begin >= 0 && len >= 0 && begin + len <= n,
             "dataset '{}': sample {} has {} tokens; asked for [{}, {})", dataset_->prefix(), index,
             n, begin, begin + len);
  read_document(*dataset_, document(index), begin, len, out);
}

std::vector<int64_t> DocumentSampler::sample(int64_t index) const {
  const int64_t doc = document(index);
  std::vector<int64_t> out(
      static_cast<size_t>(std::min(max_len_, document_tokens(*dataset_, doc))));
  read_document(*dataset_, doc, 0, static_cast<int64_t>(out.size()), out.data());
  return out;
}

}  // namespace loom::data
