#include "loom/data/tokenizer.h"

#include <fmt/format.h>

#include "loom/core/error.h"

#include <spawn.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <mutex>

#include "loom/core/env.h"

extern char** environ;

namespace loom::data {

namespace fs = std::filesystem;

std::vector<int64_t> ByteTokenizer::encode(const std::string& text) const {
  std::vector<int64_t> ids(text.size());
  for (size_t i = 0; i < text.size(); ++i) ids[i] = static_cast<unsigned char>(text[i]);
  return ids;
}

std::string ByteTokenizer::decode(const std::vector<int64_t>& ids) const {
  std::string s;
  for (int64_t id : ids) {
    if (id >= 0 && id < 256) s.push_back(static_cast<char>(id));
  }
  return s;
}

// [Note: SentencePiece in its own process]
// Debian's libsentencepiece carries protobuf 3.14 generated code that aborts at first use in a process
// that has also loaded the system libprotobuf 3.21 (libloom links it for the config). So libloom never
// links libsentencepiece: tools/loom_spm.cpp does, and the tokenizer below starts one such worker per
// concurrent caller (a pool, so preprocess_data's threads encode in parallel) and exchanges
// length-prefixed requests with it over a Unix socket. A worker that dies is reported with its exit
// status and never reused.
namespace {

std::string spm_worker_path() {
  if (auto e = env::get("LOOM_SPM_WORKER")) return *e;
  std::error_code ec;
  const fs::path self = fs::read_symlink("/proc/self/exe", ec);
  if (!ec && fs::exists(self.parent_path() / "loom_spm")) return (self.parent_path() / "loom_spm").string();
#ifdef LOOM_SPM_BUILD_PATH
  if (fs::exists(LOOM_SPM_BUILD_PATH)) return LOOM_SPM_BUILD_PATH;
#endif
#ifdef LOOM_SPM_INSTALL_PATH
  if (fs::exists(LOOM_SPM_INSTALL_PATH)) return LOOM_SPM_INSTALL_PATH;
#endif
  LOOM_THROW(ErrorKind::kUnsupported,
             "SentencePiece needs its worker program 'loom_spm', which this build does not have (install "
             "libsentencepiece-dev and rebuild, or point LOOM_SPM_WORKER at one)");
}

std::string describe_status(int status) {
  if (WIFEXITED(status)) return fmt::format("exit status {}", WEXITSTATUS(status));
  if (WIFSIGNALED(status)) return fmt::format("signal {}", WTERMSIG(status));
  return fmt::format("wait status {}", status);
}

// Starts `exe args...` with its stdin and stdout on one end of a socket pair; returns the other end.
pid_t spawn_on_socket(const std::string& exe, const std::vector<std::string>& args, int* fd) {
  int sv[2];
  LOOM_CHECK_KIND(ErrorKind::kIO, ::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0,
                  "socketpair for the SentencePiece worker: {}", std::strerror(errno));
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_adddup2(&fa, sv[1], 0);
  posix_spawn_file_actions_adddup2(&fa, sv[1], 1);
  std::vector<char*> argv;
  argv.push_back(const_cast<char*>(exe.c_str()));
  for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  pid_t pid = 0;
  const int rc = ::posix_spawn(&pid, exe.c_str(), &fa, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&fa);
  ::close(sv[1]);
  if (rc != 0) {
    ::close(sv[0]);
    LOOM_THROW(ErrorKind::kIO, "cannot start the SentencePiece worker '{}': {}", exe, std::strerror(rc));
  }
  *fd = sv[0];
  return pid;
}

class SpmWorker {
 public:
  SpmWorker(const std::string& exe, const std::string& model) : exe_(exe) {
    pid_ = spawn_on_socket(exe, {"serve", model}, &fd_);
    char magic[4];
    read_exact(magic, 4);
    if (std::memcmp(magic, "LSPE", 4) == 0) {
      std::string msg(read_u32(), '\0');
      read_exact(msg.data(), msg.size());
      LOOM_THROW(ErrorKind::kIO, "cannot load SentencePiece model '{}': {}", model, msg);
    }
    LOOM_CHECK_KIND(ErrorKind::kIO, std::memcmp(magic, "LSPM", 4) == 0 && read_u32() == 1,
                    "the SentencePiece worker '{}' speaks another protocol", exe);
    for (int32_t* v : {&vocab, &eos, &bos, &unk}) *v = static_cast<int32_t>(read_u32());
  }
  ~SpmWorker() {
    ::close(fd_);
    int status = 0;
    ::waitpid(pid_, &status, 0);
  }
  SpmWorker(const SpmWorker&) = delete;
  SpmWorker& operator=(const SpmWorker&) = delete;

