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

struct Parameter {
  std::string name;
  at::Tensor tensor;                 // the trainable leaf (requires_grad), master dtype
  std::vector<int64_t> global_shape;
  bool weight_decay = true;          // false for norms, biases (and 1-D tensors generally)
};

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
                   at::TensorOptions options, std::string prefix = "");

  ParameterFactory child(const std::string& name) const;

  // Creates, initialises, registers and returns the parameter "<prefix>.<name>". `weight_decay`
  // defaults to false for tensors of one dimension (norm weights, biases).
  at::Tensor make(const std::string& name, at::IntArrayRef shape, Init init, double std = 0.0,
                  int weight_decay = -1) const;

  const at::TensorOptions& options() const { return options_; }
  uint64_t job_seed() const { return job_seed_; }

 private:
  std::shared_ptr<std::vector<Parameter>> registry_;
  uint64_t job_seed_;
  at::TensorOptions options_;
  std::string prefix_;
};

}  // namespace loom::model
