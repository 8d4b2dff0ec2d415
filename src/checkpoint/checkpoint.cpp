#include "loom/checkpoint/checkpoint.h"

#include <fmt/format.h>

#include <algorithm>
#include <filesystem>
#include <vector>

#include "loom/checkpoint/safetensors.h"
#include "loom/core/error.h"
#include "loom/core/logging.h"

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
  if (keep > 0) {
    auto all = complete_checkpoints(root);
    for (size_t i = 0; i + static_cast<size_t>(keep) < all.size(); ++i)
      fs::remove_all(all[i].second, ec);
  }
  return final_dir.string();
}

std::optional<std::string> latest_checkpoint(const std::string& root) {
  auto all = complete_checkpoints(root);
  if (all.empty()) return std::nullopt;
  return all.back().second.string();
}

std::optional<std::string> resume_target(const std::string& resume, const std::string& root) {
  if (resume.empty()) return std::nullopt;
  if (resume != "latest") return resume;
  LOOM_CHECK_CONFIG(!root.empty(), "train.resume is 'latest' but train.checkpoint_dir is empty");
  auto latest = latest_checkpoint(root);
  if (!latest) LOOM_LOG_INFO("no checkpoint under '{}': starting from step 0", root);
  return latest;
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
