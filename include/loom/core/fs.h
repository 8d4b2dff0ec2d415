// Durable file writes: what a checkpoint, a dataset or a cache needs so that a crash or a full disk
// never leaves a half-written file under the final name, and a finished write survives a power
// loss (data and directory entry fsynced).
#pragma once

#include <cstddef>
#include <string>

namespace loom {

// Removes this host's temporary files of `path` (`<path>.tmp-<this host>-<pid>-*`) whose writer
// process no longer exists and that were not modified for `min_age_s`: what a killed run (SIGKILL,
// a crash, a lost node) left behind. Each removal is logged; returns how many. AtomicFile calls it
// before writing. Temporary files of other hosts, live processes or recent writes are left alone
// (a pid from another container on this host may look dead: the age check guards those).
int remove_stale_temporaries(const std::string& path, double min_age_s = 600);

// A file written under `<path>.tmp-<host>-<pid>-<random>` (created exclusively) and renamed to
// `path` by commit(), after an fsync of the file and then of its directory. Destroyed without
// commit() (an error on the way), the temporary file is removed and `path` is untouched. kIO errors
// name the file and the reason (errno).
class AtomicFile {
 public:
  explicit AtomicFile(std::string path);
  ~AtomicFile();
  AtomicFile(const AtomicFile&) = delete;
  AtomicFile& operator=(const AtomicFile&) = delete;

  void write(const void* data, size_t size);
  // fsync and close the temporary file (no more writes); commit() then only renames. Lets two files
  // be made durable before either is renamed into place.
  void sync();
  void commit();
  const std::string& path() const { return path_; }
  const std::string& temp_path() const { return tmp_; }

 private:
  std::string path_, tmp_;
  int fd_ = -1;
  bool synced_ = false, committed_ = false;
};

// fsync of a directory, so that entries created or renamed in it are on disk. kIO error on failure.
void fsync_directory(const std::string& dir);

// Renames `from` to `to` (atomic on one filesystem; `to` must not be a non-empty directory) and
// fsyncs the parent directory of `to`. kIO error naming both on failure.
void rename_durably(const std::string& from, const std::string& to);

}  // namespace loom
