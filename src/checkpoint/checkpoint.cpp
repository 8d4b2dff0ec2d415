#include "loom/checkpoint/checkpoint.h"

#include <fmt/format.h>

#include <algorithm>
#include <filesystem>
#include <vector>

#include "loom/checkpoint/safetensors.h"
#include "loom/core/error.h"

namespace loom::checkpoint {

namespace fs = std::filesystem;

namespace {
// step-00000042 -> 42; anything else -> -1.
int64_t parse_step(const std::string& name) {
  if (name.size() != 13 || name.rfind("step-", 0) != 0) return -1;
  int64_t v = 0;
  for (size_t i = 5; i < name.size(); ++i) {
    if (name[i] < '0' || name[i] > '9') return -1;
    v = v * 10 + (name[i] - '0');
  }
  return v;
}

std::vector<std::pair<int64_t, fs::path>> complete_checkpoints(const std::string& root) {
  std::vector<std::pair<int64_t, fs::path>> out;
  std::error_code ec;
  if (!fs::is_directory(root, ec)) return out;
  for (const auto& entry : fs::directory_iterator(root)) {
    const int64_t step = parse_step(entry.path().filename().string());
    if (step >= 0 && entry.is_directory() && fs::exists(entry.path() / "state.safetensors")) {
      out.emplace_back(step, entry.path());
    }
  }
  std::sort(out.begin(), out.end());
  return out;
}
}  // namespace

void write_checkpoint(const std::string& dir, const CheckpointData& data) {
  std::error_code ec;
  const fs::path final_dir(dir);
  const fs::path tmp(dir + ".tmp");
  fs::remove_all(tmp, ec);
  fs::create_directories(tmp, ec);
  LOOM_CHECK_KIND(ErrorKind::kIO, !ec, "cannot create '{}': {}", tmp.string(), ec.message());
  save_safetensors((tmp / "model.safetensors").string(), data.model);
  // Written last: its presence marks the checkpoint complete.
  save_safetensors((tmp / "state.safetensors").string(), data.state, data.metadata);
  fs::remove_all(final_dir, ec);
  fs::rename(tmp, final_dir, ec);
  LOOM_CHECK_KIND(ErrorKind::kIO, !ec, "cannot rename '{}' to '{}': {}", tmp.string(),
                  final_dir.string(), ec.message());
}

std::string save_checkpoint(const std::string& root, int64_t step, const CheckpointData& data, int keep) {
  std::error_code ec;
  fs::create_directories(root, ec);
  LOOM_CHECK_KIND(ErrorKind::kIO, !ec, "cannot create checkpoint directory '{}': {}", root, ec.message());
  const fs::path final_dir = fs::path(root) / fmt::format("step-{:08d}", step);
  write_checkpoint(final_dir.string(), data);
  if (keep > 0) {
    auto all = complete_checkpoints(root);
    for (size_t i = 0; i + static_cast<size_t>(keep) < all.size(); ++i) fs::remove_all(all[i].second, ec);
  }
  return final_dir.string();
}

std::optional<std::string> latest_checkpoint(const std::string& root) {
  auto all = complete_checkpoints(root);
  if (all.empty()) return std::nullopt;
  return all.back().second.string();
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

}  // namespace loom::checkpoint
