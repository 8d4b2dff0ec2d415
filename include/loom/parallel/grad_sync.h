// Finishing a step's gradients over every group, in one call (the "grad sync" of DESIGN.md's step).
//
// [Note: gradient synchronisation]
// After the last backward (or W) pass of a step, each parameter's .grad() holds this rank's sum
// over its micro-batches of the gradient of the globally normalised loss ([Note: loss scaling]).
// finish() turns that into the gradient of the whole objective, in this order:
//   1. data parallelism: the DP buckets' all-reduces, started during backward ([Note: gradient
//      buckets]), are completed (the replicated optimizer). With the distributed optimizer the
//      gradients stay DP-unreduced until step 4. Under expert parallelism the expert weights
//      (Parameter::ep_sharded) have buckets of their own over the expert-data-parallel group (the
//      ranks holding the same experts), the other parameters over DP ([Note: expert
//      parallelism]).
//   2. tensor parallelism: replicated parameters whose gradient is a partial sum on each TP rank
//      (norms and biases under sequence parallelism, the MoE router: TpShard::partial_grad) are
//      all-reduced over TP.
//   3. the tied embedding: under pipeline parallelism its two copies (the first stage's lookup, the
//      last stage's head) each get the sum of both gradients over the embedding group.
//   4. the distributed optimizer's reduce-scatter over DP (GradientShards), which leaves each rank
//      the DP sum of its range.
// Sums commute, so 1-3 may run in any order; 1 comes first because its all-reduces may still be in
// flight on buffers that 2 and 3 write, and 4 last because it reads what 1-3 wrote. A gradient that
// is undefined (an expert no token chose) counts as zeros and is materialised where a reduction
// needs it.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "loom/comm/communicator.h"
#include "loom/parallel/data_parallel.h"
#include "loom/parallel/sharding.h"

namespace loom::parallel {

// The side of a distributed (ZeRO-1) optimizer that gradient synchronisation drives: it owns where
// the DP-reduced gradients live.
class GradientShards {
 public:
  virtual ~GradientShards() = default;
  // Reduce-scatters the parameters' (DP-unreduced) gradients over DP. Collective over DP.
  virtual void reduce_scatter_gradients() = 0;
};

struct GradSyncOptions {
  comm::CommunicatorPtr dp;  // data-parallel group (null or size 1: none)
  // The expert-data-parallel group over which Parameter::ep_sharded gradients are reduced instead
  // of `dp` (null: none are; size 1: they are not reduced).
  comm::CommunicatorPtr expert_dp;
  comm::CommunicatorPtr tp;         // tensor-parallel group (null or size 1: none)
  comm::CommunicatorPtr embedding;  // the two stages holding a tied embedding (null: none)
  std::string tied_parameter = "embedding.weight";  // its name, when `embedding` is set
  // DP gradient buckets (the replicated optimizer): bucket size and whether their all-reduces
  // start during backward.
  int64_t bucket_bytes = 25 << 20;
  bool overlap = true;
  // The distributed optimizer (null: replicated): no DP buckets; its reduce-scatter is step 4.
  GradientShards* shards = nullptr;
};

class GradSync {
 public:
  // Registers bucket hooks on `params` (which must outlive this object) when DP reduces them
  // here. Collective-free.
  GradSync(std::vector<Parameter>* params, GradSyncOptions options);
  ~GradSync();
  GradSync(const GradSync&) = delete;
  GradSync& operator=(const GradSync&) = delete;

  // Before a step's first forward: clears the gradients (with buckets, points each .grad() at its
  // zeroed bucket slice).
  void zero_grad();
  // Before each backward (or W) pass: whether it gives parameters their final gradients of the step
  // (the last micro-batch's; with a pipeline, a chunk's last B or W). DP buckets launch only then.
  void arm(bool final_pass);
  // Steps 1-4 of the note. Collective over DP, TP and the embedding group.
  void finish();

  // The DP gradient buckets (null when dp = 1 or with the distributed optimizer).
  const GradBuckets* buckets() const { return buckets_.get(); }
  // The expert weights' buckets over expert DP (null when there are none).
  const GradBuckets* expert_buckets() const { return expert_buckets_.get(); }
  // Seconds finish() waited for bucket all-reduces (both sets).
  double bucket_wait_s() const;

 private:
  std::vector<Parameter>* params_;
  GradSyncOptions options_;
  std::unique_ptr<GradBuckets> buckets_, expert_buckets_;
  std::vector<size_t> unbucketed_;  // parameters whose .grad() zero_grad() resets
  std::vector<size_t> partial_;     // parameters with TP partial-sum gradients
  int64_t tied_ = -1;               // index of the tied parameter when `embedding` is set
};

// Sums the gradients of `params` over `comm` through one flat buffer; an undefined gradient counts
// as zeros and is materialised (a rank whose expert saw no token still holds the others' sum).
void all_reduce_gradients(const std::vector<Parameter*>& params, comm::Communicator& comm);

}  // namespace loom::parallel
