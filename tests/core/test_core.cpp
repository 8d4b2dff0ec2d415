// core/: errors, config (text format + overrides + validation), command line, environment, timers,
// logging. Single process.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <thread>

#include "loom/core/cli.h"
#include "loom/core/config.h"
#include "loom/core/crc32c.h"
#include "loom/core/env.h"
#include "loom/core/error.h"
#include "loom/core/fs.h"
#include "loom/core/logging.h"
#include "loom/core/timer.h"

namespace fs = std::filesystem;

namespace {

std::string write_temp(const std::string& name, const std::string& text) {
  fs::path p = fs::temp_directory_path() / ("loom_test_" + std::to_string(::getpid()) + "_" + name);
  std::ofstream(p) << text;
  return p.string();
}

// Runs fn, expects a loom::Error of `kind` whose message contains every needle.
template <typename Fn>
void expect_error(Fn fn, loom::ErrorKind kind, std::vector<std::string> needles) {
  try {
    fn();
    ADD_FAILURE() << "no error thrown";
  } catch (const loom::Error& e) {
    EXPECT_EQ(e.kind(), kind) << e.what();
    for (const auto& n : needles) {
      EXPECT_NE(std::string(e.what()).find(n), std::string::npos)
          << "missing '" << n << "' in: " << e.what();
    }
  }
}

}  // namespace

TEST(Error, CarriesLocationRankAndKind) {
  loom::set_process_rank(3);
  try {
    int x = 5;
    LOOM_CHECK(x < 2, "x is {}", x);
    FAIL();
  } catch (const loom::Error& e) {
    std::string what = e.what();
    EXPECT_NE(what.find("[rank 3]"), std::string::npos) << what;
    EXPECT_NE(what.find("tests/core/test_core.cpp:"), std::string::npos) << what;
    EXPECT_NE(what.find("x is 5"), std::string::npos) << what;
    EXPECT_NE(what.find("[x < 2]"), std::string::npos) << what;
    EXPECT_EQ(e.kind(), loom::ErrorKind::kValue);
    EXPECT_EQ(e.rank(), 3);
    EXPECT_EQ(e.message(), "x is 5 [x < 2]");
  }
  loom::set_process_rank(-1);
}

TEST(Config, ParsesTextFormatWithDefaults) {
  std::string path = write_temp("ok.pbtxt", R"(
    name: "tiny"
    parallel { tp: 2 pp: 2 order: "tp-cp-ep-dp-pp" }
    comm { timeout_s: 30 }
  )");
  loom::config::JobConfig c = loom::config::load_job_config(path, {});
  EXPECT_EQ(c.name(), "tiny");
  EXPECT_EQ(c.parallel().tp(), 2);
  EXPECT_EQ(c.parallel().pp(), 2);
  EXPECT_EQ(c.parallel().cp(), 1);  // default
  EXPECT_EQ(c.parallel().dp(), 0);  // derive
  EXPECT_EQ(c.comm().timeout_s(), 30);
  EXPECT_EQ(c.logging().level(), "info");
  fs::remove(path);
}

TEST(Config, OverridesApplyInOrder) {
  loom::config::JobConfig c =
      loom::config::load_job_config("", {"parallel.tp=4", "parallel.tp=8", "comm.backend=MPI",
                                         "logging.all_ranks_to_console=true", "name=\"quoted\"",
                                         "seed=0x10", "comm.timeout_s=2.5"});
  EXPECT_EQ(c.parallel().tp(), 8);
  EXPECT_EQ(c.comm().backend(), loom::config::CommConfig::MPI);
  EXPECT_TRUE(c.logging().all_ranks_to_console());
  EXPECT_EQ(c.name(), "quoted");
  EXPECT_EQ(c.seed(), 16u);
  EXPECT_DOUBLE_EQ(c.comm().timeout_s(), 2.5);
}

TEST(Config, UnknownFieldInFileNamesLineAndField) {
  std::string path = write_temp("unknown.pbtxt", "name: \"x\"\nparallel {\n  tpp: 2\n}\n");
  expect_error([&] { loom::config::load_job_config(path, {}); }, loom::ErrorKind::kConfig,
               {path, ":3:", "tpp"});
  fs::remove(path);
}

