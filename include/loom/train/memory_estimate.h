// The up-front memory check: what one rank will need, against what it has, before anything is
// allocated.
//
// [Note: memory estimate] A model that cannot fit used to end in the allocator ("can't allocate
// 51539607552 bytes") with a backtrace, after minutes of start-up on a large job. The trainer now
// estimates, in doubles (no count can overflow), the busiest rank's bytes:
//   parameters  fp32 masters of the fullest rank: its pipeline stage's blocks (the pipeline's own
//               split, model::partition_stages) / tp, plus the embedding on the first stage and
//               the head (a tied one is a copy there when pp > 1) on the last, / tp
//   gradients   fp32, the same count
//   optimizer   AdamW's two fp32 moments, / dp with the distributed optimizer (none for SGD)
//   activations what backward keeps per token and layer (norm inputs and outputs, q/k/v, the
//               attention output, the FFN's inputs and outputs in the compute dtype; the attention
//               scores and probabilities, which the ATen path materialises) / tp, for the layers of
//               one stage and the micro-batches a stage holds at once (1, or pp under 1F1B); with
//               full recomputation only each layer's input plus one layer's full set; with
//               activation offload (train.offload_fraction r) on a GPU, applied to every
//               micro-batch, the offloaded blocks' saved tensors leave the device except the two
//               that backward has brought back
//   logits      the output head's fp32 logits, their log-softmax and gradient for one micro-batch
// and compares it with the memory the rank may use: free GPU memory (plus what this process's
// caching allocator holds unused), or on CPU the host's available memory (MemAvailable, capped by
// the cgroup limit less its working set) shared by the ranks of the node; every rank measures
// before any allocates and all use the smallest figure, so they decide together. The state
// (parameters, gradients and optimizer) is exact to within the small replicated norms: when it
// alone does not fit the job is refused (kConfig) with the breakdown and what to change. The
// activations are an estimate: when only the total exceeds the memory it is a warning.
#pragma once

#include <ATen/ATen.h>

#include <string>

#include "loom/comm/communicator.h"
#include "loom/config.pb.h"
#include "loom/mesh/parallel_dims.h"
#include "loom/model/model_spec.h"

namespace loom::train {

struct MemoryEstimate {
  double parameters = 0;
  double gradients = 0;
  double optimizer = 0;
  double activations = 0;
  double logits = 0;
  // What one layer saves for backward per token of a micro-batch (full recomputation: its input),
  // before activation offload takes its share (train.offload_fraction of the blocks).
  double layer_bytes_per_token = 0;
  double state() const { return parameters + gradients + optimizer; }
  double total() const { return state() + activations + logits; }
  // "parameters 1.2 GiB, gradients 1.2 GiB, optimizer 2.4 GiB, activations ~3.1 GiB, logits ..."
  std::string describe() const;
};

MemoryEstimate estimate_memory(const model::ModelSpec& spec, const config::JobConfig& job,
                               const mesh::ParallelDims& dims);

// Bytes this rank may use on `device`: free GPU memory, or the host's available memory (capped by
// the cgroup's limit) / `local_ranks`. < 0 when unknown.
double available_memory(at::Device device, int local_ranks);

// Ranks of `world` on this node (the same host name), whatever the launcher. Collective.
int ranks_on_this_node(comm::Communicator* world);

// Throws kConfig when the state alone exceeds `available`; warns when the total does; logs the
// estimate otherwise. `available` < 0: only logs.
void check_memory(const MemoryEstimate& need, double available, at::Device device, int local_ranks);

}  // namespace loom::train
