// AdamW (Loshchilov & Hutter): decoupled weight decay, bias-corrected moments, fp32 (or fp64)
// state. The update for a parameter p with gradient g at step t (1-based) and learning rate lr:
//   m = b1 m + (1 - b1) g            v = b2 v + (1 - b2) g^2
//   p = p - lr * wd * p              (only for parameters with weight_decay)
//   p = p - lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
// A parameter whose gradient is undefined this step (an MoE expert no token chose) is treated as
// having a zero gradient: its moments decay and decoupled weight decay still applies, exactly as in
// a run where the gradient was materialised as zeros (so sharded and unsharded runs agree).
//
// `optim.optimizer: SGD` selects plain SGD through the same classes (p = p - lr * wd * p for
// decayed parameters, then p = p - lr * g; no moments, no state): a gradient that is off by a
// factor moves the parameters by that factor, which is what the layout tests need (AdamW's
// update is nearly blind to a uniform gradient scale).
#pragma once

#include <ATen/ATen.h>

#include <memory>
#include <string>
#include <vector>

#include "loom/comm/communicator.h"
#include "loom/config.pb.h"
#include "loom/model/parameter.h"
#include "loom/parallel/grad_sync.h"

namespace loom::optim {

struct AdamWOptions {
  enum class Rule { kAdamW, kSgd };
  Rule rule = Rule::kAdamW;
  double beta1 = 0.9;
  double beta2 = 0.95;
  double eps = 1e-8;
  double weight_decay = 0.1;

  static AdamWOptions from_config(const config::OptimConfig& c);
};

// A named optimizer-state tensor (DESIGN.md decision 6): "<param>.exp_avg", "<param>.exp_avg_sq".
struct NamedTensor {
  std::string name;
  at::Tensor tensor;
};

// What the trainer needs of an optimizer: AdamW (replicated state) or DistributedAdamW (ZeRO-1).
class Optimizer {
 public:
  virtual ~Optimizer() = default;
  // One update with learning rate `lr`; increments step_count().
  virtual void step(double lr) = 0;
  virtual int64_t step_count() const = 0;
  // "<param>.exp_avg" and "<param>.exp_avg_sq" for every parameter in order, each shaped like the
  // parameter's local tensor (a distributed optimizer gathers them: collective over its DP group).
  virtual std::vector<NamedTensor> state() const = 0;
  // Loads state saved by state(); every tensor must be present with the right shape.
  virtual void load_state(const std::vector<NamedTensor>& state, int64_t step) = 0;
  // The names state() returns, without the tensors (no communication): what a checkpoint must hold.
  virtual std::vector<std::string> state_names() const = 0;
  // Bytes of optimizer state this rank holds.
  virtual int64_t state_bytes() const = 0;
  // The L2 norm of the step's final gradients over the whole model (every element once, as
  // optim::grad_norm counts them), which are then scaled to `max_norm` if above it (max_norm <= 0:
  // no clipping; a non-finite norm scales nothing). Returns the norm before clipping. Collective
  // over the optimizer's groups.
  virtual double clip_grad_norm(double max_norm) = 0;
  // This optimizer's part of the squared gradient norm before any model-parallel reduction:
  // [replicated over TP, TP-sharded] fp64 sums (CPU) of its parameters' final gradients,
  // Parameter::pipeline_copy left out, each element of the data-parallel replica once (a
  // distributed optimizer sums its owned ranges over its DP group: collective over DP).
  virtual at::Tensor grad_square_sums() const = 0;
  // Multiplies the step's final gradients by `coeff` (clipping).
  virtual void scale_gradients(double coeff) = 0;
  // The step's final gradient of every parameter (local TP shards, in parameter order; zeros for
  // one that got none), between the gradient synchronisation and clip_grad_norm(). Collective over
  // DP for a distributed optimizer (a full all-gather): for tests and diagnostics.
  virtual std::vector<at::Tensor> reduced_gradients() const = 0;
  // A distributed optimizer's shards, which take the DP reduction of the gradients
  // (GradSyncOptions::shards); nullptr when the gradients are all-reduced instead.
  virtual parallel::GradientShards* gradient_shards() { return nullptr; }
};

// The update of one tensor (or a contiguous slice of one): `g` undefined counts as zeros. With
// Rule::kSgd, `m` and `v` are not used (and may be undefined).
void adamw_update(at::Tensor& w, const at::Tensor& g, at::Tensor& m, at::Tensor& v, bool decay,
                  double lr, int64_t step, const AdamWOptions& o);

// "<param>.exp_avg" and "<param>.exp_avg_sq" of every parameter (AdamW), nothing (SGD).
std::vector<std::string> moment_names(const std::vector<model::Parameter>& params,
                                      const AdamWOptions& o);

class AdamW : public Optimizer {
 public:
  // Keeps references to the parameters; the vector must outlive the optimizer. `tp`, `pp` (may be
  // null): the groups the gradient norm sums over (see optim::grad_norm).
  AdamW(std::vector<model::Parameter>* params, const AdamWOptions& options,
        comm::CommunicatorPtr tp = nullptr, comm::CommunicatorPtr pp = nullptr);

  void step(double lr) override;
  int64_t step_count() const override { return step_; }
  std::vector<NamedTensor> state() const override;
  void load_state(const std::vector<NamedTensor>& state, int64_t step) override;
  std::vector<std::string> state_names() const override;
  int64_t state_bytes() const override;
  double clip_grad_norm(double max_norm) override;
  at::Tensor grad_square_sums() const override;
  void scale_gradients(double coeff) override;
  std::vector<at::Tensor> reduced_gradients() const override;

 private:
  std::vector<model::Parameter>* params_;
  AdamWOptions options_;
  comm::CommunicatorPtr tp_, pp_;
  std::vector<at::Tensor> exp_avg_, exp_avg_sq_;
  int64_t step_ = 0;
};

// The optimizer a job's config asks for over this rank's parameters: AdamW or SGD
// (optim.optimizer), replicated or sharded ZeRO-1 style over `dp` (parallel.distributed_optimizer,
// DistributedAdamW). `tp`, `pp` (may be null): the groups the gradient norm sums over.
std::unique_ptr<Optimizer> make_optimizer(std::vector<model::Parameter>* params,
                                          const config::JobConfig& job, comm::CommunicatorPtr dp,
                                          comm::CommunicatorPtr tp, comm::CommunicatorPtr pp);

}  // namespace loom::optim
