// ZeRO-1 distributed optimizer (Rajbhandari et al. 2020; Megatron-Core's DistributedOptimizer).
//
// [Note: distributed optimizer]
// The local parameters (TP shards included) are laid end to end in registration order as one flat
// index space, padded to a multiple of the DP size; DP rank r owns the contiguous range
// [r S, (r + 1) S). A step:
//   1. reduce_scatter_gradients(): the flat gradient (undefined gradients as zeros) is
//      reduce-scattered over DP, leaving this rank the DP sum of its range (the all-reduce of plain
//      DP costs one reduce-scatter plus one all-gather; ZeRO-1 moves the all-gather to parameters).
//   2. clip_grad_norm(): squared sums of the owned range, split into TP-sharded and TP-replicated
//      parameters' elements, are all-reduced over DP; the sharded part also over TP; every element
//      of the model therefore counts once. The owned gradient is scaled if the norm exceeds the
//      limit.
//   3. step(): AdamW on the owned range only (the parameters are the fp32 masters; the moments
//   exist
//      for S elements per rank, so optimizer state falls as 1/DP), then the updated ranges are
//      all-gathered over DP into every parameter.
// The update of each element is AdamW's, so the result equals the replicated optimizer's up to the
// order of the gradient sums. state() gathers the moments back into per-parameter tensors, so
// checkpoints do not depend on DP (or on this optimizer being used).
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "loom/comm/communicator.h"
#include "loom/optim/adamw.h"
#include "loom/parallel/grad_sync.h"

namespace loom::optim {

class DistributedAdamW : public Optimizer, public parallel::GradientShards {
 public:
  // Collective-free. `dp` must be non-null; `tp` may be null (no tensor parallelism).
  // `pp` (may be null): the pipeline group, over which the norm's squared sums are also summed
  // (a stage's Parameter::pipeline_copy is left out of them).
  DistributedAdamW(std::vector<model::Parameter>* params, const AdamWOptions& options,
                   comm::CommunicatorPtr dp, comm::CommunicatorPtr tp,
                   comm::CommunicatorPtr pp = nullptr);

  // Steps 1 and 2 of the note; collective over DP (and TP for the norm). Returns the norm before
  // clipping (max_norm <= 0: no clipping). Parameters' .grad() are left as they were
  // (DP-unreduced).
  void reduce_scatter_gradients() override;
  double clip_grad_norm(double max_norm) override;
  at::Tensor grad_square_sums() const override;  // collective over DP
  void scale_gradients(double coeff) override;

  // The DP-reduced gradient of every parameter (local TP shards, in parameter order), gathered from
  // the owners' ranges: valid between reduce_scatter_gradients() and clip_grad_norm() (which scales
  // them). Collective over DP; for tests and diagnostics (it costs a full all-gather).
  std::vector<at::Tensor> reduced_gradients() const override;
  parallel::GradientShards* gradient_shards() override { return this; }

  void step(double lr) override;  // step 3; collective over DP
  int64_t step_count() const override { return step_; }
  std::vector<NamedTensor> state() const override;  // collective over DP
  void load_state(const std::vector<NamedTensor>& state, int64_t step) override;
  std::vector<std::string> state_names() const override { return moment_names(*params_, options_); }
  int64_t state_bytes() const override;

  int64_t shard_size() const { return shard_; }
  int64_t flat_size() const { return total_; }

 private:
  // The part of parameter `param` inside this rank's range.
  struct Segment {
    size_t param;
    int64_t param_offset;  // first element within the parameter (flattened)
    int64_t shard_offset;  // first element within this rank's range
    int64_t numel;
  };
  at::Tensor to_comm(const at::Tensor& t) const;
  at::Tensor from_comm(const at::Tensor& t) const;

  std::vector<model::Parameter>* params_;
  AdamWOptions options_;
  comm::CommunicatorPtr dp_, tp_, pp_;
  std::vector<int64_t> offsets_;  // flat offset of each parameter
  int64_t total_ = 0, shard_ = 0, begin_ = 0;
  std::vector<Segment> segments_;
  at::Tensor grad_, exp_avg_, exp_avg_sq_;  // [shard_] each
  int64_t step_ = 0;
};

}  // namespace loom::optim
