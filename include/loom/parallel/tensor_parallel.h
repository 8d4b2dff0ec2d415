// Tensor and sequence parallelism (Megatron-LM, Shoeybi et al. 2019; Korthikanti et al. 2022).
//
// [Note: tensor-parallel regions]
// The f/g conjugate pairs of the Megatron paper, as autograd functions over the TP communicator:
//   copy_to_tp           forward identity,             backward all-reduce      (f: enters a TP region)
//   reduce_from_tp       forward all-reduce,           backward identity        (g: leaves it)
//   scatter_last_dim     forward keep this rank's slice of the last dim, backward all-gather it
//   gather_last_dim      forward all-gather the last dim,            backward keep the slice
// and, with sequence parallelism, along dim 0 (the sequence of [s, b, h] activations):
//   scatter_to_sp        forward keep this rank's sequence chunk,    backward all-gather
//   gather_from_sp       forward all-gather the sequence,            backward reduce-scatter
//   reduce_scatter_to_sp forward reduce-scatter the sequence,        backward all-gather
// With SP on, gather_from_sp replaces copy_to_tp before a column-parallel linear and
// reduce_scatter_to_sp replaces reduce_from_tp after a row-parallel one. With a TP group of one
// (or none) every region is the identity.
#pragma once

#include <ATen/ATen.h>

#include "loom/comm/communicator.h"

namespace loom::parallel {

// The tensor-parallel group a model is built over. `comm` null means no tensor parallelism.
struct TensorParallel {
  comm::CommunicatorPtr comm;
  bool sequence_parallel = false;
  // Column-parallel linears start their backward collective (the input all-gather under SP, the
  // input-gradient all-reduce or reduce-scatter) asynchronously and compute a GEMM while it runs.
  bool overlap_comm = true;

  int size() const { return comm ? comm->size() : 1; }
  int rank() const { return comm ? comm->rank() : 0; }
  bool enabled() const { return size() > 1; }
  bool sp() const { return sequence_parallel && enabled(); }
};

at::Tensor copy_to_tp(const at::Tensor& x, const TensorParallel& tp);
at::Tensor reduce_from_tp(const at::Tensor& x, const TensorParallel& tp);
at::Tensor scatter_last_dim(const at::Tensor& x, const TensorParallel& tp);
at::Tensor gather_last_dim(const at::Tensor& x, const TensorParallel& tp);
at::Tensor scatter_to_sp(const at::Tensor& x, const TensorParallel& tp);
at::Tensor gather_from_sp(const at::Tensor& x, const TensorParallel& tp);
at::Tensor reduce_scatter_to_sp(const at::Tensor& x, const TensorParallel& tp);

// Entering / leaving a column-then-row-parallel pair: the SP or the plain variant.
inline at::Tensor enter_tp_region(const at::Tensor& x, const TensorParallel& tp) {
  return tp.sp() ? gather_from_sp(x, tp) : copy_to_tp(x, tp);
}
inline at::Tensor leave_tp_region(const at::Tensor& x, const TensorParallel& tp) {
  return tp.sp() ? reduce_scatter_to_sp(x, tp) : reduce_from_tp(x, tp);
}

// [Note: column-parallel linear]
// enter_tp_region followed by a linear, as one autograd function (Megatron-Core's
// LinearWithGradAccumulationAndAsyncCommunication). x: [s, b, in] (this rank's sequence chunk under
// SP), weight: [out/tp, in] (already in x's dtype), bias: [out/tp] or undefined. Forward all-gathers x
// under SP and keeps only the local chunk for backward, so SP stores 1/tp of the input activation.
// Backward, when tp.overlap_comm:
//   SP:     start all-gather(x) | grad_x = grad_y W         | wait | start reduce-scatter(grad_x)
//           | grad_W = grad_y^T x_total                      | wait
//   no SP:  grad_x = grad_y W | start all-reduce(grad_x) | grad_W = grad_y^T x | wait
// so each collective runs behind a GEMM (on its own stream with NCCL; on MPI it progresses as far as
// the MPI library progresses it without calls). Without overlap the same operations run one after
// another; the results are bit-identical either way.
at::Tensor column_parallel_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                  const TensorParallel& tp);

// Forward identity, backward multiplies the gradient by `factor` (a loss computed identically on
// every TP rank whose gradient the regions would otherwise sum tp times).
at::Tensor scale_gradient(const at::Tensor& x, double factor);

// [Note: vocab-parallel cross-entropy]
// logits [N, Vl] are this rank's columns [vocab_start, vocab_start + Vl) of the padded vocabulary;
// columns at or beyond `vocab_size` are padding and take no part in the softmax. Per-token loss [N]
// in fp32: the row max, the target's logit and the sum of exp are all-reduced over TP, so the full
// logits never exist on one rank. Backward: softmax - one_hot(target), on the local columns.
at::Tensor vocab_parallel_cross_entropy(const at::Tensor& logits, const at::Tensor& targets,
                                        int64_t vocab_start, int64_t vocab_size, const TensorParallel& tp);

}  // namespace loom::parallel
