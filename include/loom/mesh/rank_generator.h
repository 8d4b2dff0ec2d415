// RankGenerator: rank <-> coordinate maths of an N-D layout given by an order string, as
// Megatron-Core's RankGenerator does it.
//
// The order string lists dims fastest-varying first: with "tp-cp-ep-dp-pp", tp has stride 1, cp
// stride tp, ep stride tp*cp, and so on, so
//   rank = sum_i coord_i * stride_i,  stride_i = prod_{j<i} size_j.
// A group for a token such as "tp-dp" is a set of ranks that agree on every dim *not* in the token;
// members are ordered by their index over the token's dims (first fastest), which is ascending rank.
#pragma once

#include <map>
#include <string>
#include <vector>

namespace loom::mesh {

class RankGenerator {
 public:
  // sizes: size of each named dim; order: dim names joined by '-', fastest first. Dims missing from
  // the order are appended at the end if their size is 1, and refused otherwise.
  RankGenerator(const std::map<std::string, int>& sizes, const std::string& order);

  int world_size() const { return world_size_; }
  const std::vector<std::string>& dims() const { return dims_; }  // in order, fastest first
  int size(const std::string& dim) const;

  std::vector<int> coords(int rank) const;             // indexed like dims()
  int coord(const std::string& dim, int rank) const;
  int rank_of(const std::vector<int>& coords) const;

  // Every group for `token` (dim names joined by '-', any order), each sorted by rank.
  std::vector<std::vector<int>> groups(const std::string& token) const;
  // The group of `token` that contains `rank`.
  std::vector<int> group_of(const std::string& token, int rank) const;

 private:
  std::vector<bool> mask(const std::string& token) const;
  int index(const std::string& dim) const;

  std::vector<std::string> dims_;
  std::vector<int> sizes_;
  std::vector<int> strides_;
  int world_size_ = 1;
};

// Splits "tp-cp-ep" into {"tp","cp","ep"}; empty parts are refused.
std::vector<std::string> split_token(const std::string& token);

}  // namespace loom::mesh
