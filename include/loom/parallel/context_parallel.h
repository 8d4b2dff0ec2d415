// Context parallelism: the sequence of every micro-batch split over the ranks of the CP group.
//
// [Note: balanced context-parallel split]
// Causal attention makes late tokens expensive (a token attends to every earlier one), so a
// contiguous split gives the last rank ~2cp-1 times the first one's work. Megatron-Core's balanced
// split cuts the sequence into 2 x cp chunks and gives rank r chunks r and 2cp-1-r. Loom does that
// per document of a packed row, for documents of any length:
//   - a document longer than a rank's token share, or whose attention work alone (L(L+1)/2 key
//     visits) exceeds 1/8 of a rank's share of the row's work while it is at least 16 cp tokens
//     long (pieces of 8 tokens or more), is cut into 2 x cp pieces as equal as the length allows
//     (no padding: pieces differ by one token, and may be empty), zig-zag as above (the 1/8 was
//     measured: with it the busiest rank of a long-tail document mix does <= 3% more work than
//     the mean at cp 2-8, against 6% at 1/4 and 22% at 1, cp_bench);
//   - the other (short) documents are placed whole, longest first, on the rank with the least work
//     that has room for them (so a short document is not cut and its attention stays on one rank);
//   - a document that fits nowhere whole fills the ranks' remaining room, least-loaded first; and
//     a rank whose zig-zag pieces exceed its share gives the excess tokens to ranks with room.
// Every rank ends with exactly s / cp tokens of each row (equal activation memory), in increasing
// global order. Attention is computed from each token's global index and document
// ([Note: blockwise attention]), so any split gives the single process's result; the split only
// decides the balance. Position ids (RoPE, learned positions) are gathered from the whole row, so
// they stay global. The split is a pure function of the row's documents: every CP rank computes
// all ranks' indices from the same micro-batch, with no communication.
//
// [Note: context-parallel attention]
// parallel.cp_comm_type picks how the ranks' keys and values meet:
//   p2p     (ring attention): K and V of the KV heads travel around the CP ring, cp - 1 hops, each
//           sent while the current block is computed (double buffered); partial outputs merge by
//           their log-sum-exp. Backward sends K and V round again, and each block's dK/dV travels
//           with it and arrives home after cp hops.
//   a2a     (Ulysses): one all-to-all scatters heads and gathers the sequence; every rank attends
//           over the whole sequence for heads/cp of its heads; one all-to-all back. KV heads fewer
//           than cp are replicated (cp must be a multiple of them).
//   a2a+p2p (hierarchical, as USP): all-to-all inside groups of parallel.cp_a2a_size consecutive CP
//           ranks, ring across the groups.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <string>
#include <vector>

#include "loom/comm/communicator.h"

namespace loom::parallel {

enum class CpCommType { kP2P, kA2A, kA2AP2P };

// "p2p", "a2a", "a2a+p2p" (kConfig error naming parallel.cp_comm_type otherwise).
CpCommType parse_cp_comm_type(const std::string& s);
const char* cp_comm_type_name(CpCommType t);

// The context-parallel group a model is built over. `comm` null (or size 1): no CP.
struct ContextParallel {
  comm::CommunicatorPtr comm;
  CpCommType type = CpCommType::kP2P;
  comm::CommunicatorPtr a2a;   // all-to-all group: CP ranks [g a, g (a+1)) (null: none)
  comm::CommunicatorPtr ring;  // ring group: CP ranks with the same rank % g (null: none)
  int64_t block = 0;           // attention tile in tokens (0 = default)

  int size() const { return comm ? comm->size() : 1; }
  int rank() const { return comm ? comm->rank() : 0; }
  bool enabled() const { return size() > 1; }
  int a2a_size() const { return a2a ? a2a->size() : 1; }
  int ring_size() const { return ring ? ring->size() : 1; }
};

// Splits the groups the comm type needs (collective over `cp`). `a2a_size`: the all-to-all group
// size for a2a+p2p (it must divide cp and lie strictly between 1 and cp); ignored otherwise.
ContextParallel make_context_parallel(comm::CommunicatorPtr cp, CpCommType type, int a2a_size,
                                      int64_t block = 0);

// Checks that `heads` query and `kv_heads` KV heads per TP rank can be split by the all-to-all of
// size `g`; a kConfig error with the arithmetic otherwise.
void check_cp_heads(int64_t heads, int64_t kv_heads, int g, int tp);

// The balanced split of a [b, s] batch over cp ranks: [cp, b, s / cp] int64 global token indices,
// increasing along each rank's row. `doc_ids` [b, s] (CPU int64, non-decreasing along a row) or
// undefined (one document per row). s % cp must be 0.
at::Tensor balanced_cp_index(const at::Tensor& doc_ids, int64_t b, int64_t s, int cp);
// The naive split (rank r: tokens [r s/cp, (r+1) s/cp)), for comparison.
at::Tensor contiguous_cp_index(int64_t b, int64_t s, int cp);
// Attention work (key visits: 1 + the token's offset in its document) of each rank under a split
// `index` [cp, b, n] of a batch with `doc_ids` [b, s] (undefined: one document per row).
std::vector<double> cp_attention_work(const at::Tensor& index, const at::Tensor& doc_ids);

}  // namespace loom::parallel
