// Global gradient-norm clipping.
#pragma once

#include <vector>

#include "loom/model/parameter.h"

namespace loom::optim {

// The L2 norm of all gradients together (computed in fp64 on the host side of the sum, fp32 per
// tensor, or fp64 for fp64 gradients); undefined gradients count as zero. Once sharding exists,
// each shard's squared sum is reduced over its groups before the square root.
double grad_norm(const std::vector<model::Parameter>& params);

// Scales every gradient by max_norm / (norm + 1e-6) when the norm exceeds max_norm (max_norm > 0).
// Returns the norm before clipping. A non-finite norm is returned unchanged and nothing is scaled:
// the caller decides (the trainer stops with a message naming the step).
double clip_grad_norm(const std::vector<model::Parameter>& params, double max_norm);

}  // namespace loom::optim
