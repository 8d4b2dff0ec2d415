// Data-parallel gradient reduction in buckets that overlap backward (PyTorch DDP's reducer and
// Megatron-Core's DistributedDataParallel, for the replicated optimizer).
//
// [Note: gradient buckets]
// The parameters are grouped, in reverse registration order (roughly the order backward produces
// their gradients), into buckets of about `bucket_bytes`; each bucket is one contiguous buffer and
// every parameter's .grad() is a view into it, so autograd accumulates micro-batches in place. On
// the last micro-batch of a step (arm(true)) a post-hook on each parameter's gradient accumulator
// counts the bucket down; when a bucket is complete it and any complete buckets after it in launch
// order start their non-blocking all-reduce (sum) over DP, while backward goes on with the earlier
// layers. Buckets are launched strictly in order, so every rank issues the same collectives in the
// same sequence even when an MoE expert got no tokens on one rank (its bucket completes in
// finish()). finish() launches what is left and waits for all of them. Gradients of parameters that
// no rank used are zeros, as in the unbucketed reduction.
#pragma once

#include <ATen/ATen.h>

#include <memory>
#include <vector>

#include "loom/comm/communicator.h"
#include "loom/comm/work.h"
#include "loom/parallel/sharding.h"

namespace torch::autograd {
struct Node;
}

namespace loom::parallel {

struct BucketStats {
  int64_t buckets = 0;
  int64_t launched_in_backward = 0;  // buckets whose all-reduce started before finish()
  double wait_s = 0;  // time finish() spent waiting (the part not hidden by backward)
};

class GradBuckets {
 public:
  // `overlap` false: the all-reduces run in finish() (still bucketed). Registers hooks on the
  // parameters' gradient accumulators; the parameters must outlive this object. `members`: the
  // indices of the parameters these buckets reduce (empty: all of them); the others' gradients are
  // left alone (the expert weights under expert parallelism have buckets of their own over the
  // expert-data-parallel group).
  GradBuckets(std::vector<Parameter>* params, comm::CommunicatorPtr dp, int64_t bucket_bytes,
              bool overlap, std::vector<size_t> members = {});
  ~GradBuckets();
  GradBuckets(const GradBuckets&) = delete;
  GradBuckets& operator=(const GradBuckets&) = delete;

  // Zeroes every bucket and points each parameter's .grad() at its slice (replaces zero_grad()).
  void zero();
  // Whether the next backward pass gives parameters their final gradients of the step (the last
  // micro-batch's; with a pipeline, a chunk's last B or W): hooks count parameters only then.
  void arm(bool last_micro_batch);
  // Launches the buckets not yet launched, in order, and waits for all. Collective over DP.
  void finish();

  const BucketStats& stats() const { return stats_; }
  int64_t num_buckets() const { return static_cast<int64_t>(buckets_.size()); }

 private:
  struct Bucket {
    at::Tensor buffer;
    std::vector<size_t> params;
    int64_t pending = 0;
    bool launched = false;
    comm::WorkPtr work;
  };
  void on_grad_ready(size_t param);
  void launch_ready();
  void launch(Bucket& b);

  std::vector<Parameter>* params_;
  comm::CommunicatorPtr dp_;
  bool overlap_;
  std::vector<size_t> members_;  // the parameters bucketed here
  std::vector<Bucket> buckets_;
  std::vector<size_t> bucket_of_;
  std::vector<int64_t> offset_of_;
  std::vector<std::shared_ptr<torch::autograd::Node>> accumulators_;
  bool armed_ = false;
  std::vector<uint8_t> counted_;  // per parameter: counted towards its bucket this step
  size_t next_ = 0;               // next bucket to launch
  BucketStats stats_;
};

}  // namespace loom::parallel
