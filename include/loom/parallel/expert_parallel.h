// Expert parallelism: the MoE layer's experts spread over the ep ranks of an expert group, each
// expert's FFN split over expert_tp of them, and the token dispatcher that moves each routed token
// to the ranks holding its expert and back (Megatron-Core's all-to-all dispatcher).
//
// [Note: expert parallelism]
// The expert group (the mesh's tp_ep group: expert_tp x ep ranks of one pipeline stage, carved from
// dp x cp as the expert folding of ProcessGroups says) holds each expert exactly once: expert e
// lives on the expert_tp ranks with ep index e / (E / ep), each with its expert_tp slice of the
// FFN (fc1's [gate | up] rows and fc2's columns, as a column-then-row parallel SwiGLU). Every rank
// routes its own tokens (distinct across the group: different micro-batches over DP, different
// sequence pieces over CP), then:
//   1. sorts its (token, expert) assignments by expert (capacity drops applied here, per rank);
//   2. exchanges the per-expert counts with one small all-to-all, so each rank knows how many rows
//      it receives from each source for each of its local experts;
//   3. all-to-all of the token rows: the rows for ep index q go to every expert_tp rank of q;
//   4. runs each local expert once over the rows every source sent it (one grouped computation);
//   5. all-to-all back (the reverse splits); the expert_tp ranks' returned rows are partial sums of
//      the same outputs and are added; the gates weight them and they are scattered back to their
//      tokens.
// The all-to-alls are autograd functions whose backward is the reverse exchange, so the gradient
// of each expert's weights is the sum over every token that reached it from the group, and the
// expert-data-parallel reduction (over the ranks holding the same expert shard) completes it.
// Experts that receive no row, and ranks that send or receive none, take part with empty blocks.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

#include "loom/comm/communicator.h"
#include "loom/parallel/sharding.h"

namespace loom::parallel {

struct ExpertParallel {
  comm::CommunicatorPtr comm;   // the expert group (expert_tp x ep); null: no expert parallelism
  int ep = 1, ep_rank = 0;      // expert-parallel size and this rank's ep index
  int etp = 1, etp_rank = 0;    // expert tensor parallelism
  std::vector<int> member_ep;   // the ep index of each rank of `comm`
  std::vector<int> member_etp;  // the expert-TP rank of each rank of `comm`
  // With dense tensor (and sequence) parallelism: the tp x cp ranks that split one micro-batch's
  // tokens, each routing and dispatching its own sequence shard; the micro-batch's balance
  // statistics are summed over them (Note: expert parallelism with tensor parallelism). Null
  // without TP (CP's group sums them then).
  comm::CommunicatorPtr tokens;
  bool enabled() const { return comm != nullptr && comm->size() > 1; }
  int size() const { return enabled() ? comm->size() : 1; }
};

// Collective over `group` (the expert group; null or one rank: disabled): records each member's ep
// index. `ep` x `etp` must equal the group's size.
ExpertParallel make_expert_parallel(comm::CommunicatorPtr group, int ep, int ep_rank, int etp,
                                    int etp_rank);

// All-to-all of rows as an autograd function: rows [sum(send), ...] of `x` go out in rank order,
// `send[i]` to rank i; the result has sum(recv) rows, `recv[i]` from rank i. Backward is the
// reverse exchange of the gradient.
at::Tensor all_to_all_rows(const at::Tensor& x, const std::vector<int64_t>& send,
                           const std::vector<int64_t>& recv, comm::Communicator& comm);

// The full tensor [E, ...] of expert weight `p` (Parameter::ep_sharded) whose local value (or
// optimizer state, or gradient) is `local`: every member's part gathered over the expert group,
// each ep index's expert-TP shards joined (Note: tensor-parallel shards), the ep indices' experts
// stacked in order. Collective over `ep.comm`.
at::Tensor expert_full_tensor(const Parameter& p, const at::Tensor& local,
                              const ExpertParallel& ep);

// Bytes the dispatcher's row all-to-alls moved to other ranks (forward and backward, this
// process), for benchmarks; reset by assigning 0.
int64_t& dispatcher_bytes();

}  // namespace loom::parallel
