// A trainable parameter as the parallel layer sees it: its stable global name, the local tensor,
// the global shape and how the tensor is sharded over tensor parallelism (DESIGN.md decision 6).
// Gradient reduction (data_parallel.h, grad_sync.h), the distributed optimizer and checkpoints
// work on these without knowing the model that made them.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <string>
#include <vector>

#include "loom/comm/communicator.h"

namespace loom::parallel {

// [Note: tensor-parallel shards]
// A parameter split over the TP group keeps, on each rank, the rank's part of dimension `dim` of
// the full tensor after zero-padding that dimension to `padded` (the vocabulary rows). When the
// dimension is made of `blocks` equal blocks (SwiGLU's [gate | up] rows), each block is split and
// the rank's parts are concatenated, so a column-parallel SwiGLU keeps its gate and up halves
// together. Replicated parameters (dim -1) whose gradients are partial sums on each TP rank (norm
// weights under sequence parallelism, the MoE router) set `tp_partial_grad`; their gradients are
// all-reduced over TP after backward.
struct TpShard {
  int dim = -1;  // -1: replicated over TP
  int64_t blocks = 1;
  int64_t padded = 0;  // the padded size of `dim` (0: no padding)
  bool partial_grad = false;
};

struct Parameter {
  std::string name;
  at::Tensor tensor;  // the trainable leaf (requires_grad), master dtype
  std::vector<int64_t> global_shape;
  bool weight_decay = true;  // false for norms, biases (and 1-D tensors generally)
  TpShard shard;
  int tp_size = 1, tp_rank = 0;
  // Another pipeline stage owns this parameter and this rank holds a copy that the trainer keeps
  // equal to it (the tied embedding used as the head on the last stage: [Note: pipeline stages]).
  // Norms and checkpoints count the owner's only.
  bool pipeline_copy = false;
  // An expert weight ([E, ...]): dimension 0 split contiguously over the ep ranks of the expert
  // group (this rank: experts [ep_rank E / ep, (ep_rank + 1) E / ep)), then `shard` over the
  // expert-TP ranks (tp_size / tp_rank are then expert_tp's). Its gradient is reduced over the
  // expert-data-parallel group (Note: expert parallelism).
  bool expert = false;
  int ep_size = 1, ep_rank = 0;

  bool tp_sharded() const { return shard.dim >= 0 && tp_size > 1; }
  bool ep_sharded() const { return expert && ep_size > 1; }
};

// This rank's shard of a full tensor (Note: tensor-parallel shards).
at::Tensor shard_of(const at::Tensor& full, const TpShard& shard, int tp_size, int tp_rank);
// This rank's part of the full tensor of `p`: its experts (ep_sharded), then its TP shard.
at::Tensor local_of(const at::Tensor& full, const Parameter& p);
// The full tensor from every rank's shard (in TP rank order), padding removed.
at::Tensor unshard(const std::vector<at::Tensor>& shards, const TpShard& shard,
                   at::IntArrayRef global_shape);

// The full (unpadded) tensor of parameter `p` whose local value (or optimizer state, or gradient)
// is `local`: gathered over `tp` for TP-sharded parameters, `local` itself otherwise. Collective
// over `tp` for sharded parameters (`tp` may be null when nothing is sharded).
at::Tensor full_tensor(const Parameter& p, const at::Tensor& local, comm::Communicator* tp);

}  // namespace loom::parallel