TEST(Config, WrongValueTypeInFile) {
  std::string path = write_temp("type.pbtxt", "parallel { tp: \"two\" }\n");
  expect_error([&] { loom::config::load_job_config(path, {}); }, loom::ErrorKind::kConfig,
               {path, ":1:", "Expected integer", "(in: parallel { tp: \"two\" })"});
  fs::remove(path);
}

// Issue 15: an empty file trained the built-in defaults and a field given twice kept the last,
// both silently.
TEST(Config, EmptyFilesAndRepeatedFieldsAreRefused) {
  for (const char* text : {"", "\n  \n", "# only a comment\n"}) {
    std::string path = write_temp("empty.pbtxt", text);
    expect_error([&] { loom::config::load_job_config(path, {}); }, loom::ErrorKind::kConfig,
                 {path, "sets no field"});
    fs::remove(path);
  }
  std::string path = write_temp("twice.pbtxt", "train {\n  steps: 5\n  steps: 7\n}\n");
  expect_error([&] { loom::config::load_job_config(path, {}); }, loom::ErrorKind::kConfig,
               {path, ":3:", "steps", "specified multiple times"});
  fs::remove(path);
  path = write_temp("twice_section.pbtxt", "train { steps: 5 }\ntrain { seq_len: 8 }\n");
  expect_error([&] { loom::config::load_job_config(path, {}); }, loom::ErrorKind::kConfig,
               {path, ":2:", "train", "specified multiple times"});
  fs::remove(path);
  // Repeated fields may repeat; overrides still replace.
  path = write_temp("repeated.pbtxt", "data { paths: \"a\" paths: \"b\" }\n");
  const auto c = loom::config::load_job_config(path, {"train.steps=3"});
  EXPECT_EQ(c.data().paths_size(), 2);
  EXPECT_EQ(c.train().steps(), 3);
  fs::remove(path);
}

// differences(): every changed field under the paths, by its dotted path and both values; the
// resume check refuses them by name unless allowed (Note: resume config check).
TEST(Config, DifferencesAndTheResumeCheck) {
  loom::config::JobConfig a = loom::config::load_job_config("", {});
  loom::config::JobConfig b = loom::config::load_job_config(
      "", {"model.rope_theta=500000", "optim.lr=0.01", "data.paths=x,y", "parallel.tp=2",
           "model.recompute=FULL"});
  auto d = loom::config::differences(a, b, {"model", "optim.lr", "data", "parallel.tp"});
  ASSERT_EQ(d.size(), 5u);
  EXPECT_EQ(d[0].path, "model.rope_theta");
  EXPECT_EQ(d[0].before, "10000");
  EXPECT_EQ(d[0].after, "500000");
  EXPECT_EQ(d[1].path, "model.recompute");
  EXPECT_EQ(d[2].path, "optim.lr");
  EXPECT_EQ(d[3].path, "data.paths");
  EXPECT_EQ(d[3].after, "[\"x\", \"y\"]");
  EXPECT_EQ(d[4].path, "parallel.tp");
  EXPECT_TRUE(loom::config::differences(a, a, {"model", "optim", "data"}).empty());
  EXPECT_EQ(loom::config::differences(a, b, {"model"}, {"model.rope_theta"}).size(), 1u);
  expect_error([&] { loom::config::differences(a, b, {"model.rope"}); }, loom::ErrorKind::kConfig,
               {"'model.rope' names no field", "rope_theta"});
  // The resume check: parallel and recompute may change; the rest is named.
  expect_error(
      [&] { loom::config::check_resume_config(a, b, "ck"); }, loom::ErrorKind::kConfig,
      {"checkpoint 'ck'", "3 field(s)", "model.rope_theta: 10000 in the checkpoint, 500000",
       "optim.lr", "data.paths", "train.allow_config_changes"});
  b.mutable_train()->add_allow_config_changes("model.rope_theta");
  b.mutable_train()->add_allow_config_changes("optim");
  b.mutable_train()->add_allow_config_changes("data.paths");
  loom::config::check_resume_config(a, b, "ck");  // all allowed
  expect_error([] { loom::config::load_job_config("", {"train.allow_config_changes=optim.lrr"}); },
               loom::ErrorKind::kConfig, {"train.allow_config_changes", "no 'lrr'"});
}

