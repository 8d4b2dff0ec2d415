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

#include "loom/parallel/sharding.h"

namespace loom::model {

enum class Init {
  kNormal,  // N(0, std^2)
  kOnes,
  kZeros,
};

// Parameter, TpShard, shard_of and unshard live in parallel/sharding.h (the parallel layer reduces
// and shards parameters without knowing the model); the model layer uses them under its own names.
using parallel::local_of;
using parallel::Parameter;
using parallel::shard_of;
using parallel::TpShard;
using parallel::unshard;

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
                   at::TensorOptions options, std::string prefix = "", int tp_size = 1,
                   int tp_rank = 0);

  ParameterFactory child(const std::string& name) const;

  // Creates, initialises, registers and returns the parameter "<prefix>.<name>". `weight_decay`
  // defaults to false for tensors of one dimension (norm weights, biases).
  // `shape` is the global shape; with a TP shard the returned tensor is this rank's part.
  at::Tensor make(const std::string& name, at::IntArrayRef shape, Init init, double std = 0.0,
                  int weight_decay = -1, TpShard shard = {}) const;
  // An expert weight [E, ...] (Parameter::expert): this rank's experts of `ep_size`, each sharded
  // by `shard` over `etp_size` expert-TP ranks.
  at::Tensor make_expert(const std::string& name, at::IntArrayRef shape, Init init, double std,
                         TpShard shard, int ep_size, int ep_rank, int etp_size, int etp_rank) const;
  const std::string& prefix() const { return prefix_; }
  int tp_size() const { return tp_size_; }
  int tp_rank() const { return tp_rank_; }

  const at::TensorOptions& options() const { return options_; }
  uint64_t job_seed() const { return job_seed_; }

 private:
  // Names, checks, draws, slices (local_of) and registers `p`.
  at::Tensor add(Parameter p, const std::string& name, Init init, double std) const;

  std::shared_ptr<std::vector<Parameter>> registry_;
  uint64_t job_seed_;
  at::TensorOptions options_;
  std::string prefix_;
  int tp_size_ = 1, tp_rank_ = 0;
};

}  // namespace loom::model
