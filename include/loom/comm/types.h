// Vocabulary shared by every communicator backend: reduction ops, operation kinds, and one options
// struct per collective (PyTorch c10d style) with defaults.
#pragma once

#include <ATen/ATen.h>

#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

namespace loom::comm {

enum class ReduceOp { kSum, kAvg, kMax, kMin };
const char* reduce_op_name(ReduceOp op);

// The kinds of operation a communicator counts (calls, bytes, seconds) and records.
enum class OpKind {
  kAllReduce,
  kAllGather,
  kReduceScatter,
  kAllToAll,
  kBroadcast,
  kSend,
  kRecv,
  kBarrier,
  kSplit,
};
constexpr int kNumOpKinds = 9;
const char* op_kind_name(OpKind kind);

using Milliseconds = std::chrono::milliseconds;
// "Use the communicator's default timeout" (CommConfig.timeout_s).
constexpr Milliseconds kDefaultTimeout{-1};

struct AllReduceOptions {
  ReduceOp op = ReduceOp::kSum;
};

struct ReduceScatterOptions {
  ReduceOp op = ReduceOp::kSum;
  // Rows (dim 0 of `input`) that go to each rank; empty = equal shares. Sums to input.size(0).
  std::vector<int64_t> input_split_sizes;
};

struct AllGatherOptions {
  // Rows (dim 0 of `output`) that come from each rank; empty = equal (output = size x input).
  std::vector<int64_t> output_split_sizes;
};

struct AllToAllOptions {
  // Rows of `input` sent to each rank, and rows of `output` received from each rank; empty =
  // equal shares.
  std::vector<int64_t> input_split_sizes;
  std::vector<int64_t> output_split_sizes;
};

struct BroadcastOptions {
  int root = 0;
};

// One operation of a batched point-to-point exchange (batch_isend_irecv).
struct P2POp {
  enum class Kind { kSend, kRecv };
  Kind kind;
  at::Tensor tensor;
  int peer;      // rank in the communicator
  int tag = 0;
  static P2POp send(at::Tensor t, int peer, int tag = 0) { return {Kind::kSend, std::move(t), peer, tag}; }
  static P2POp recv(at::Tensor t, int peer, int tag = 0) { return {Kind::kRecv, std::move(t), peer, tag}; }
};

// True for dtypes whose sums the backends accumulate in fp32 (bf16, fp16).
bool is_reduced_precision(at::ScalarType dtype);

}  // namespace loom::comm
