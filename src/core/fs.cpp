#include "loom/core/fs.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <random>

#include "loom/core/error.h"

namespace loom {

namespace {
std::string parent_of(const std::string& path) {
  const std::filesystem::path p = std::filesystem::path(path).parent_path();
  return p.empty() ? "." : p.string();
}
}  // namespace

// A name no other writer uses: host, process and random bits (ranks in separate containers can
// share a pid, and a shared filesystem sees them all).
std::string temp_suffix() {
  char host[64] = {0};
  ::gethostname(host, sizeof(host) - 1);
  std::random_device rd;
  return fmt::format(".tmp-{}-{}-{:08x}", host, ::getpid(), rd());
}

AtomicFile::AtomicFile(std::string path) : path_(std::move(path)), tmp_(path_ + temp_suffix()) {
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
