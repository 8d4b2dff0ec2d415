#include "loom/checkpoint/checkpoint.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <vector>

#include "loom/checkpoint/safetensors.h"
#include "loom/core/config.h"
#include "loom/core/error.h"
#include "loom/core/fs.h"
#include "loom/core/logging.h"
#include "loom/core/timer.h"

namespace loom::checkpoint {

namespace fs = std::filesystem;

namespace {
// A checkpoint directory's entry: step-<8 digits>, with ".tmp" (a write in progress or interrupted)
// or ".old" (the copy a replacement set aside) after it.
struct Entry {
  int64_t step = -1;
  std::string suffix;  // "", ".tmp" or ".old"
  fs::path path;
  bool complete = false;  // holds state.safetensors (written last)
};

Entry parse_entry(const fs::path& path) {
  Entry e;
  std::string name = path.filename().string();
  for (const char* suffix : {".tmp", ".old"}) {
    const size_t n = std::strlen(suffix);
    if (name.size() > n && name.compare(name.size() - n, n, suffix) == 0) {
      e.suffix = suffix;
      name.resize(name.size() - n);
    }
  }
  if (name.size() != 13 || name.rfind("step-", 0) != 0) return e;
  int64_t v = 0;
  for (size_t i = 5; i < name.size(); ++i) {
    if (name[i] < '0' || name[i] > '9') return e;
    v = v * 10 + (name[i] - '0');
  }
  std::error_code ec;
  if (!fs::is_directory(path, ec)) return e;
  e.step = v;
  e.path = path;
  e.complete = fs::exists(path / "state.safetensors", ec);
  return e;
}

// Every step entry under root, by step (then suffix).
std::vector<Entry> scan(const std::string& root) {
  std::vector<Entry> out;
  std::error_code ec;
  if (!fs::is_directory(root, ec)) return out;
  for (fs::directory_iterator it(root, ec), end; !ec && it != end; it.increment(ec)) {
    Entry e = parse_entry(it->path());
    if (e.step >= 0) out.push_back(std::move(e));
  }
  std::sort(out.begin(), out.end(), [](const Entry& a, const Entry& b) {
    return a.step != b.step ? a.step < b.step : a.suffix < b.suffix;
  });
  return out;
}

// The usable checkpoint of each step: step-N when complete, else a complete step-N.old (a
// replacement interrupted between its two renames).
std::vector<std::pair<int64_t, fs::path>> complete_checkpoints(const std::string& root) {
  std::vector<std::pair<int64_t, fs::path>> out;
  for (const Entry& e : scan(root)) {
    if (!e.complete || e.suffix == ".tmp") continue;
    if (!out.empty() && out.back().first == e.step) continue;  // step-N before step-N.old
    out.emplace_back(e.step, e.path);
  }
  return out;
}

std::string why_unusable(const Entry& e) {
  if (e.suffix == ".tmp") return "a write that did not finish";
  return "incomplete: no state.safetensors (a write that did not finish or a partial copy)";
}
}  // namespace

void write_checkpoint(const std::string& dir, const CheckpointData& data) {
  std::error_code ec;
  const fs::path final_dir(dir);
  const fs::path tmp(dir + ".tmp"), old(dir + ".old");
  fs::remove_all(tmp, ec);
  fs::create_directories(tmp, ec);
  LOOM_CHECK_KIND(ErrorKind::kIO, !ec, "cannot create '{}': {}", tmp.string(), ec.message());
  save_safetensors((tmp / "model.safetensors").string(), data.model);
  // Written last: its presence marks the checkpoint complete.
  save_safetensors((tmp / "state.safetensors").string(), data.state, data.metadata);
  fsync_directory(tmp.string());
  // An existing copy is set aside, not deleted, until the new one is in place (a crash in between
  // leaves `<dir>.old`, which latest_checkpoint() puts back).
  const bool replacing = fs::exists(final_dir, ec);
  if (replacing) {
    if (fs::exists(old / "state.safetensors", ec) &&
        !fs::exists(final_dir / "state.safetensors", ec)) {
      fs::remove_all(final_dir, ec);  // a partial step-N beside a complete step-N.old: keep .old
    } else {
      fs::remove_all(old, ec);
      rename_durably(final_dir.string(), old.string());
    }
  }
  rename_durably(tmp.string(), final_dir.string());
  if (replacing) fs::remove_all(old, ec);
}

std::string checkpoint_path(const std::string& root, int64_t step) {
  return (fs::path(root) / fmt::format("step-{:08d}", step)).string();
}

std::string save_checkpoint(const std::string& root, int64_t step, const CheckpointData& data,
                            int keep) {
  std::error_code ec;
  fs::create_directories(root, ec);
  LOOM_CHECK_KIND(ErrorKind::kIO, !ec, "cannot create checkpoint directory '{}': {}", root,
                  ec.message());
  const fs::path final_dir = checkpoint_path(root, step);
  write_checkpoint(final_dir.string(), data);
  set_aside_newer(root, step);  // another branch's: steps only grow along a run's lineage
  if (keep > 0) {
    auto all = complete_checkpoints(root);
    for (size_t i = 0; i + static_cast<size_t>(keep) < all.size(); ++i)
      fs::remove_all(all[i].second, ec);
  }
  return final_dir.string();
}

std::optional<std::string> latest_checkpoint(const std::string& root) {
  auto all = complete_checkpoints(root);
  const int64_t chosen = all.empty() ? -1 : all.back().first;
  for (const Entry& e : scan(root)) {  // say why anything newer was passed over
    if (e.step > chosen && !(e.complete && e.suffix != ".tmp")) {
      LOOM_LOG_WARN("checkpoint '{}' is skipped: {}", e.path.string(), why_unusable(e));
    }
  }
  if (all.empty()) return std::nullopt;
  if (all.back().second.extension() == ".old") {
    LOOM_LOG_WARN(
        "checkpoint '{}' is the surviving copy of step {} (its replacement did not "
        "finish)",
        all.back().second.string(), chosen);
  }
  return all.back().second.string();
}

std::vector<std::string> set_aside_newer(const std::string& root, int64_t step) {
  std::vector<std::string> moved;
  std::vector<Entry> newer;
  for (Entry& e : scan(root)) {
    if (e.step > step) newer.push_back(std::move(e));
  }
  if (newer.empty()) return moved;
  const std::string stamp = utc_stamp();
  fs::path aside = fs::path(root) / fmt::format("abandoned-{}-after-step-{}", stamp, step);
  std::error_code ec;
  for (int k = 2; fs::exists(aside, ec); ++k) {
    aside = fs::path(root) / fmt::format("abandoned-{}-after-step-{}-{}", stamp, step, k);
  }
  fs::create_directories(aside, ec);
  LOOM_CHECK_KIND(ErrorKind::kIO, !ec, "cannot create '{}': {}", aside.string(), ec.message());
  for (const Entry& e : newer) {
    rename_durably(e.path.string(), (aside / e.path.filename()).string());
    moved.push_back(e.path.filename().string());
  }
  LOOM_LOG_WARN(
      "checkpoint_dir '{}' held {} checkpoint(s) newer than step {} from another branch of the "
      "run (a rollback or a fresh start into a used directory): moved to '{}' ({}), not deleted",
      root, moved.size(), step, aside.string(), fmt::join(moved, ", "));
  return moved;
}

std::optional<std::string> resume_target(const std::string& resume, const std::string& root) {
  if (resume.empty()) return std::nullopt;
  if (resume != "latest") return resume;
  LOOM_CHECK_CONFIG(!root.empty(), "train.resume is 'latest' but train.checkpoint_dir is empty");
  auto latest = latest_checkpoint(root);
  if (!latest) LOOM_LOG_INFO("no checkpoint under '{}': starting from step 0", root);
  return latest;
}

config::JobConfig stored_config(const CheckpointData& data, const std::string& dir) {
  auto it = data.metadata.find("config");
  LOOM_CHECK_KIND(ErrorKind::kIO, it != data.metadata.end(), "checkpoint '{}' carries no config",
                  dir);
  config::JobConfig job;
  config::parse_text(it->second, dir + " (its stored config)", &job);
  return job;
}

CheckpointData load_checkpoint(const std::string& dir) {
  std::error_code ec;
  LOOM_CHECK_KIND(ErrorKind::kIO, fs::is_directory(dir, ec), "checkpoint '{}' does not exist", dir);
  for (const char* f : {"model.safetensors", "state.safetensors"}) {
    LOOM_CHECK_KIND(ErrorKind::kIO, fs::exists(fs::path(dir) / f, ec),
                    "checkpoint '{}' is incomplete: '{}' is missing", dir, f);
  }
  CheckpointData data;
  data.model = load_safetensors((fs::path(dir) / "model.safetensors").string()).tensors;
  TensorFile state = load_safetensors((fs::path(dir) / "state.safetensors").string());
  data.state = std::move(state.tensors);
  data.metadata = std::move(state.metadata);
  return data;
}

void gather_checkpoint_data(CheckpointData& data, comm::Communicator& comm, int root) {
  if (comm.size() == 1) return;
  const at::Device device = comm.device();
  if (comm.rank() != root) {
    std::map<std::string, at::Tensor> all;
    for (const auto& [name, t] : data.model) all["model/" + name] = t;
    for (const auto& [name, t] : data.state) all["state/" + name] = t;
    std::string bytes = encode_safetensors(all);
    at::Tensor len = at::full({1}, static_cast<int64_t>(bytes.size()), at::kLong).to(device);
    comm.send(len, root);
    at::Tensor buf =
        at::from_blob(bytes.data(), {static_cast<int64_t>(bytes.size())}, at::kByte).to(device);
    comm.send(buf, root);
    return;
  }
  std::map<std::string, int> holder;
  for (const auto& [name, t] : data.model) holder["model/" + name] = root;
  for (const auto& [name, t] : data.state) holder["state/" + name] = root;
  for (int r = 0; r < comm.size(); ++r) {
    if (r == root) continue;
    at::Tensor len = at::empty({1}, at::TensorOptions().dtype(at::kLong).device(device));
    comm.recv(len, r);
    at::Tensor buf =
        at::empty({len.cpu().item<int64_t>()}, at::TensorOptions().dtype(at::kByte).device(device));
    comm.recv(buf, r);
    buf = buf.cpu();
    TensorFile f = parse_safetensors(
        std::string(static_cast<const char*>(buf.data_ptr()), static_cast<size_t>(buf.numel())),
        fmt::format("checkpoint tensors from rank {} of '{}'", r, comm.name()));
    for (auto& [key, t] : f.tensors) {
      auto [it, fresh] = holder.emplace(key, r);
      LOOM_CHECK_KIND(ErrorKind::kInternal, fresh,
                      "checkpoint: '{}' is held by ranks {} and {} of '{}'", key, it->second, r,
                      comm.name());
      const bool model = key.rfind("model/", 0) == 0;
      (model ? data.model : data.state)[key.substr(6)] = std::move(t);
    }
  }
}

}  // namespace loom::checkpoint
