#include "loom/core/fs.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <signal.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <random>

#include "loom/core/error.h"
#include "loom/core/logging.h"

namespace loom {

namespace {
std::string parent_of(const std::string& path) {
  const std::filesystem::path p = std::filesystem::path(path).parent_path();
  return p.empty() ? "." : p.string();
}

std::string this_host() {
  char host[64] = {0};
  ::gethostname(host, sizeof(host) - 1);
  return host;
}
}  // namespace

// A name no other writer uses: host, process and random bits (ranks in separate containers can
// share a pid, and a shared filesystem sees them all).
std::string temp_suffix() {
  std::random_device rd;
  return fmt::format(".tmp-{}-{}-{:08x}", this_host(), ::getpid(), rd());
}

int remove_stale_temporaries(const std::string& path, double min_age_s) {
  namespace fs = std::filesystem;
  const fs::path target(path);
  const std::string prefix = target.filename().string() + ".tmp-" + this_host() + "-";
  int removed = 0;
  std::error_code ec;
  fs::directory_iterator it(parent_of(path), ec);
  if (ec) return 0;
  for (const auto& entry : it) {
    const std::string name = entry.path().filename().string();
    if (name.rfind(prefix, 0) != 0) continue;
    // <prefix><pid>-<random>: the writer must be gone (no such process here) and the file idle.
    const std::string rest = name.substr(prefix.size());
    const size_t dash = rest.find('-');
    if (dash == std::string::npos || dash == 0) continue;
    long pid = 0;
    try {
      size_t used = 0;
      pid = std::stol(rest.substr(0, dash), &used);
      if (used != dash || pid <= 0) continue;
    } catch (const std::exception&) {
      continue;
    }
    if (::kill(static_cast<pid_t>(pid), 0) == 0 || errno != ESRCH) continue;  // alive, or unknown
    const auto mtime = fs::last_write_time(entry.path(), ec);
    if (ec) continue;
    const double age =
        std::chrono::duration<double>(fs::file_time_type::clock::now() - mtime).count();
    if (age < min_age_s) continue;
    if (fs::remove(entry.path(), ec) && !ec) {
      ++removed;
      LOOM_LOG_WARN(
          "removed '{}': the temporary file of a writer (pid {}) that ended without "
          "finishing it, idle for {:.0f} s",
          entry.path().string(), pid, age);
    }
  }
  return removed;
}

AtomicFile::AtomicFile(std::string path) : path_(std::move(path)), tmp_(path_ + temp_suffix()) {
  remove_stale_temporaries(path_);
  fd_ = ::open(tmp_.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  LOOM_CHECK_KIND(ErrorKind::kIO, fd_ >= 0, "cannot open '{}' for writing: {}", tmp_,
                  std::strerror(errno));
}

AtomicFile::~AtomicFile() {
  if (fd_ >= 0) ::close(fd_);
  if (!committed_) ::unlink(tmp_.c_str());
}

void AtomicFile::write(const void* data, size_t size) {
  LOOM_CHECK(fd_ >= 0, "AtomicFile '{}': write after sync or commit", path_);
  const char* p = static_cast<const char*>(data);
  while (size > 0) {
    const ssize_t n = ::write(fd_, p, size);
    if (n < 0 && errno == EINTR) continue;
    LOOM_CHECK_KIND(ErrorKind::kIO, n > 0, "writing '{}' failed: {}", tmp_,
                    n < 0 ? std::strerror(errno) : "no progress");
    p += n;
    size -= static_cast<size_t>(n);
  }
}

void AtomicFile::sync() {
  if (synced_) return;
  LOOM_CHECK(fd_ >= 0, "AtomicFile '{}': synced after commit", path_);
  const bool ok = ::fsync(fd_) == 0;
  const int sync_errno = errno;
  const bool closed = ::close(fd_) == 0;
  fd_ = -1;
  LOOM_CHECK_KIND(ErrorKind::kIO, ok && closed, "writing '{}' failed at {}: {}", tmp_,
                  ok ? "close" : "fsync", std::strerror(ok ? errno : sync_errno));
  synced_ = true;
}

void AtomicFile::commit() {
  LOOM_CHECK(!committed_, "AtomicFile '{}': committed twice", path_);
  sync();
  LOOM_CHECK_KIND(ErrorKind::kIO, ::rename(tmp_.c_str(), path_.c_str()) == 0,
                  "cannot rename '{}' to '{}': {}", tmp_, path_, std::strerror(errno));
  committed_ = true;
  fsync_directory(parent_of(path_));
}

void fsync_directory(const std::string& dir) {
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  LOOM_CHECK_KIND(ErrorKind::kIO, fd >= 0, "cannot open directory '{}' to sync it: {}", dir,
                  std::strerror(errno));
  const bool ok = ::fsync(fd) == 0 || errno == EINVAL;  // EINVAL: a filesystem without dir fsync
  const int e = errno;
  ::close(fd);
  LOOM_CHECK_KIND(ErrorKind::kIO, ok, "fsync of directory '{}' failed: {}", dir, std::strerror(e));
}

void rename_durably(const std::string& from, const std::string& to) {
  LOOM_CHECK_KIND(ErrorKind::kIO, ::rename(from.c_str(), to.c_str()) == 0,
                  "cannot rename '{}' to '{}': {}", from, to, std::strerror(errno));
  fsync_directory(parent_of(to));
}

}  // namespace loom
