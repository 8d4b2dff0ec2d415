#include "loom/mesh/rank_generator.h"

#include <algorithm>
#include <set>

#include "loom/core/error.h"

namespace loom::mesh {

std::vector<std::string> split_token(const std::string& token) {
  std::vector<std::string> parts;
  size_t start = 0;
  while (true) {
    size_t dash = token.find('-', start);
    std::string part = token.substr(start, dash == std::string::npos ? std::string::npos : dash - start);
    LOOM_CHECK_CONFIG(!part.empty(), "order '{}' has an empty dimension name", token);
    parts.push_back(part);
    if (dash == std::string::npos) break;
    start = dash + 1;
  }
  return parts;
}

RankGenerator::RankGenerator(const std::map<std::string, int>& sizes, const std::string& order) {
  std::set<std::string> seen;
  for (const auto& name : split_token(order)) {
    auto it = sizes.find(name);
    if (it == sizes.end()) {
      std::string known;
      for (const auto& [n, s] : sizes) known += (known.empty() ? "" : ", ") + n;
      LOOM_THROW(ErrorKind::kConfig, "order '{}': unknown dimension '{}' (known: {})", order, name,
                 known);
    }
    LOOM_CHECK_CONFIG(seen.insert(name).second, "order '{}' names '{}' twice", order, name);
    dims_.push_back(name);
  }
  for (const auto& [name, s] : sizes) {
    if (seen.count(name)) continue;
    LOOM_CHECK_CONFIG(s == 1, "order '{}' omits '{}', but {}={} (only size-1 dims may be omitted)",
                      order, name, name, s);
    dims_.push_back(name);
  }
  int stride = 1;
  for (const auto& name : dims_) {
    int s = sizes.at(name);
    LOOM_CHECK_CONFIG(s >= 1, "dimension {} has size {}; sizes must be >= 1", name, s);
    sizes_.push_back(s);
    strides_.push_back(stride);
    stride *= s;
  }
  world_size_ = stride;
}

int RankGenerator::index(const std::string& dim) const {
  auto it = std::find(dims_.begin(), dims_.end(), dim);
  LOOM_CHECK(it != dims_.end(), "unknown dimension '{}'", dim);
  return static_cast<int>(it - dims_.begin());
}

int RankGenerator::size(const std::string& dim) const { return sizes_[index(dim)]; }

std::vector<int> RankGenerator::coords(int rank) const {
  LOOM_CHECK(rank >= 0 && rank < world_size_, "rank {} outside [0, {})", rank, world_size_);
  std::vector<int> c(dims_.size());
  for (size_t i = 0; i < dims_.size(); ++i) c[i] = (rank / strides_[i]) % sizes_[i];
  return c;
}

int RankGenerator::coord(const std::string& dim, int rank) const {
  int i = index(dim);
  LOOM_CHECK(rank >= 0 && rank < world_size_, "rank {} outside [0, {})", rank, world_size_);
  return (rank / strides_[i]) % sizes_[i];
}

int RankGenerator::rank_of(const std::vector<int>& c) const {
  LOOM_CHECK(c.size() == dims_.size(), "{} coordinates for {} dims", c.size(), dims_.size());
  int r = 0;
  for (size_t i = 0; i < dims_.size(); ++i) {
    LOOM_CHECK(c[i] >= 0 && c[i] < sizes_[i], "coordinate {}={} outside [0, {})", dims_[i], c[i],
               sizes_[i]);
    r += c[i] * strides_[i];
  }
  return r;
}

std::vector<bool> RankGenerator::mask(const std::string& token) const {
  std::vector<bool> m(dims_.size(), false);
  for (const auto& name : split_token(token)) m[index(name)] = true;
  return m;
}

std::vector<std::vector<int>> RankGenerator::groups(const std::string& token) const {
  std::vector<bool> m = mask(token);
  std::vector<int> in_sizes, in_strides, out_sizes, out_strides;
  for (size_t i = 0; i < dims_.size(); ++i) {
    (m[i] ? in_sizes : out_sizes).push_back(sizes_[i]);
    (m[i] ? in_strides : out_strides).push_back(strides_[i]);
  }
  auto product = [](const std::vector<int>& v) {
    int p = 1;
    for (int x : v) p *= x;
    return p;
  };
  // Offset of a flat index decomposed over (sizes, strides), first dim fastest.
  auto offset = [](int flat, const std::vector<int>& sizes, const std::vector<int>& strides) {
    int off = 0;
    for (size_t i = 0; i < sizes.size(); ++i) {
      off += (flat % sizes[i]) * strides[i];
      flat /= sizes[i];
    }
    return off;
  };
  int group_size = product(in_sizes);
  int num_groups = product(out_sizes);
  std::vector<std::vector<int>> out(num_groups, std::vector<int>(group_size));
  for (int g = 0; g < num_groups; ++g) {
    int base = offset(g, out_sizes, out_strides);
    for (int k = 0; k < group_size; ++k) out[g][k] = base + offset(k, in_sizes, in_strides);
  }
  return out;
}

std::vector<int> RankGenerator::group_of(const std::string& token, int rank) const {
  std::vector<bool> m = mask(token);
  std::vector<int> c = coords(rank);
  std::vector<int> members;
  // Vary the masked dims (first fastest), keep the others at this rank's coordinates.
  std::vector<int> idx;
  std::vector<int> sizes;
  for (size_t i = 0; i < dims_.size(); ++i) {
    if (m[i]) {
      idx.push_back(static_cast<int>(i));
      sizes.push_back(sizes_[i]);
    }
  }
  int n = 1;
  for (int s : sizes) n *= s;
  for (int k = 0; k < n; ++k) {
    int flat = k;
    for (size_t j = 0; j < idx.size(); ++j) {
      c[idx[j]] = flat % sizes[j];
      flat /= sizes[j];
    }
    members.push_back(rank_of(c));
  }
  return members;
}

}  // namespace loom::mesh
