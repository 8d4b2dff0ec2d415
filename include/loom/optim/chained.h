// The optimizer of a model under expert parallelism: one optimizer for the dense parameters over
// the data-parallel group, one for the expert shards over the expert-data-parallel group, and one
// gradient norm over both (Megatron-Core's ChainedOptimizer).
//
// [Note: optimizers under expert parallelism]
// The dense parameters (everything but Parameter::ep_sharded) are replicated over dp x cp; the
// expert shards over expert_dp, the ranks holding the same experts (Note: expert parallelism).
// Each part gets the optimizer the config asks for (AdamW or SGD, replicated or ZeRO-1) over its
// own group, so ZeRO-1 shards the expert moments over expert DP. The gradient norm sums every
// element of the model once: the dense part's [TP-replicated, TP-sharded] squared sums as
// optim::grad_norm counts them (the sharded part over TP), the experts' over the groups their
// shards are spread over (TP-sharded expert weights over the expert group, expert_tp x ep;
// TP-replicated ones over EP), and the total over the pipeline. Both parts are clipped by the same
// coefficient. state() lists the dense part's moments, then the experts' (each shaped like the
// parameter's local tensor); checkpoints gather the expert shards over the expert group.
#pragma once

#include <memory>
#include <vector>

#include "loom/optim/adamw.h"

namespace loom::optim {

struct ExpertGroups {
  comm::CommunicatorPtr dp;     // expert data parallelism: the ranks holding the same shards
  comm::CommunicatorPtr ep;     // the ranks with the same expert-TP rank and every ep index
  comm::CommunicatorPtr group;  // the expert group (expert_tp x ep)
};

class ChainedOptimizer : public Optimizer, public parallel::GradientShards {
 public:
  // Splits `params` (which must outlive this object) into dense and expert parts, each with the
  // optimizer `job` asks for. Collective-free. `tp`, `pp` may be null.
  ChainedOptimizer(std::vector<model::Parameter>* params, const config::JobConfig& job,
                   comm::CommunicatorPtr dp, comm::CommunicatorPtr tp, comm::CommunicatorPtr pp,
                   ExpertGroups experts);

  void step(double lr) override;
  int64_t step_count() const override { return dense_opt_->step_count(); }
  std::vector<NamedTensor> state() const override;
  void load_state(const std::vector<NamedTensor>& state, int64_t step) override;
  std::vector<std::string> state_names() const override;
  int64_t state_bytes() const override;
  double clip_grad_norm(double max_norm) override;
  // [dense replicated, dense TP-sharded, expert TP-replicated, expert TP-sharded].
  at::Tensor grad_square_sums() const override;
  void scale_gradients(double coeff) override;
  std::vector<at::Tensor> reduced_gradients() const override;
  parallel::GradientShards* gradient_shards() override;
  void reduce_scatter_gradients() override;

  const Optimizer& dense() const { return *dense_opt_; }
  const Optimizer& experts() const { return *expert_opt_; }

 private:
  std::vector<model::Parameter>* params_;
  comm::CommunicatorPtr tp_, pp_;
  ExpertGroups experts_;
  // Copies of the parameters (the tensors are shared) and their indices in *params_.
  std::vector<model::Parameter> dense_, expert_;
  std::vector<size_t> dense_index_, expert_index_;
  std::unique_ptr<Optimizer> dense_opt_, expert_opt_;
};

}  // namespace loom::optim