  // One request; the payload's reply (after the status word) into `reply`.
  void request(char op, uint32_t n, const void* payload, size_t bytes, std::string* reply, size_t unit) {
    std::string msg(1, op);
    msg.append(reinterpret_cast<const char*>(&n), 4);
    msg.append(static_cast<const char*>(payload), bytes);
    for (size_t off = 0; off < msg.size();) {
      const ssize_t w = ::send(fd_, msg.data() + off, msg.size() - off, MSG_NOSIGNAL);
      if (w <= 0) died("writing to it");
      off += static_cast<size_t>(w);
    }
    const uint32_t status = read_u32(), count = read_u32();
    reply->resize(static_cast<size_t>(count) * (status == 0 ? unit : 1));
    read_exact(reply->data(), reply->size());
    LOOM_CHECK_KIND(ErrorKind::kValue, status == 0, "SentencePiece: {}", *reply);
  }

  int32_t vocab = 0, eos = -1, bos = -1, unk = -1;

 private:
  [[noreturn]] void died(const char* doing) {
    int status = 0;
    std::string how = "still running";
    if (::waitpid(pid_, &status, WNOHANG) == pid_) how = describe_status(status);
    LOOM_THROW(ErrorKind::kIO, "the SentencePiece worker '{}' (pid {}) stopped answering while {} ({})", exe_, pid_,
               doing, how);
  }
  void read_exact(void* buf, size_t n) {
    auto* p = static_cast<char*>(buf);
    while (n > 0) {
      const ssize_t r = ::recv(fd_, p, n, 0);
      if (r <= 0) died("reading its reply");
      p += r;
      n -= static_cast<size_t>(r);
    }
  }
  uint32_t read_u32() {
    uint32_t v = 0;
    read_exact(&v, 4);
    return v;
  }

  std::string exe_;
  pid_t pid_ = -1;
  int fd_ = -1;
};

class SentencePieceTokenizer : public Tokenizer {
 public:
  explicit SentencePieceTokenizer(const std::string& model) : path_(model), exe_(spm_worker_path()) {
    LOOM_CHECK_KIND(ErrorKind::kIO, fs::is_regular_file(model), "SentencePiece model '{}' does not exist", model);
    auto w = std::make_unique<SpmWorker>(exe_, path_);
    vocab_ = w->vocab;
    eod_ = w->eos >= 0 ? w->eos : w->vocab - 1;
    idle_.push_back(std::move(w));
  }
  std::vector<int64_t> encode(const std::string& text) const override {
    std::string reply;
    with_worker([&](SpmWorker& w) {
      w.request('E', static_cast<uint32_t>(text.size()), text.data(), text.size(), &reply, 4);
    });
    std::vector<int64_t> ids(reply.size() / 4);
    for (size_t i = 0; i < ids.size(); ++i) {
      int32_t v = 0;
      std::memcpy(&v, reply.data() + 4 * i, 4);
      ids[i] = v;
    }
    return ids;
  }
  std::string decode(const std::vector<int64_t>& ids) const override {
    std::vector<int32_t> v;
    v.reserve(ids.size());
    for (int64_t id : ids) {
      LOOM_CHECK_KIND(ErrorKind::kValue, id >= 0 && id < vocab_, "SentencePiece decode: id {} is not in [0, {})",
                      id, vocab_);
      v.push_back(static_cast<int32_t>(id));
    }
    std::string reply;
    with_worker([&](SpmWorker& w) {
      w.request('D', static_cast<uint32_t>(v.size()), v.data(), v.size() * 4, &reply, 1);
    });
    return reply;
  }
  int64_t vocab_size() const override { return vocab_; }
  int64_t eod() const override { return eod_; }
  std::string describe() const override {
    return fmt::format("SentencePiece '{}' ({} pieces, end-of-document id {})", path_, vocab_, eod_);
  }