TEST(Config, MissingFileIsAnIOError) {
  expect_error([] { loom::config::load_job_config("/nonexistent/dir/job.pbtxt", {}); },
               loom::ErrorKind::kIO, {"/nonexistent/dir/job.pbtxt", "cannot open"});
}

TEST(Config, BadOverridesNameTheFieldAndReason) {
  using K = loom::ErrorKind;
  expect_error([] { loom::config::load_job_config("", {"parallel.tpp=2"}); }, K::kConfig,
               {"no field 'parallel.tpp'", "loom.config.ParallelConfig", "fields: tp, cp"});
  expect_error([] { loom::config::load_job_config("", {"parallel.tp=two"}); }, K::kConfig,
               {"field 'parallel.tp' expects an int32, got 'two'"});
  expect_error([] { loom::config::load_job_config("", {"parallel.tp=99999999999"}); }, K::kConfig,
               {"expects an int32"});
  expect_error([] { loom::config::load_job_config("", {"seed=-1"}); }, K::kConfig,
               {"field 'seed' expects a uint64"});
  expect_error([] { loom::config::load_job_config("", {"comm.backend=GLOO"}); }, K::kConfig,
               {"expects one of AUTO, MPI, NCCL, got 'GLOO'"});
  expect_error([] { loom::config::load_job_config("", {"logging.all_ranks_to_console=maybe"}); },
               K::kConfig, {"expects a bool"});
  expect_error([] { loom::config::load_job_config("", {"parallel=3"}); }, K::kConfig,
               {"is a message"});
  expect_error([] { loom::config::load_job_config("", {"name.x=3"}); }, K::kConfig,
               {"field 'name' is a string, it has no sub-field 'x'"});
  expect_error([] { loom::config::load_job_config("", {"parallel.tp"}); }, K::kConfig,
               {"not of the form a.b.c=value"});
}

TEST(Config, ValidationNamesTheField) {
  using K = loom::ErrorKind;
  expect_error([] { loom::config::load_job_config("", {"parallel.tp=0"}); }, K::kConfig,
               {"'parallel.tp' must be >= 1, got 0"});
  expect_error([] { loom::config::load_job_config("", {"comm.timeout_s=0"}); }, K::kConfig,
               {"'comm.timeout_s' must be > 0"});
  expect_error([] { loom::config::load_job_config("", {"logging.level=loud"}); }, K::kConfig,
               {"'logging.level'", "unknown log level 'loud'"});
  expect_error([] { loom::config::load_job_config("", {"version=7"}); }, K::kConfig,
               {"'version' is 7"});
}

TEST(Config, TextRoundTrip) {
  loom::config::JobConfig c = loom::config::load_job_config("", {"parallel.tp=2", "name=rt"});
  loom::config::JobConfig d;
  loom::config::parse_text(loom::config::to_text(c), "roundtrip", &d);
  EXPECT_EQ(c.SerializeAsString(), d.SerializeAsString());
}

TEST(CommandLine, ParsesConfigSetAndFlags) {
  const char* argv[] = {"prog",         "--config", "a.pbtxt", "--set",           "parallel.tp=2",
                        "--set=seed=3", "--iters",  "5",       "--max-bytes=64M", "--verbose"};
  loom::cli::CommandLine cl(10, argv,
                            {{"iters", "10", "iterations"},
                             {"max-bytes", "1M", "largest size"},
                             {"verbose", "false", "chatty", true}},
                            "test program");
  EXPECT_EQ(cl.config_path(), "a.pbtxt");
  EXPECT_EQ(cl.overrides(), (std::vector<std::string>{"parallel.tp=2", "seed=3"}));
  EXPECT_EQ(cl.get_int("iters"), 5);
  EXPECT_EQ(cl.get_bytes("max-bytes"), 64LL << 20);
  EXPECT_TRUE(cl.get_bool("verbose"));
  EXPECT_FALSE(cl.help_requested());
  EXPECT_NE(cl.usage().find("--max-bytes"), std::string::npos);
}

