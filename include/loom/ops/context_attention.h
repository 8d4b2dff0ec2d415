// Context-parallel attention: ring (p2p), all-to-all (Ulysses) and hierarchical (a2a+p2p) over the
// blockwise kernel ([Note: context-parallel attention], [Note: blockwise attention]).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "loom/ops/attention.h"
#include "loom/parallel/context_parallel.h"

namespace loom::ops {

// Causal attention of this CP rank's tokens. q [b, nh, n, d] and k, v [b, nkv, n, d] hold this
// rank's n tokens (the heads of its TP rank); `cp_index` and `cp_doc` [cp, b, n] give every CP
// rank's tokens' global indices and documents (Note: balanced context-parallel split). Returns
// [b, nh, n, d] in q's dtype; differentiable (backward communicates over the same groups, so every
// CP rank must run it). Without CP: blockwise_attention of the tokens.
at::Tensor context_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const at::Tensor& cp_index, const at::Tensor& cp_doc,
                             const parallel::ContextParallel& cp, int64_t block);

// What context-parallel attention moved and waited for on this process (since the last reset).
struct CpCounters {
  int64_t kv_bytes = 0;       // K and V sent around the ring (forward and backward)
  int64_t grad_bytes = 0;     // dK and dV sent around the ring
  int64_t hidden_bytes = 0;   // of those, hops complete when the compute they overlap ended
  int64_t a2a_bytes = 0;      // sent by the all-to-alls (both directions, forward and backward)
  double ring_compute_s = 0;  // block compute while a ring transfer was in flight
  double ring_wait_s = 0;     // waiting for a ring transfer after that compute
  int64_t tiles_full = 0, tiles_masked = 0, tiles_skipped = 0;
};
CpCounters& cp_counters();

}  // namespace loom::ops
