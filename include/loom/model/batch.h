// One micro-batch as the model sees it.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <memory>
#include <vector>

namespace loom::parallel {
struct ContextParallel;
}

namespace loom::model {

struct Batch {
  at::Tensor tokens;        // [b, s] int64 inputs
  at::Tensor targets;       // [b, s] int64 next tokens
  at::Tensor loss_mask;     // [b, s] float (1 = counts); undefined = every position counts
  at::Tensor position_ids;  // [b, s] int64; undefined = 0 .. s-1 in every row
  at::Tensor doc_ids;       // [b, s] int64 document index; undefined = one document per row
  // [b, s] bool, true at positions that only pad a row (packed rows padded to a multiple of tp x
  // cp); undefined = none. They are computed like any token but count in no loss and no MoE
  // statistic.
  at::Tensor padding;
  // [b, s] int64: the blended data source each position comes from (DataSource::source_of; the
  // loader fills it when the data has several); undefined = one source. Only statistics read it
  // (Note: expert specialisation).
  at::Tensor source;
  // Context parallelism (cp_shard): every CP rank's tokens' global indices and documents,
  // [cp, b, s_local] int64; undefined without CP. The fields above then hold this rank's tokens.
  at::Tensor cp_index;
  at::Tensor cp_doc;
  // Hybrid data parallelism: the group of pool ranks this micro-batch's sequence runs on with ring
  // attention (a view of the pool: Note: group views), used instead of the model's CP group, with
  // cp_index / cp_doc over its members. Null: the model's CP group (or none).
  std::shared_ptr<const parallel::ContextParallel> cp_group;
  // Selective activation offload (Note: activation offload): the share of each model chunk's
  // blocks (the first model::offloaded_layers(offload, blocks)) whose saved activations go to host
  // memory during a training forward. 0: none.
  double offload = 0;

  int64_t batch_size() const { return tokens.size(0); }
  int64_t seq_len() const { return tokens.size(1); }
  // Positions whose loss counts (the loss mask's sum, or b * s).
  int64_t num_loss_tokens() const;
  Batch to(at::Device device) const;
};

// [Note: packed sequences]
// A row of a batch may hold several documents back to back. `cu_seqlens` gives, per row, the
// cumulative document lengths starting at 0 and ending at s ({0, 5, 12, 16} = three documents of
// 5, 7 and 4 tokens in a row of 16). The batch then carries doc_ids (attention stays inside a
// document: position i attends to j <= i with doc[j] == doc[i]) and position_ids that restart at
// 0 at each document start (RoPE and learned positions see each document from position 0). This is
// how the balance scheduler's variable-length micro-batches reach the model: the result equals
// running each document alone, which tests/model checks.
Batch packed_batch(const at::Tensor& tokens, const at::Tensor& targets,
                   const std::vector<std::vector<int64_t>>& cu_seqlens);

// This CP rank's share of a micro-batch (Note: balanced context-parallel split): tokens, targets,
// loss mask, position ids (global: gathered from the whole row) and doc ids of its s / cp tokens
// of each row, with every rank's token tables in cp_index / cp_doc. cp = 1 returns `full`.
Batch cp_shard(const Batch& full, int cp, int rank);

}  // namespace loom::model