 private:
  template <typename F>
  void with_worker(F&& fn) const {
    std::unique_ptr<SpmWorker> w;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!idle_.empty()) {
        w = std::move(idle_.back());
        idle_.pop_back();
      }
    }
    if (!w) w = std::make_unique<SpmWorker>(exe_, path_);
    try {
      fn(*w);
    } catch (const Error& e) {
      if (e.kind() != ErrorKind::kValue) throw;  // a worker that failed is not reused
      std::lock_guard<std::mutex> lock(mu_);
      idle_.push_back(std::move(w));
      throw;
    }
    std::lock_guard<std::mutex> lock(mu_);
    idle_.push_back(std::move(w));
  }

  std::string path_, exe_;
  int64_t vocab_ = 0, eod_ = 0;
  mutable std::mutex mu_;
  mutable std::vector<std::unique_ptr<SpmWorker>> idle_;
};

}  // namespace

std::unique_ptr<Tokenizer> make_tokenizer(const std::string& kind, const std::string& model) {
  if (kind == "byte") return std::make_unique<ByteTokenizer>();
  if (kind == "sentencepiece") {
    LOOM_CHECK_CONFIG(!model.empty(), "tokenizer 'sentencepiece' needs a model file (--tokenizer-model)");
    return std::make_unique<SentencePieceTokenizer>(model);
  }
  LOOM_THROW(ErrorKind::kConfig, "unknown tokenizer '{}' (byte, sentencepiece)", kind);
}

bool sentencepiece_available() {
  try {
    (void)spm_worker_path();
    return true;
  } catch (const Error&) {
    return false;
  }
}

void train_sentencepiece(const std::vector<std::string>& inputs, const std::string& model_prefix, int vocab_size,
                         const std::string& model_type, int threads) {
  LOOM_CHECK_CONFIG(!inputs.empty(), "train_tokenizer: no input files");
  LOOM_CHECK_CONFIG(model_type == "bpe" || model_type == "unigram", "model type must be bpe or unigram, got '{}'",
                    model_type);
  std::string files;
  for (const auto& f : inputs) {
    LOOM_CHECK_KIND(ErrorKind::kIO, fs::is_regular_file(f), "train_tokenizer: input '{}' does not exist", f);
    files += (files.empty() ? "" : ",") + f;
  }
  const std::string args = fmt::format(
      "--input={} --model_prefix={} --vocab_size={} --model_type={} --num_threads={} "
      "--character_coverage=1.0 --byte_fallback=true --pad_id=-1 --bos_id=-1 --eos_id=1 --unk_id=0 "
      "--input_sentence_size=2000000 --shuffle_input_sentence=true --minloglevel=2",
      files, model_prefix, vocab_size, model_type, threads);
  const std::string exe = spm_worker_path();
  int fd = -1;
  const pid_t pid = spawn_on_socket(exe, {"train", args}, &fd);
  ::close(fd);
  int status = 0;
  ::waitpid(pid, &status, 0);
  LOOM_CHECK_KIND(ErrorKind::kIO, WIFEXITED(status) && WEXITSTATUS(status) == 0,
                  "SentencePiece training ({} train ...) failed: {} (its message is above)", exe,
                  describe_status(status));
}

}  // namespace loom::data
