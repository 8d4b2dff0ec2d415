// Global gradient-norm clipping.
#pragma once

#include <vector>

#include "loom/comm/communicator.h"
#include "loom/model/parameter.h"

namespace loom::optim {

// The L2 norm of all gradients together (computed in fp64 on the host side of the sum, fp32 per
// tensor, or fp64 for fp64 gradients); undefined gradients count as zero. Every parameter counts
// exactly once: the squared sums of TP-sharded parameters are all-reduced over `tp` (each rank holds
// a disjoint slice; zero padding rows add nothing), those of replicated ones are taken once (their
// gradients are equal on every rank once the partial sums are reduced). Pipeline stages hold
// disjoint parameters: their totals are all-reduced over `pp`, and a stage's copy of another
// stage's parameter (Parameter::pipeline_copy) is left out. Data-parallel replicas hold the same
// reduced gradients and need no reduction.
double grad_norm(const std::vector<model::Parameter>& params, comm::Communicator* tp = nullptr,
                 comm::Communicator* pp = nullptr);

// Scales every gradient by max_norm / (norm + 1e-6) when the norm exceeds max_norm (max_norm > 0).
// Returns the norm before clipping. A non-finite norm is returned unchanged and nothing is scaled:
// the caller decides (the trainer stops with a message naming the step).
double clip_grad_norm(const std::vector<model::Parameter>& params, double max_norm, comm::Communicator* tp = nullptr,
                      comm::Communicator* pp = nullptr);

}  // namespace loom::optim
