// Global gradient-norm clipping.
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "loom/comm/communicator.h"
#include "loom/model/parameter.h"

namespace loom::optim {

// The L2 norm of all gradients together (computed in fp64 on the host side of the sum, fp32 per
// tensor, or fp64 for fp64 gradients); undefined gradients count as zero. Every parameter counts
// exactly once: the squared sums of TP-sharded parameters are all-reduced over `tp` (each rank
// holds a disjoint slice; zero padding rows add nothing), those of replicated ones are taken once
// (their gradients are equal on every rank once the partial sums are reduced). Pipeline stages hold
// disjoint parameters: their totals are all-reduced over `pp`, and a stage's copy of another
// stage's parameter (Parameter::pipeline_copy) is left out. Data-parallel replicas hold the same
// reduced gradients and need no reduction.
double grad_norm(const std::vector<model::Parameter>& params, comm::Communicator* tp = nullptr,
                 comm::Communicator* pp = nullptr);

// [replicated over TP, TP-sharded] squared sums (fp64, CPU) of the gradients of `params`, as
// grad_norm counts them before its reductions.
at::Tensor grad_square_sums(const std::vector<model::Parameter>& params);

// The norm from [replicated, TP-sharded] squared sums: the sharded part all-reduced over `tp`, the
// total over `pp` (either may be null). Collective over both.
double norm_of_square_sums(const at::Tensor& sums, comm::Communicator* tp, comm::Communicator* pp);

// Scales every gradient by max_norm / (norm + 1e-6) when the norm exceeds max_norm (max_norm > 0).
// Returns the norm before clipping. A non-finite norm is returned unchanged and nothing is scaled:
// the caller decides (the trainer stops with a message naming the step).
double clip_grad_norm(const std::vector<model::Parameter>& params, double max_norm,
                      comm::Communicator* tp = nullptr, comm::Communicator* pp = nullptr);

// The clipping coefficient for `norm` (1 when no clipping applies: max_norm <= 0, a non-finite
// norm, or a norm within the limit).
double clip_coefficient(double norm, double max_norm);

}  // namespace loom::optim
