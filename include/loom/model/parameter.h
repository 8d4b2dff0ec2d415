// Named parameters and their deterministic initialisation (DESIGN.md decisions 2 and 6).
//
// Every parameter has a stable global name ("layers.3.attn.qkv.weight") and a global shape. Its
// initial value is drawn for the *full* tensor, on the CPU, in fp32, from a generator seeded by
// (job seed, name): the same name gets the same numbers whatever the device, dtype or (later)
// sharding, and adding or removing another parameter changes nothing else.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace loom::model {

enum class Init {
  kNormal,  // N(0, std^2)
  kOnes,
  kZeros,
};

// [Note: tensor-parallel shards]
// A parameter split over the TP group keeps, on each rank, the rank's part of dimension `dim` of
// the full tensor after zero-padding that dimension to `padded` (the vocabulary rows). When the
// dimension is made of `blocks` equal blocks (SwiGLU's [gate | up] rows), each block is split and
// the rank's parts are concatenated, so a column-parallel SwiGLU keeps its gate and up halves
// together. Replicated parameters (dim -1) whose gradients are partial sums on each TP rank (norm
// weights under sequence parallelism, the MoE router) set `tp_partial_grad`; their gradients are
// all-reduced over TP after backward.
struct TpShard {
  int dim = -1;            // -1: replicated over TP
  int64_t blocks = 1;
  int64_t padded = 0;      // the padded size of `dim` (0: no padding)
  bool partial_grad = false;
};

struct Parameter {
  std::string name;
  at::Tensor tensor;                 // the trainable leaf (requires_grad), master dtype
  std::vector<int64_t> global_shape;
  bool weight_decay = true;          // false for norms, biases (and 1-D tensors generally)
  TpShard shard;
  int tp_size = 1, tp_rank = 0;
  // Another pipeline stage owns this parameter and this rank holds a copy that the trainer keeps
  // equal to it (the tied embedding used as the head on the last stage: [Note: pipeline stages]).
  // Norms and checkpoints count the owner's only.
  bool pipeline_copy = false;

  bool tp_sharded() const { return shard.dim >= 0 && tp_size > 1; }
};

// This rank's shard of a full tensor (Note: tensor-parallel shards).
at::Tensor shard_of(const at::Tensor& full, const TpShard& shard, int tp_size, int tp_rank);
// The full tensor from every rank's shard (in TP rank order), padding removed.
at::Tensor unshard(const std::vector<at::Tensor>& shards, const TpShard& shard, at::IntArrayRef global_shape);

// 64-bit seed for a parameter: splitmix64 over the job seed and an FNV-1a hash of the name.
uint64_t parameter_seed(uint64_t job_seed, const std::string& name);

// The full initial value of a parameter (fp32 on the CPU, before any cast or slice).
at::Tensor initial_value(uint64_t job_seed, const std::string& name, at::IntArrayRef shape,
                         Init init, double std = 0.0);

// Creates parameters under a name prefix and records them in a shared, ordered list. Layers take a
// factory for their own prefix (`factory.child("attn")`) so names compose without a module tree.
class ParameterFactory {
 public:
  ParameterFactory(std::shared_ptr<std::vector<Parameter>> registry, uint64_t job_seed,
                   at::TensorOptions options, std::string prefix = "", int tp_size = 1, int tp_rank = 0);

  ParameterFactory child(const std::string& name) const;

  // Creates, initialises, registers and returns the parameter "<prefix>.<name>". `weight_decay`
  // defaults to false for tensors of one dimension (norm weights, biases).
  // `shape` is the global shape; with a TP shard the returned tensor is this rank's part.
  at::Tensor make(const std::string& name, at::IntArrayRef shape, Init init, double std = 0.0,
                  int weight_decay = -1, TpShard shard = {}) const;
  const std::string& prefix() const { return prefix_; }
  int tp_size() const { return tp_size_; }
  int tp_rank() const { return tp_rank_; }

  const at::TensorOptions& options() const { return options_; }
  uint64_t job_seed() const { return job_seed_; }

 private:
  std::shared_ptr<std::vector<Parameter>> registry_;
  uint64_t job_seed_;
  at::TensorOptions options_;
  std::string prefix_;
  int tp_size_ = 1, tp_rank_ = 0;
};

}  // namespace loom::model