TEST(CommandLine, BadArgumentsAreNamed) {
  using K = loom::ErrorKind;
  const char* unknown[] = {"prog", "--nope", "1"};
  expect_error(
      [&] {
        loom::cli::CommandLine(3, unknown, {{"iters", "1", ""}}, "");
      },
      K::kConfig, {"unknown flag --nope", "--iters"});
  const char* missing[] = {"prog", "--iters"};
  expect_error(
      [&] {
        loom::cli::CommandLine(2, missing, {{"iters", "1", ""}}, "");
      },
      K::kConfig, {"flag --iters needs a value"});
  const char* bad_int[] = {"prog", "--iters", "ten"};
  loom::cli::CommandLine cl(3, bad_int, {{"iters", "1", ""}}, "");
  expect_error([&] { cl.get_int("iters"); }, K::kConfig, {"--iters expects an integer, got 'ten'"});
  const char* stray[] = {"prog", "file.txt"};
  expect_error([&] { loom::cli::CommandLine(2, stray, {}, ""); }, K::kConfig,
               {"unexpected argument 'file.txt'"});
}

TEST(Env, ParsesAndRefusesBadValues) {
  ::setenv("LOOM_TEST_INT", "42", 1);
  ::setenv("LOOM_TEST_BAD", "4x2", 1);
  ::setenv("LOOM_TEST_BOOL", "yes", 1);
  EXPECT_EQ(loom::env::get_int("LOOM_TEST_INT", 0), 42);
  EXPECT_EQ(loom::env::get_int("LOOM_TEST_UNSET_VAR", 7), 7);
  EXPECT_TRUE(loom::env::get_bool("LOOM_TEST_BOOL", false));
  expect_error([] { loom::env::get_int("LOOM_TEST_BAD", 0); }, loom::ErrorKind::kConfig,
               {"LOOM_TEST_BAD='4x2' is not an integer"});
  EXPECT_EQ(loom::env::first_int({"LOOM_TEST_UNSET_VAR", "LOOM_TEST_INT"}).value(), 42);
}

TEST(Timers, AccumulateAndRefuseMisuse) {
  loom::Timers t;
  t.start("a");
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  t.stop("a");
  t.start("a");
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  t.stop("a");
  EXPECT_GE(t.elapsed("a"), 0.035);
  EXPECT_LT(t.elapsed("a"), 5.0);
  EXPECT_EQ(t.count("a"), 2);
  EXPECT_EQ(t.elapsed("never"), 0.0);
  expect_error([&] { t.stop("a"); }, loom::ErrorKind::kValue,
               {"timer 'a' stopped but not running"});
  t.start("b");
  expect_error([&] { t.start("b"); }, loom::ErrorKind::kValue, {"timer 'b' started twice"});
  { loom::ScopedTimer s(t, "c"); }
  EXPECT_EQ(t.count("c"), 1);
  t.reset();
  EXPECT_EQ(t.count("a"), 0);
}

TEST(Logging, EveryRankWritesItsOwnFileWithItsCoordinates) {
  fs::path dir = fs::temp_directory_path() / ("loom_log_" + std::to_string(::getpid()));
  ::unsetenv("LOOM_LOG_DIR");
  loom::log::LogOptions o;
  o.dir = dir.string();
  o.rank = 5;
  o.world_size = 8;
  loom::log::init(o);
  loom::log::set_coordinates("tp1 cp0 dp2 pp0");
  LOOM_LOG_INFO("hello {}", 42);
  LOOM_LOG_DEBUG("hidden at info level");
  loom::log::logger().flush();
  EXPECT_EQ(loom::log::log_file(), (dir / "rank-5.log").string());
  std::ifstream in(dir / "rank-5.log");
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  EXPECT_NE(text.find("[r5 tp1 cp0 dp2 pp0] hello 42"), std::string::npos) << text;
  EXPECT_EQ(text.find("hidden"), std::string::npos) << text;
  expect_error([] { loom::log::parse_level("loud"); }, loom::ErrorKind::kConfig,
               {"unknown log level 'loud'"});
  fs::remove_all(dir);
}

