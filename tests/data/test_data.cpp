// Megatron indexed datasets (hand-built bytes, round trips, every refusal), fixed-window sampling
// (coverage, determinism, cache) and blending.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <deque>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <random>
#include <thread>

#include "loom/core/crc32c.h"
#include "loom/core/error.h"
#include "loom/data/gpt_dataset.h"
#include "loom/data/indexed_dataset.h"
#include "loom/data/tokenizer.h"

namespace {

namespace fs = std::filesystem;
using loom::data::IndexedDataset;
using loom::data::IndexedDatasetBuilder;

std::string temp_prefix(const std::string& name) {
  fs::path dir = fs::temp_directory_path() / ("loom-data-" + std::to_string(getpid()));
  fs::create_directories(dir);
  return (dir / name).string();
}

std::string read_all(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

void write_all(const std::string& path, const std::string& bytes) {
  std::ofstream(path, std::ios::binary | std::ios::trunc)
      .write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

template <typename T>
void put(std::string* s, T v) {
  s->append(reinterpret_cast<const char*>(&v), sizeof(T));
}

// The .idx Megatron's _IndexWriter produces for uint16 documents {1, 2, 3} and {4, 5}, byte by
// byte.
std::string known_idx() {
  std::string s("MMIDIDX\0\0", 9);
  put<uint64_t>(&s, 1);  // version
  put<uint8_t>(&s, 8);   // uint16
  put<uint64_t>(&s, 2);  // sequences
  put<uint64_t>(&s, 3);  // document index entries
  put<int32_t>(&s, 3);
  put<int32_t>(&s, 2);
  put<int64_t>(&s, 0);
  put<int64_t>(&s, 6);
  put<int64_t>(&s, 0);
  put<int64_t>(&s, 1);
  put<int64_t>(&s, 2);
  return s;
}

std::string known_bin() {
  std::string s;
  for (uint16_t t : {1, 2, 3, 4, 5}) put<uint16_t>(&s, t);
  return s;
}

template <typename F>
void expect_io_error(F&& f, const std::string& needle) {
  try {
    f();
    ADD_FAILURE() << "expected an error containing '" << needle << "'";
  } catch (const loom::Error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}

TEST(IndexedDataset, ReadsHandBuiltMegatronBytes) {
  const std::string p = temp_prefix("known");
  write_all(p + ".idx", known_idx());
  write_all(p + ".bin", known_bin());
  IndexedDataset d(p);
  EXPECT_EQ(d.dtype_code(), 8);
  EXPECT_EQ(d.num_sequences(), 2);
  EXPECT_EQ(d.num_documents(), 2);
  EXPECT_EQ(d.num_tokens(), 5);
  int64_t out[3];
  d.read(0, 0, 3, out);
  EXPECT_EQ(std::vector<int64_t>(out, out + 3), (std::vector<int64_t>{1, 2, 3}));
  d.read(1, 1, 1, out);
  EXPECT_EQ(out[0], 5);
  EXPECT_THROW(d.read(1, 1, 2, out), loom::Error);
  // The builder writes exactly these bytes.
  const std::string q = temp_prefix("built");
  IndexedDatasetBuilder b(q, 8);
  b.add_document({1, 2, 3});
  b.add_document({4, 5});
  b.finish();
  EXPECT_EQ(read_all(q + ".idx"), known_idx());
  EXPECT_EQ(read_all(q + ".bin"), known_bin());
}

TEST(IndexedDataset, RoundTripEveryIntegerDtype) {
  std::mt19937_64 rng(1);
  for (int code : {1, 2, 3, 4, 5, 8}) {
    const std::string p = temp_prefix("rt" + std::to_string(code));
    std::vector<std::vector<int64_t>> docs;
    IndexedDatasetBuilder b(p, code);
    for (int i = 0; i < 20; ++i) {
      std::vector<int64_t> doc(rng() % 40);
      for (auto& t : doc) t = static_cast<int64_t>(rng() % 100);
      b.add_document(doc);
      docs.push_back(doc);
    }
    b.finish();
    IndexedDataset d(p);
    ASSERT_EQ(d.num_documents(), 20);
    for (int i = 0; i < 20; ++i) {
      std::vector<int64_t> got(docs[i].size());
      d.read(i, 0, static_cast<int64_t>(got.size()), got.data());
      EXPECT_EQ(got, docs[i]) << "dtype " << code << " doc " << i;
    }
    d.check_vocab(100);
    expect_io_error([&] { d.check_vocab(50); }, "outside the vocabulary [0, 50)");
  }
  IndexedDatasetBuilder b(temp_prefix("fit"), 8);
  EXPECT_THROW(b.add_document({70000}), loom::Error);
}

TEST(IndexedDataset, BadFilesAreRefusedNamingTheField) {
  const std::string p = temp_prefix("bad");
  auto with = [&](std::string idx, std::string bin, const std::string& needle) {
    write_all(p + ".idx", idx);
    write_all(p + ".bin", bin);
    expect_io_error([&] { IndexedDataset d(p); }, needle);
  };
  std::string idx = known_idx(), bin = known_bin();
  with(idx, bin.substr(0, 8),
       "is 8 bytes, but '" + p +
           ".idx' describes 5 tokens of uint16 = 10 bytes: the .bin is truncated");
  with(idx, bin + "xx", "the .bin has extra bytes");
  std::string m = idx;
  m[0] = 'X';
  with(m, bin, "wrong magic 'XMIDIDX\\x00\\x00'");
  std::string v = idx;
  v[9] = 2;
  with(v, bin, "version 2 (this reader knows version 1)");
  std::string c = idx;
  c[17] = 9;
  with(c, bin, "dtype code 9 is out of range (1..8)");
  c[17] = 7;
  with(c, bin, "dtype code 7 (float32) cannot hold token ids");
  with(idx.substr(0, 20), bin, "shorter than the 34-byte MMIDIDX header");
  with(idx.substr(0, idx.size() - 8), bin, "truncated or corrupt");
  std::string ptr = idx;
  ptr[34 + 8 + 8] = 4;  // second pointer 6 -> 4
  with(ptr, bin, "sequence 1 points at byte 4, but the sequences before it end at byte 6");
  std::string di = idx;
  di[34 + 8 + 16 + 16] = 1;  // last document index entry 2 -> 1
  with(di, bin, "the document index must run from 0 to the sequence count 2");
  fs::remove(p + ".bin");
  write_all(p + ".idx", idx);
  expect_io_error([&] { IndexedDataset d(p); }, "cannot open '" + p + ".bin'");
}

// Documents whose tokens are all distinct (token = global position), so coverage can be counted.
std::shared_ptr<IndexedDataset> distinct_dataset(const std::string& name, int docs, uint64_t seed,
                                                 int64_t first_token = 0) {
  const std::string p = temp_prefix(name);
  std::mt19937_64 rng(seed);
  IndexedDatasetBuilder b(p, 4);
  int64_t next = first_token;
  for (int i = 0; i < docs; ++i) {
    std::vector<int64_t> doc(1 + rng() % 30);
    for (auto& t : doc) t = next++;
    b.add_document(doc);
  }
  b.finish();
  return std::make_shared<IndexedDataset>(p);
}

TEST(WindowSampler, EveryTokenIsAnInputOncePerEpoch) {
  auto d = distinct_dataset("cover", 50, 3);
  loom::data::WindowOptions o;
  o.seq_len_plus_one = 9;
  o.num_samples = 1;  // one epoch
  o.seed = 5;
  loom::data::WindowSampler s(d, o);
  ASSERT_EQ(s.num_epochs(), 1);
  ASSERT_EQ(s.num_samples(), (d->num_tokens() - 1) / 8);
  std::map<int64_t, int> seen;
  std::vector<int64_t> buf(9);
  for (int64_t i = 0; i < s.num_samples(); ++i) {
    s.sample(i, buf.data());
    for (int j = 0; j < 8; ++j) seen[buf[j]]++;  // inputs; buf[8] is the last target
  }
  for (const auto& [tok, n] : seen) EXPECT_EQ(n, 1) << "token " << tok;
  EXPECT_GE(static_cast<int64_t>(seen.size()), d->num_tokens() - 8);
}

TEST(WindowSampler, DeterministicCachedAndSeedDependent) {
  auto d = distinct_dataset("det", 40, 4);
  loom::data::WindowOptions o;
  o.seq_len_plus_one = 7;
  o.num_samples = 300;  // several epochs
  o.seed = 9;
  o.cache_dir = temp_prefix("cache");
  fs::remove_all(o.cache_dir);
  loom::data::WindowSampler a(d, o), b(d, o);
  EXPECT_FALSE(a.loaded_from_cache());
  EXPECT_TRUE(b.loaded_from_cache());
  EXPECT_GT(a.num_epochs(), 1);
  o.seed = 10;
  o.cache_dir = "";
  loom::data::WindowSampler c(d, o);
  std::vector<int64_t> x(7), y(7), z(7);
  int differ = 0;
  for (int64_t i = 0; i < 300; ++i) {
    a.sample(i, x.data());
    b.sample(i, y.data());
    c.sample(i, z.data());
    EXPECT_EQ(x, y) << i;
    differ += x != z;
  }
  EXPECT_GT(differ, 250);

  // Issue 15: the cache was trusted. A swapped pair of shuffle entries silently changed the order
  // and an out-of-range entry crashed; now each is detected, logged and the index rebuilt, giving
  // the same samples as the clean run. Layout: magic 8, key 8, sizes 24, crc 4, then the arrays.
  o.seed = 9;
  o.cache_dir = temp_prefix("cache");
  std::string file;
  for (const auto& e : fs::directory_iterator(o.cache_dir)) file = e.path().string();
  const std::string clean = read_all(file);
  uint64_t n[3];
  std::memcpy(n, clean.data() + 16, 24);
  const size_t shuffle_at = 44 + (n[0] + n[1]) * 8;
  auto expect_rebuilt = [&](const std::string& bytes, const char* what) {
    std::ofstream(file, std::ios::binary | std::ios::trunc) << bytes;
    loom::data::WindowSampler r(d, o);
    EXPECT_FALSE(r.loaded_from_cache()) << what;
    for (int64_t i = 0; i < 300; ++i) {
      a.sample(i, x.data());
      r.sample(i, y.data());
      ASSERT_EQ(x, y) << what << " sample " << i;
    }
    EXPECT_EQ(read_all(file), clean) << what << ": the rebuilt index is cached again";
  };
  std::string swapped = clean;
  std::swap_ranges(swapped.begin() + shuffle_at, swapped.begin() + shuffle_at + 8,
                   swapped.begin() + shuffle_at + 8);
  ASSERT_NE(swapped, clean);
  expect_rebuilt(swapped, "swapped shuffle entries");
  // Out of range, with a CRC that matches (as a buggy writer would store): the bounds checks.
  std::string wild = clean;
  const int64_t huge = int64_t{1} << 40;
  std::memcpy(&wild[shuffle_at], &huge, 8);
  const uint32_t crc = loom::crc32c(wild.data() + 44, wild.size() - 44);
  std::memcpy(&wild[40], &crc, 4);
  expect_rebuilt(wild, "an out-of-range shuffle entry");
  std::string doc = clean;
  std::memcpy(&doc[44], &huge, 8);
  const uint32_t crc2 = loom::crc32c(doc.data() + 44, doc.size() - 44);
  std::memcpy(&doc[40], &crc2, 4);
  expect_rebuilt(doc, "an out-of-range document");
  expect_rebuilt(clean.substr(0, clean.size() - 8), "a truncated file");
  fs::remove_all(o.cache_dir);
}

TEST(Blend, PrefixesFollowTheWeights) {
  const std::vector<double> w = {0.5, 0.3, 0.2};
  auto b = loom::data::blend(w, 1000);
  std::vector<int64_t> count(3, 0);
  for (size_t i = 0; i < b.size(); ++i) {
    EXPECT_EQ(b[i].second, count[b[i].first]);
    count[b[i].first]++;
    for (int d = 0; d < 3; ++d) EXPECT_LE(std::abs(count[d] - w[d] * (i + 1)), 1.0) << i;
  }
  EXPECT_EQ(count, (std::vector<int64_t>{500, 300, 200}));
  EXPECT_THROW(loom::data::blend({0, 0}, 4), loom::Error);
}

TEST(IndexedSource, SplitsAndBlendsTwoDatasets) {
  auto a = distinct_dataset("srcA", 60, 5);
  auto b = distinct_dataset("srcB", 60, 6);
  loom::config::DataConfig c;
  c.set_source(loom::config::DataConfig::INDEXED);
  c.add_paths(a->prefix());
  c.add_paths(b->prefix());
  c.add_weights(3);
  c.add_weights(1);
  c.set_split("90,10");
  c.set_check_vocab(false);
  c.set_cache_dir(temp_prefix("srccache"));
  loom::data::IndexedSource src(c, 1, 8, 1 << 20, 400, 40);
  std::vector<int64_t> buf(9);
  // Validation samples come only from the last 10% of each dataset's documents.
  // Token ids are positions in their file (int32: pointer / 4), so every token of a validation
  // window lies past its dataset's cut (document 54 of 60), and training windows lie before it.
  const int64_t cut = std::min(a->sequence_pointer(54), b->sequence_pointer(54)) / 4;
  const int64_t train_end = std::max(a->sequence_pointer(54), b->sequence_pointer(54)) / 4;
  for (int64_t i = 0; i < 40; ++i) {
    src.sample(loom::data::Split::kValid, i, 9, buf.data());
    for (int64_t t : buf) EXPECT_GE(t, cut) << "valid sample " << i;
  }
  for (int64_t i = 0; i < 400; ++i) {
    src.sample(loom::data::Split::kTrain, i, 9, buf.data());
    for (int64_t t : buf) EXPECT_LT(t, train_end) << "train sample " << i;
  }
  EXPECT_THROW(src.sample(loom::data::Split::kTrain, 0, 5, buf.data()), loom::Error);
  // Each sample's source is its dataset in the blend (Megatron's greedy order, per split), named
  // by the file.
  const std::vector<std::string> names = {fs::path(a->prefix()).filename().string(),
                                          fs::path(b->prefix()).filename().string()};
  EXPECT_EQ(src.source_names(), names);
  const auto train_blend = loom::data::blend({3, 1}, 400),
             valid_blend = loom::data::blend({3, 1}, 40);
  for (int64_t i = 0; i < 400; ++i)
    EXPECT_EQ(src.source_of(loom::data::Split::kTrain, i), train_blend[i].first) << i;
  for (int64_t i = 0; i < 40; ++i)
    EXPECT_EQ(src.source_of(loom::data::Split::kValid, i), valid_blend[i].first) << i;
  {
    // And it is the dataset the sample is read from (here told apart by their token ranges).
    auto lo = distinct_dataset("srcLow", 40, 7), hi = distinct_dataset("srcHigh", 40, 8, 1 << 20);
    loom::config::DataConfig two = c;
    two.clear_paths();
    two.add_paths(lo->prefix());
    two.add_paths(hi->prefix());
    loom::data::IndexedSource both(two, 3, 8, 1 << 21, 200, 0);
    int64_t high = 0;
    for (int64_t i = 0; i < 200; ++i) {
      both.sample(loom::data::Split::kTrain, i, 9, buf.data());
      const int32_t want = buf[0] >= (1 << 20) ? 1 : 0;
      EXPECT_EQ(both.source_of(loom::data::Split::kTrain, i), want) << "sample " << i;
      high += want;
    }
    EXPECT_EQ(high, 50);  // weights 3 : 1
  }
  c.set_split("90");
  expect_io_error([&] { loom::data::IndexedSource s(c, 1, 8, 1 << 20, 10, 0); },
                  "field 'data.split'");
  c.set_split("90,10");
  c.clear_paths();
  expect_io_error([&] { loom::data::IndexedSource s(c, 1, 8, 1 << 20, 10, 0); },
                  "'data.paths' is empty");
}

}  // namespace

namespace {
// JSONL -> tools/preprocess_data -> .bin/.idx -> the documents back, byte for byte, each followed
// by the end-of-document id; with several workers the order is kept.
TEST(Preprocess, JsonlRoundTripThroughTheTool) {
  const std::string dir = temp_prefix("pre");
  fs::create_directories(dir);
  std::vector<std::string> docs;
  {
    std::ofstream out(dir + "/in.jsonl");
    for (int i = 0; i < 500; ++i) {
      std::string text = "document " + std::to_string(i) +
                         std::string(static_cast<size_t>(i % 37), 'x') +
                         " \xc3\xa9t\xc3\xa9 \"quoted\"\\n";
      docs.push_back(text);
      nlohmann::json j = {{"id", i}, {"body", text}};
      out << j.dump() << "\n";
      if (i % 50 == 0) out << "\n";  // blank lines are skipped
    }
  }
  const std::string cmd = std::string(LOOM_PREPROCESS_TOOL) + " --input " + dir +
                          "/in.jsonl --json-key body " + "--output-prefix " + dir +
                          "/out --workers 3 --batch 64 2>/dev/null";
  ASSERT_EQ(std::system(cmd.c_str()), 0) << cmd;
  IndexedDataset d(dir + "/out");
  ASSERT_EQ(d.num_documents(), 500);
  EXPECT_EQ(d.dtype_code(), 8);  // uint16 for the 257-token byte vocabulary
  loom::data::ByteTokenizer tok;
  for (int i = 0; i < 500; ++i) {
    std::vector<int64_t> ids(static_cast<size_t>(d.sequence_length(i)));
    d.read(i, 0, static_cast<int64_t>(ids.size()), ids.data());
    ASSERT_FALSE(ids.empty());
    EXPECT_EQ(ids.back(), tok.eod());
    ids.pop_back();
    EXPECT_EQ(tok.decode(ids), docs[i]) << i;
  }
  // A line without the key is refused with its file and line.
  {
    std::ofstream out(dir + "/bad.jsonl");
    out << "{\"body\": \"fine\"}\n{\"text\": \"no body\"}\n";
  }
  const std::string bad = std::string(LOOM_PREPROCESS_TOOL) + " --input " + dir +
                          "/bad.jsonl --json-key body " + "--output-prefix " + dir + "/bad > " +
                          dir + "/err.txt 2>&1";
  EXPECT_NE(std::system(bad.c_str()), 0);
  EXPECT_NE(read_all(dir + "/err.txt").find("bad.jsonl:2: no string field 'body'"),
            std::string::npos)
      << read_all(dir + "/err.txt");
  // The same failing input onto the existing prefix leaves both files as they were (issue 15: it
  // used to leave a 0-byte .bin next to the old .idx) and no temporary file behind.
  const std::string bin = read_all(dir + "/out.bin"), idx = read_all(dir + "/out.idx");
  const std::string onto = std::string(LOOM_PREPROCESS_TOOL) + " --input " + dir +
                           "/bad.jsonl --json-key body --output-prefix " + dir + "/out 2>/dev/null";
  EXPECT_NE(std::system(onto.c_str()), 0);
  EXPECT_EQ(read_all(dir + "/out.bin"), bin);
  EXPECT_EQ(read_all(dir + "/out.idx"), idx);
  for (const auto& e : fs::directory_iterator(dir))
    EXPECT_EQ(e.path().string().find(".tmp"), std::string::npos) << e.path();
  fs::remove_all(dir);
}
}  // namespace

namespace {
TEST(DocumentSampler, WholeDocumentsOncePerEpochTruncated) {
  auto d = distinct_dataset("varlen", 40, 8);
  loom::data::DocumentSampler s(d, 0.0, 1.0, 12, 3);
  ASSERT_EQ(s.num_documents(), 40);
  for (int epoch = 0; epoch < 2; ++epoch) {
    std::map<int64_t, int> seen;
    for (int64_t i = epoch * 40; i < (epoch + 1) * 40; ++i) {
      const int64_t doc = s.document(i);
      seen[doc]++;
      const int64_t full = d->sequence_length(doc);
      auto tokens = s.sample(i);
      EXPECT_EQ(static_cast<int64_t>(tokens.size()), std::min<int64_t>(full, 12));
      EXPECT_EQ(s.length(i), static_cast<int64_t>(tokens.size()));
      std::vector<int64_t> expect(tokens.size());
      d->read(doc, 0, static_cast<int64_t>(expect.size()), expect.data());
      EXPECT_EQ(tokens, expect);
    }
    EXPECT_EQ(seen.size(), 40u) << "epoch " << epoch;
  }
  // Epochs are shuffled differently, and the same seed gives the same order.
  int same = 0;
  loom::data::DocumentSampler t(d, 0.0, 1.0, 12, 3);
  for (int64_t i = 0; i < 40; ++i) {
    same += s.document(i) == s.document(i + 40);
    EXPECT_EQ(s.document(i), t.document(i));
  }
  EXPECT_LT(same, 10);
}
}  // namespace

namespace {
// SentencePiece runs in worker processes (Note: SentencePiece in its own process), so it works in a
// process that also holds libloom's protobuf. The fixtures were trained and encoded by Python's
// sentencepiece 0.2.2 (tests/interop/device_interop.py); Debian's library must give the same ids.
#define REQUIRE_SPM()                                                                          \
  do {                                                                                         \
    if (!loom::data::sentencepiece_available()) GTEST_SKIP() << "built without SentencePiece"; \
  } while (0)

const std::string kSpmFixtures = std::string(LOOM_SOURCE_DIR) + "/tests/fixtures/sentencepiece";

TEST(SentencePiece, SameIdsAsPythonSentencePiece) {
  REQUIRE_SPM();
  auto enc = nlohmann::json::parse(read_all(kSpmFixtures + "/encodings.json"));
  for (const char* kind : {"bpe", "unigram"}) {
    auto tok = loom::data::make_tokenizer("sentencepiece", kSpmFixtures + "/" + kind + ".model");
    const auto& e = enc[kind];
    EXPECT_EQ(tok->vocab_size(), e["vocab_size"].get<int64_t>()) << kind;
    EXPECT_EQ(tok->eod(), e["eos_id"].get<int64_t>()) << kind;
    for (size_t i = 0; i < enc["samples"].size(); ++i) {
      const auto text = enc["samples"][i].get<std::string>();
      EXPECT_EQ(tok->encode(text), e["ids"][i].get<std::vector<int64_t>>())
          << kind << " sample " << i;
      EXPECT_EQ(tok->decode(e["ids"][i].get<std::vector<int64_t>>()),
                e["decoded"][i].get<std::string>())
          << kind << " sample " << i;
    }
  }
}

TEST(SentencePiece, ConcurrentCallersGetTheirOwnAnswers) {
  REQUIRE_SPM();
  auto tok = loom::data::make_tokenizer("sentencepiece", kSpmFixtures + "/bpe.model");
  std::vector<std::string> texts;
  for (int i = 0; i < 40; ++i)
    texts.push_back("text number " + std::to_string(i * 7919) + std::string(i, 'z'));
  std::vector<std::vector<int64_t>> serial;
  for (const auto& t : texts) serial.push_back(tok->encode(t));
  std::vector<std::vector<int64_t>> parallel(texts.size());
  std::vector<std::thread> threads;
  for (int w = 0; w < 4; ++w) {
    threads.emplace_back([&, w] {
      for (size_t i = static_cast<size_t>(w); i < texts.size(); i += 4)
        parallel[i] = tok->encode(texts[i]);
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(parallel, serial);
  EXPECT_THROW(tok->decode({tok->vocab_size()}), loom::Error);
  EXPECT_EQ(tok->decode(tok->encode("still answering")), "still answering");
}

TEST(SentencePiece, BadModelAndTrainingErrors) {
  REQUIRE_SPM();
  const std::string dir = temp_prefix("spm-bad");
  fs::create_directories(dir);
  write_all(dir + "/junk.model", "this is not a model");
  try {
    loom::data::make_tokenizer("sentencepiece", dir + "/junk.model");
    ADD_FAILURE() << "a junk model loaded";
  } catch (const loom::Error& e) {
    EXPECT_NE(
        std::string(e.what()).find("cannot load SentencePiece model '" + dir + "/junk.model'"),
        std::string::npos)
        << e.what();
  }
  EXPECT_THROW(loom::data::make_tokenizer("sentencepiece", dir + "/missing.model"), loom::Error);
  EXPECT_THROW(loom::data::train_sentencepiece({dir + "/missing.txt"}, dir + "/m", 300, "bpe", 1),
               loom::Error);
}

// Train a model here, then preprocess with it: the .bin holds exactly the tokenizer's ids + EOD.
TEST(SentencePiece, TrainThenPreprocess) {
  REQUIRE_SPM();
  const std::string dir = temp_prefix("spm-train");
  fs::create_directories(dir);
  const std::string corpus = std::string(LOOM_SOURCE_DIR) + "/LICENSE";
  loom::data::train_sentencepiece({corpus}, dir + "/tok", 320, "unigram", 2);
  auto tok = loom::data::make_tokenizer("sentencepiece", dir + "/tok.model");
  EXPECT_EQ(tok->vocab_size(), 320);
  std::vector<std::string> docs = {"Permission is hereby granted",
                                   "THE SOFTWARE IS PROVIDED \"AS IS\"", "émoji ✓ and bytes"};
  {
    std::ofstream out(dir + "/in.jsonl");
    for (const auto& d : docs) out << nlohmann::json{{"text", d}}.dump() << "\n";
  }
  const std::string cmd = std::string(LOOM_PREPROCESS_TOOL) + " --input " + dir +
                          "/in.jsonl --output-prefix " + dir +
                          "/out --tokenizer sentencepiece --tokenizer-model " + dir +
                          "/tok.model --workers 2 2>/dev/null";
  ASSERT_EQ(std::system(cmd.c_str()), 0) << cmd;
  IndexedDataset d(dir + "/out");
  ASSERT_EQ(d.num_documents(), 3);
  for (int i = 0; i < 3; ++i) {
    std::vector<int64_t> ids(static_cast<size_t>(d.sequence_length(i)));
    d.read(i, 0, static_cast<int64_t>(ids.size()), ids.data());
    auto want = tok->encode(docs[i]);
    want.push_back(tok->eod());
    EXPECT_EQ(ids, want) << i;
    ids.pop_back();
    EXPECT_EQ(tok->decode(ids), docs[i]) << i;  // byte fallback: nothing is lost
  }
  fs::remove_all(dir);
}
}  // namespace

// ---------------------------------------------------------------------------------------------
// The step plan (a pure function) and the micro-batch loader.

#include "loom/data/loader.h"
#include "loom/data/step_plan.h"

namespace {

using loom::data::BatchMode;
using loom::data::PlanLayout;
using loom::data::SampleRef;

// WINDOWS: rank r's micro-batches hold samples [r G/dp, (r+1) G/dp) in order, micro_batch_size
// rows each; N = G * seq_len; M_all = micro-batches x dp (the Trainer's split before the planner).
TEST(StepPlan, WindowsAreTheContiguousDpShareInMicroBatches) {
  std::vector<SampleRef> samples;
  for (int64_t i = 0; i < 16; ++i) samples.push_back({100 + i, 9});
  for (int dp : {1, 2, 4}) {
    for (int r = 0; r < dp; ++r) {
      PlanLayout l;
      l.dp_size = dp;
      l.dp_rank = r;
      l.micro_batch_size = 2;
      const auto plan = loom::data::plan_step(samples, l);
      EXPECT_EQ(plan.loss_tokens, 16 * 8);
      EXPECT_EQ(plan.global_micro_batches, 8);
      EXPECT_EQ(plan.sequence_tokens_sq, 16.0 * 8 * 8);
      ASSERT_EQ(static_cast<int>(plan.micro_batches.size()), 8 / dp);
      int64_t next = r * (16 / dp);
      for (const auto& mb : plan.micro_batches) {
        EXPECT_EQ(mb.row_len, 8);
        ASSERT_EQ(mb.rows.size(), 2u);
        for (const auto& row : mb.rows) {
          ASSERT_EQ(row.size(), 1u);
          EXPECT_EQ(row[0].sample, next++);
          EXPECT_EQ(row[0].begin, 0);
          EXPECT_EQ(row[0].tokens, 8);
        }
      }
    }
  }
  PlanLayout bad;
  bad.dp_size = 3;
  EXPECT_THROW(loom::data::plan_step(samples, bad), loom::Error);  // 16 samples over 3 ranks
  bad.dp_size = 2;
  bad.micro_batch_size = 3;
  EXPECT_THROW(loom::data::plan_step(samples, bad),
               loom::Error);  // 8 per rank in micro-batches of 3
}

// DOCUMENTS: over all DP ranks' plans, every target of every document is predicted exactly once;
// pieces are at most max_piece_tokens and contiguous; micro-batches hold at most the budget; each
// piece went to the first micro-batch with room (first-fit); N and M_all are the same on every
// rank.
TEST(StepPlan, DocumentsArePackedFirstFitAndCoverEveryTargetOnce) {
  std::mt19937_64 rng(5);
  for (int trial = 0; trial < 50; ++trial) {
    const int dp = 1 << (trial % 3);
    std::vector<SampleRef> samples;
    int64_t targets = 0;
    for (int64_t i = 0; i < 8 * dp; ++i) {
      const int64_t len = 2 + static_cast<int64_t>(rng() % (trial % 2 ? 70 : 20));
      samples.push_back({i * 3, len});
      targets += len - 1;
    }
    PlanLayout l;
    l.mode = BatchMode::kDocuments;
    l.dp_size = dp;
    l.micro_batch_tokens = 24 + trial % 9;
    l.max_piece_tokens = 16;
    l.pad_multiple = 1 + trial % 4;
    std::vector<std::vector<int>> covered(samples.size());
    for (size_t s = 0; s < samples.size(); ++s)
      covered[s].assign(static_cast<size_t>(samples[s].length - 1), 0);
    for (int r = 0; r < dp; ++r) {
      l.dp_rank = r;
      const auto plan = loom::data::plan_step(samples, l);
      EXPECT_EQ(plan.loss_tokens, targets);
      for (const auto& mb : plan.micro_batches) {
        ASSERT_EQ(mb.rows.size(), 1u);
        int64_t sum = 0;
        for (const auto& p : mb.rows[0]) {
          EXPECT_GE(p.sample, r * 8);  // this rank's share of the documents
          EXPECT_LT(p.sample, (r + 1) * 8);
          EXPECT_LE(p.tokens, l.max_piece_tokens);
          EXPECT_GE(p.tokens, 1);
          for (int64_t t = p.begin; t < p.begin + p.tokens; ++t)
            ++covered[static_cast<size_t>(p.sample)][static_cast<size_t>(t)];
          sum += p.tokens;
        }
        EXPECT_EQ(sum, mb.tokens);
        EXPECT_LE(mb.tokens, l.micro_batch_tokens);
        EXPECT_EQ(mb.row_len % l.pad_multiple, 0);
        EXPECT_GE(mb.row_len, mb.tokens);
        EXPECT_LT(mb.row_len, mb.tokens + l.pad_multiple);
      }
      // First-fit: replaying the pieces in document order, each lands in the first micro-batch that
      // had room for it at that moment.
      std::vector<int64_t> fill;
      std::map<std::pair<int64_t, int64_t>, size_t> home;
      for (size_t m = 0; m < plan.micro_batches.size(); ++m) {
        for (const auto& p : plan.micro_batches[m].rows[0]) home[{p.sample, p.begin}] = m;
      }
      for (const auto& [key, m] : home) {
        int64_t tokens = 0;
        for (const auto& p : plan.micro_batches[m].rows[0]) {
          if (p.sample == key.first && p.begin == key.second) tokens = p.tokens;
        }
        size_t first = 0;
        while (first < fill.size() && fill[first] + tokens > l.micro_batch_tokens) ++first;
        EXPECT_EQ(first, m) << "piece (" << key.first << ", " << key.second << ") is not first-fit";
        if (first == fill.size()) fill.push_back(0);
        fill[first] += tokens;
      }
      EXPECT_EQ(plan.global_micro_batches, [&] {
        int64_t n = 0;
        for (int q = 0; q < dp; ++q) {
          PlanLayout o = l;
          o.dp_rank = q;
          n += static_cast<int64_t>(loom::data::plan_step(samples, o).micro_batches.size());
        }
        return n;
      }());
    }
    // The attention term of the step's FLOPs: every piece of every rank, squared.
    double sq = 0;
    for (const auto& smp : samples) {
      for (int64_t left = smp.length - 1; left > 0; left -= l.max_piece_tokens) {
        const double p = static_cast<double>(std::min(left, l.max_piece_tokens));
        sq += p * p;
      }
    }
    l.dp_rank = 0;
    EXPECT_EQ(loom::data::plan_step(samples, l).sequence_tokens_sq, sq);
    for (size_t s = 0; s < samples.size(); ++s) {
      for (size_t t = 0; t < covered[s].size(); ++t)
        ASSERT_EQ(covered[s][t], 1) << "sample " << s << " target " << t;
    }
  }
  PlanLayout l;
  l.mode = BatchMode::kDocuments;
  l.micro_batch_tokens = 8;
  l.max_piece_tokens = 16;  // a piece longer than the budget
  EXPECT_THROW(loom::data::plan_step({{0, 5}}, l), loom::Error);
  l.max_piece_tokens = 8;
  // A document of one token (an empty text and its end token) has no target: it contributes
  // nothing.
  const auto short_docs = loom::data::plan_step({{0, 1}, {1, 5}, {2, 0}}, l);
  EXPECT_EQ(short_docs.loss_tokens, 4);
  ASSERT_EQ(short_docs.micro_batches.size(), 1u);
  ASSERT_EQ(short_docs.micro_batches[0].rows[0].size(), 1u);
  EXPECT_EQ(short_docs.micro_batches[0].rows[0][0].sample, 1);
  PlanLayout w;  // a window must have a target
  EXPECT_THROW(loom::data::plan_step({{0, 1}}, w), loom::Error);
}

// equal_micro_batches (the MoE GLOBAL_BATCH balance): every rank runs the busiest rank's count,
// the others' plans ending in empty micro-batches of padding; the real pieces are unchanged.
TEST(StepPlan, EqualMicroBatchesPadShorterPlansWithEmptyOnes) {
  std::vector<SampleRef> samples;
  // Rank 0: 4 long documents (several micro-batches); rank 1: 4 short ones (one micro-batch).
  for (int64_t i = 0; i < 4; ++i) samples.push_back({i, 30});
  for (int64_t i = 4; i < 8; ++i) samples.push_back({i, 3});
  PlanLayout l;
  l.mode = BatchMode::kDocuments;
  l.dp_size = 2;
  l.micro_batch_tokens = 32;
  l.max_piece_tokens = 16;
  l.pad_multiple = 4;
  std::vector<size_t> plain, equal;
  for (int r = 0; r < 2; ++r) {
    l.dp_rank = r;
    l.equal_micro_batches = false;
    const auto a = loom::data::plan_step(samples, l);
    l.equal_micro_batches = true;
    const auto b = loom::data::plan_step(samples, l);
    plain.push_back(a.micro_batches.size());
    equal.push_back(b.micro_batches.size());
    EXPECT_EQ(b.loss_tokens, a.loss_tokens);
    for (size_t m = 0; m < b.micro_batches.size(); ++m) {
      if (m < a.micro_batches.size()) {
        EXPECT_EQ(b.micro_batches[m].tokens, a.micro_batches[m].tokens);
        EXPECT_EQ(b.micro_batches[m].row_len, a.micro_batches[m].row_len);
      } else {  // empty: one row of padding
        ASSERT_EQ(b.micro_batches[m].rows.size(), 1u);
        EXPECT_TRUE(b.micro_batches[m].rows[0].empty());
        EXPECT_EQ(b.micro_batches[m].tokens, 0);
        EXPECT_EQ(b.micro_batches[m].row_len, l.pad_multiple);
      }
    }
    EXPECT_EQ(b.global_micro_batches, 2 * static_cast<int64_t>(b.micro_batches.size()));
  }
  EXPECT_GT(plain[0], plain[1]);  // the case is uneven without the option
  EXPECT_EQ(equal[0], plain[0]);
  EXPECT_EQ(equal[1], plain[0]);
}

// The loader's packed micro-batches: each piece's inputs and targets are its document's tokens,
// positions restart at 0 in each piece, doc ids separate pieces, padding does not count.
// [Note: synthetic corpus] with several chains: the shares follow the weights, chain 0 is the
// one-chain corpus, the others are other chains, and the loader tags every position of a window or
// packed piece with its sample's source (padding: 0).
TEST(SyntheticMarkovCorpus, BlendedChainsAreTaggedInEveryBatch) {
  using loom::data::Split;
  const loom::data::SyntheticMarkovCorpus one(64, 4, 9, /*max_document_len=*/12);
  const loom::data::SyntheticMarkovCorpus two(64, 4, 9, 12, /*sources=*/2, {3, 1});
  EXPECT_EQ(one.source_names(), std::vector<std::string>{"synthetic"});
  EXPECT_EQ(two.source_names(), (std::vector<std::string>{"chain0", "chain1"}));
  const int64_t n = 4000;
  int64_t first = 0, same = 0, seconds = 0;
  std::vector<int64_t> x(16), y(16);
  for (int64_t i = 0; i < n; ++i) {
    const int32_t src = two.source_of(Split::kTrain, i);
    ASSERT_TRUE(src == 0 || src == 1) << src;
    EXPECT_EQ(one.source_of(Split::kTrain, i), 0);
    two.sample(Split::kTrain, i, 16, x.data());
    one.sample(Split::kTrain, i, 16, y.data());
    if (src == 0) {
      ++first;
      EXPECT_EQ(x, y) << "chain 0 is the one-chain corpus (sample " << i << ")";
    } else {
      ++seconds;
      same += x == y ? 1 : 0;
    }
    EXPECT_EQ(two.document_length(Split::kTrain, i), one.document_length(Split::kTrain, i));
  }
  // Binomial(4000, 3/4): mean 3000, standard deviation 27.4; five of them either way.
  EXPECT_NEAR(static_cast<double>(first), 3000.0, 137.0);
  EXPECT_LT(same, seconds / 10) << "chain 1 follows chain 0's successors";
  // The loader's tags, in both modes.
  for (const auto mode : {BatchMode::kWindows, BatchMode::kDocuments}) {
    loom::data::LoaderOptions o;
    o.mode = mode;
    o.seq_len = 12;
    o.global_batch = 16;
    o.micro_batch_size = 4;
    o.micro_batch_tokens = 30;
    o.pad_multiple = 4;
    o.prefetch = false;
    loom::data::MicroBatchLoader loader(&two, o), plain(&one, o);
    EXPECT_FALSE(plain.next().batches.front().source.defined()) << "one source: no tags";
    const auto step = loader.next();
    const auto samples = loader.global_samples(Split::kTrain, 0);
    int64_t tagged = 0;
    for (size_t m = 0; m < step.batches.size(); ++m) {
      const auto& b = step.batches[m];
      ASSERT_TRUE(b.source.defined());
      ASSERT_EQ(b.source.sizes(), b.tokens.sizes());
      const auto& mb = step.plan.micro_batches[m];
      for (size_t r = 0; r < mb.rows.size(); ++r) {
        int64_t at = 0;
        for (const auto& p : mb.rows[r]) {
          const int64_t len = mode == BatchMode::kWindows ? o.seq_len : p.tokens;
          const int32_t want =
              two.source_of(Split::kTrain, samples[static_cast<size_t>(p.sample)].index);
          for (int64_t t = at; t < at + len; ++t)
            EXPECT_EQ(b.source[static_cast<int64_t>(r)][t].item<int64_t>(), want);
          tagged += want;
          at += len;
        }
        for (int64_t t = at; t < b.seq_len(); ++t)
          EXPECT_EQ(b.source[static_cast<int64_t>(r)][t].item<int64_t>(), 0) << "padding";
      }
    }
    EXPECT_GT(tagged, 0) << "no piece of the second source in the step";
  }
  // A source that names fewer parts than it tags is refused, naming itself; so are bad weights.
  struct Lying : loom::data::DataSource {
    void sample(Split, int64_t, int64_t len, int64_t* out) const override {
      std::fill(out, out + len, 1);
    }
    int64_t vocab_size() const override { return 2; }
    std::string describe() const override { return "lying test source"; }
    std::vector<std::string> source_names() const override { return {"a", "b"}; }
    int32_t source_of(Split, int64_t i) const override { return i == 3 ? 2 : 0; }
  } lying;
  loom::data::LoaderOptions w;
  w.seq_len = 4;
  w.global_batch = 4;
  w.micro_batch_size = 4;
  w.prefetch = false;
  loom::data::MicroBatchLoader bad(&lying, w);
  try {
    (void)bad.next();
    ADD_FAILURE() << "a source index past the names was accepted";
  } catch (const loom::Error& e) {
    EXPECT_NE(std::string(e.what()).find("sample 3 comes from source 2"), std::string::npos)
        << e.what();
    EXPECT_NE(std::string(e.what()).find("lying test source"), std::string::npos) << e.what();
  }
  expect_io_error(
      [] {
        loom::data::SyntheticMarkovCorpus c(64, 4, 9, 12, 2, {1, 2, 3});
      },
      "'data.weights' has 3 entries for data.synthetic_sources = 2");
  expect_io_error(
      [] {
        loom::data::SyntheticMarkovCorpus c(64, 4, 9, 12, 2, {0, 0});
      },
      "'data.weights' sum to 0");
  expect_io_error([] { loom::data::SyntheticMarkovCorpus c(64, 4, 9, 12, 0); },
                  "'data.synthetic_sources' must be in [1, 16], got 0");
}

TEST(MicroBatchLoader, PackedRowsHoldTheDocumentsPieces) {
  loom::data::SyntheticMarkovCorpus corpus(64, 4, 9, /*max_document_len=*/12);
  loom::data::LoaderOptions o;
  o.mode = BatchMode::kDocuments;
  o.seq_len = 12;
  o.global_batch = 10;
  o.micro_batch_tokens = 30;
  o.pad_multiple = 4;
  o.prefetch = false;
  loom::data::MicroBatchLoader loader(&corpus, o);
  const auto step = loader.next();
  EXPECT_EQ(loader.position(), 10);
  const auto samples = loader.global_samples(loom::data::Split::kTrain, 0);
  ASSERT_EQ(step.batches.size(), step.plan.micro_batches.size());
  int64_t counted = 0;
  for (size_t m = 0; m < step.batches.size(); ++m) {
    const auto& b = step.batches[m];
    const auto& mb = step.plan.micro_batches[m];
    ASSERT_EQ(b.seq_len(), mb.row_len);
    int64_t at = 0, doc = -1;
    for (const auto& p : mb.rows[0]) {
      std::vector<int64_t> want(static_cast<size_t>(p.tokens + 1));
      corpus.document(loom::data::Split::kTrain, samples[static_cast<size_t>(p.sample)].index,
                      p.begin, p.tokens + 1, want.data());
      for (int64_t t = 0; t < p.tokens; ++t) {
        EXPECT_EQ(b.tokens[0][at + t].item<int64_t>(), want[static_cast<size_t>(t)]);
        EXPECT_EQ(b.targets[0][at + t].item<int64_t>(), want[static_cast<size_t>(t + 1)]);
        EXPECT_EQ(b.position_ids[0][at + t].item<int64_t>(), t);
      }
      EXPECT_NE(b.doc_ids[0][at].item<int64_t>(), doc);
      doc = b.doc_ids[0][at].item<int64_t>();
      at += p.tokens;
    }
    counted += b.num_loss_tokens();
    if (at < mb.row_len) {
      ASSERT_TRUE(b.loss_mask.defined());
      EXPECT_EQ(b.loss_mask.sum().item<double>(), static_cast<double>(at));
    }
  }
  EXPECT_EQ(counted, step.plan.loss_tokens);  // one DP rank: every loss token of the global batch
  // The position is the resumable state, by name.
  auto state = loader.state();
  EXPECT_EQ(state.at("data.consumed_samples"), 10);
  loom::data::MicroBatchLoader again(&corpus, o);
  again.load_state(state);
  const auto a = loader.next(), b = again.next();
  ASSERT_EQ(a.batches.size(), b.batches.size());
  for (size_t m = 0; m < a.batches.size(); ++m)
    EXPECT_TRUE(at::equal(a.batches[m].tokens, b.batches[m].tokens));
  EXPECT_THROW(again.load_state({}), loom::Error);
  // A source without documents cannot run DOCUMENTS mode: a clear error.
  loom::data::LoaderOptions w = o;
  struct WindowsOnly : loom::data::DataSource {
    void sample(loom::data::Split, int64_t, int64_t, int64_t*) const override {}
    int64_t vocab_size() const override { return 2; }
    std::string describe() const override { return "windows-only test source"; }
  } windows_only;
  try {
    loom::data::MicroBatchLoader bad(&windows_only, w);
    ADD_FAILURE() << "a windows-only source was accepted for DOCUMENTS mode";
  } catch (const loom::Error& e) {
    EXPECT_NE(std::string(e.what()).find("windows-only test source"), std::string::npos)
        << e.what();
  }
}

}  // namespace

// [Note: outlier queue]: over 60 steps of a synthetic corpus whose documents are 2..12 tokens with
// 1 in 8 longer (13..48), the long ones wait in the queue: every document read is trained exactly
// once (or still waits at the end), a short one in the step that read it, a long one at most
// outlier_delay steps later, all waiting ones together once outlier_batch wait; the loader's
// state (saved mid-run, restored into a new loader, prefetching) continues with the same steps,
// and a failed step (PositionGuard) puts the queue back.
TEST(Loader, OutlierQueueDelaysLongDocumentsWithoutLosingAny) {
  const loom::data::SyntheticMarkovCorpus corpus(64, 4, 9, /*max_document_len=*/12);
  loom::data::LoaderOptions o;
  o.mode = BatchMode::kDocuments;
  o.seq_len = 12;
  o.global_batch = 8;
  o.micro_batch_tokens = 24;
  o.prefetch = false;
  o.outlier_tokens = 12;
  o.outlier_delay = 3;
  o.outlier_batch = 3;
  loom::data::MicroBatchLoader loader(&corpus, o);
  std::deque<loom::data::MicroBatchLoader::Outlier> queue;
  std::map<int64_t, int> trained;
  int delayed = 0, batched = 0, at_deadline = 0;
  const int steps = 60;
  for (int k = 0; k < steps; ++k) {
    const int64_t first = k * o.global_batch;
    const auto samples = loader.step_samples(first, queue);
    int64_t outliers_here = 0;
    for (const auto& s : samples) {
      ++trained[s.index];
      const bool long_doc = s.length > o.outlier_tokens;
      const int64_t read_step = s.index / o.global_batch;
      if (!long_doc) {
        EXPECT_EQ(read_step, k) << "a short document trained outside the step that read it";
      } else {
        EXPECT_LE(read_step, k);
        EXPECT_LE(k - read_step, o.outlier_delay) << "document " << s.index << " waited too long";
        delayed += k > read_step;
        at_deadline += k - read_step == o.outlier_delay;
        ++outliers_here;
      }
      EXPECT_EQ(s.length, corpus.document_length(loom::data::Split::kTrain, s.index));
    }
    batched += outliers_here >= o.outlier_batch;
    EXPECT_LT(static_cast<int64_t>(queue.size()), o.outlier_batch) << "step " << k;
  }
  // The run's last step takes whatever still waits.
  const auto last = loader.step_samples(steps * o.global_batch, queue, /*take_all=*/true);
  EXPECT_TRUE(queue.empty());
  for (const auto& s : last) {
    if (s.index < steps * o.global_batch) ++trained[s.index];
  }
  ASSERT_EQ(trained.size(), static_cast<size_t>(steps * o.global_batch));
  for (const auto& [index, times] : trained) {
    EXPECT_EQ(times, 1) << "document " << index;
    EXPECT_LT(index, steps * o.global_batch);
  }
  EXPECT_GT(delayed, 5) << "too few outliers delayed to test anything";
  EXPECT_GT(batched, 3) << "too few steps took a batch of outliers";
  EXPECT_GT(at_deadline, 0) << "no outlier was taken for its delay alone";

  // The same steps through next(), with a state saved after step 17 and restored elsewhere.
  auto tokens_of = [](const loom::data::StepData& d) {
    std::vector<at::Tensor> t;
    for (const auto& b : d.batches) t.push_back(b.tokens);
    return at::cat(t, 1);
  };
  o.prefetch = true;
  loom::data::MicroBatchLoader a(&corpus, o);
  std::map<std::string, int64_t> saved;
  std::vector<at::Tensor> after;
  int saved_at = -1;
  for (int k = 0; k < 40; ++k) {
    const auto d = a.next();
    if (saved_at >= 0) after.push_back(tokens_of(d));
    if (saved_at < 0 && k >= 10 && a.state().count("data.outliers") > 0) {
      saved = a.state();  // after a step that left documents waiting
      saved_at = k;
    }
  }
  ASSERT_GE(saved_at, 0) << "the queue was never left holding a document";
  ASSERT_GE(after.size(), 10u);
  loom::data::MicroBatchLoader b(&corpus, o);
  b.load_state(saved);
  for (size_t k = 0; k < after.size(); ++k)
    EXPECT_TRUE(at::equal(tokens_of(b.next()), after[k])) << "step " << saved_at + 1 + k;
  std::map<std::string, int64_t> guard_state;
  {
    const auto before = b.state();
    loom::data::PositionGuard guard(b);
    (void)b.next();
    (void)b.next();
    EXPECT_NE(b.state(), before);
    guard_state = before;  // not committed: a failed step
  }
  EXPECT_EQ(b.state(), guard_state) << "the guard restores the position and the queue";
  // The last step of a run (next(..., last)) empties the queue.
  while (b.state().count("data.outliers") == 0) (void)b.next();
  (void)b.next(true, /*last=*/true);
  EXPECT_EQ(b.state().count("data.outliers"), 0u) << "documents left untrained at the end";
  // A fitted cost model travels with the state (the doubles' bits); a given one does not.
  {
    loom::data::MicroBatchLoader c1(&corpus, o), c2(&corpus, o);
    c1.set_cost(loom::data::CostModel{1.5e-9, 3.25e-5, 0}, /*fitted=*/true);
    c2.set_cost(loom::data::CostModel{7, 7, 0}, /*fitted=*/true);
    c2.load_state(c1.state());
    EXPECT_EQ(c2.options().cost.a, 1.5e-9);
    EXPECT_EQ(c2.options().cost.b, 3.25e-5);
    c1.set_cost(loom::data::CostModel{2, 2, 0}, /*fitted=*/false);
    EXPECT_EQ(c1.state().count("data.hdp_cost.a"), 0u);
  }
  // Over several DP ranks a varying document count needs the hybrid planner.
  {
    loom::config::JobConfig j;
    j.mutable_data()->set_mode(loom::config::DataConfig::DOCUMENTS);
    j.mutable_data()->set_outlier_tokens(12);
    j.mutable_train()->set_seq_len(12);
    j.mutable_train()->set_global_batch_size(8);
    try {
      (void)loom::data::LoaderOptions::from_config(j, 2, 0, 1, at::kCPU);
      ADD_FAILURE() << "the outlier queue over 2 DP ranks without parallel.hdp was accepted";
    } catch (const loom::Error& e) {
      EXPECT_NE(std::string(e.what()).find("parallel.hdp"), std::string::npos) << e.what();
    }
    j.mutable_parallel()->set_hdp(true);
    EXPECT_EQ(loom::data::LoaderOptions::from_config(j, 2, 0, 1, at::kCPU).outlier_tokens, 12);
    // The balance mode (Note: hybrid data parallelism balance modes): pp under pipeline
    // parallelism unless set; bad values, or either field without parallel.hdp, name the field.
    EXPECT_EQ(loom::data::LoaderOptions::from_config(j, 2, 0, 1, at::kCPU).hdp_balance,
              loom::data::HdpBalance::kDp);
    j.mutable_parallel()->set_pp(2);
    const auto pp = loom::data::LoaderOptions::from_config(j, 2, 0, 1, at::kCPU);
    EXPECT_EQ(pp.hdp_balance, loom::data::HdpBalance::kPp);
    EXPECT_EQ(pp.stages, 2);
    EXPECT_EQ(pp.layout().stages, 2);
    EXPECT_EQ(pp.layout().hdp_balance, loom::data::HdpBalance::kPp);
    j.mutable_parallel()->set_hdp_balance("dp");
    EXPECT_EQ(loom::data::LoaderOptions::from_config(j, 2, 0, 1, at::kCPU).hdp_balance,
              loom::data::HdpBalance::kDp);
    auto refused = [&](const loom::config::JobConfig& bad, const std::string& field) {
      try {
        (void)loom::data::LoaderOptions::from_config(bad, 2, 0, 1, at::kCPU);
        ADD_FAILURE() << field << ": accepted";
      } catch (const loom::Error& e) {
        EXPECT_EQ(e.kind(), loom::ErrorKind::kConfig);
        EXPECT_NE(std::string(e.what()).find(field), std::string::npos) << e.what();
      }
    };
    auto bad = j;
    bad.mutable_parallel()->set_hdp_balance("pipeline");
    refused(bad, "parallel.hdp_balance 'pipeline'");
    bad = j;
    bad.mutable_parallel()->set_hdp_ring_gbps(-1);
    refused(bad, "parallel.hdp_ring_gbps");
    bad = j;
    bad.mutable_parallel()->set_hdp(false);
    bad.mutable_data()->set_outlier_tokens(0);
    refused(bad, "parallel.hdp_balance");
    bad.mutable_parallel()->clear_hdp_balance();
    bad.mutable_parallel()->set_hdp_ring_gbps(25);
    refused(bad, "parallel.hdp_ring_gbps");
  }
  // Bad saved queues name the entry.
  auto bad = saved;
  bad["data.outlier.0"] = bad["data.consumed_samples"] + 5;
  try {
    b.check_state(bad);
    ADD_FAILURE() << "a queued document beyond the position was accepted";
  } catch (const loom::Error& e) {
    EXPECT_EQ(e.kind(), loom::ErrorKind::kIO);
    EXPECT_NE(std::string(e.what()).find("data.outlier.0"), std::string::npos) << e.what();
  }
  bad = saved;
  bad.erase("data.outlier.0.read_at");
  try {
    b.check_state(bad);
    ADD_FAILURE() << "a queue entry without its step was accepted";
  } catch (const loom::Error& e) {
    EXPECT_NE(std::string(e.what()).find("is missing"), std::string::npos) << e.what();
  }
}