// CRC-32C against the published check values (RFC 3720 B.4 and the CRC catalogue), on both the
// dispatched (hardware where available) and the table-driven path; and the two paths against each
// other on every length and alignment up to 80 bytes, chained and in one piece.
TEST(Crc32c, KnownVectorsAndBothPathsAgree) {
  for (auto f : {&loom::crc32c, &loom::crc32c_portable}) {
    EXPECT_EQ(f("123456789", 9, 0), 0xE3069283u);
    std::string zeros(32, '\0'), ones(32, '\xff'), inc(32, '\0');
    for (int i = 0; i < 32; ++i) inc[i] = static_cast<char>(i);
    EXPECT_EQ(f(zeros.data(), 32, 0), 0x8A9136AAu);
    EXPECT_EQ(f(ones.data(), 32, 0), 0x62A8AB43u);
    EXPECT_EQ(f(inc.data(), 32, 0), 0x46DD794Eu);
    EXPECT_EQ(f(nullptr, 0, 0), 0u);
  }
  std::string bytes(96, '\0');
  uint64_t x = 12345;
  for (auto& b : bytes) b = static_cast<char>((x = x * 6364136223846793005ull + 1) >> 56);
  for (size_t offset = 0; offset < 8; ++offset) {
    for (size_t n = 0; n <= 80; ++n) {
      const char* p = bytes.data() + offset;
      const uint32_t ref = loom::crc32c_portable(p, n);
      ASSERT_EQ(loom::crc32c(p, n), ref) << "offset " << offset << " length " << n;
      ASSERT_EQ(loom::crc32c(p + n / 3, n - n / 3, loom::crc32c(p, n / 3)), ref);
    }
  }
}

// A killed writer's temporary file is removed by the next write of the same file; a live writer's,
// another host's, a recent one and other files are left alone (issue 15: a killed preprocess_data
// left its temporaries behind).
TEST(AtomicFile, StaleTemporariesOfDeadWritersAreRemoved) {
  namespace fs = std::filesystem;
  const fs::path dir = fs::temp_directory_path() / ("loom-test-stale-" + std::to_string(getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  char host[64] = {0};
  ::gethostname(host, sizeof(host) - 1);
  const pid_t child = fork();  // a pid that certainly ended
  if (child == 0) _exit(0);
  waitpid(child, nullptr, 0);
  const std::string target = (dir / "data.idx").string();
  auto make = [&](const std::string& name, bool old) {
    const fs::path p = dir / name;
    std::ofstream(p) << "partial";
    if (old) fs::last_write_time(p, fs::file_time_type::clock::now() - std::chrono::hours(2));
    return p;
  };
  const std::string me = "data.idx.tmp-" + std::string(host) + "-";
  const auto stale = make(me + std::to_string(child) + "-0000beef", true);
  const auto recent = make(me + std::to_string(child) + "-0000cafe", false);
  const auto live = make(me + std::to_string(getpid()) + "-0000f00d", true);
  const auto other_host =
      make("data.idx.tmp-elsewhere-" + std::to_string(child) + "-00000001", true);
  const auto other_file =
      make("data.bin.tmp-" + std::string(host) + "-" + std::to_string(child) + "-00000002", true);
  {
    loom::AtomicFile f(target);
    f.write("x", 1);
    f.commit();
  }
  EXPECT_FALSE(fs::exists(stale));
  EXPECT_TRUE(fs::exists(recent));
  EXPECT_TRUE(fs::exists(live));
  EXPECT_TRUE(fs::exists(other_host));
  EXPECT_TRUE(fs::exists(other_file));
  EXPECT_TRUE(fs::exists(target));
  fs::remove_all(dir);
}
