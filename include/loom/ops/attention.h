// Blockwise causal attention with an online softmax: the building block of context parallelism and
// of long sequences on one rank.
//
// [Note: blockwise attention]
// Queries and keys are cut into tiles of `block` tokens. For each query tile, the key tiles are
// visited one at a time and folded into a running state (out, lse): the tile's scores
// s = q k^T / sqrt(d) give lse_t = logsumexp(s) and out_t = softmax(s) v, and
//   lse' = log(exp(lse) + exp(lse_t)),   out' = out exp(lse - lse') + out_t exp(lse_t - lse')
// (FlashAttention's rescaling, written with log-sum-exps so that a tile where a query sees no key,
// lse_t = -inf, changes nothing). Statistics and accumulators are fp32 (fp64 for fp64 inputs);
// memory is O(tokens x block) instead of O(tokens^2). Backward recomputes each tile's
// probabilities from the final lse: p = exp(s - lse), dv += p^T do, ds = p (do v^T - delta) with
// delta = rowsum(do * out), dq += ds k / sqrt(d), dk += ds^T q / sqrt(d).
//
// Which key a query sees is decided by two integers per token, not by where the tokens sit in the
// tensors: a query attends to a key of the same document whose index (its position in the global,
// unsplit row) is not larger than its own. So the tokens of a rank may be any subset of a row in
// any order (context-parallel chunks, all-to-all gathered shards). Tiles are classified from the
// tokens' index and document ranges: a tile no query of which sees any key (above the causal
// diagonal, or other documents) is skipped, a tile every query of which sees every key is computed
// without a mask, the rest with one.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <functional>

namespace loom::ops {

// Per-token attention coordinates of a set of tokens of a [b, s] batch.
struct TokenInfo {
  at::Tensor index;  // [b, n] int64: the token's position in its global row
  at::Tensor doc;    // [b, n] int64: its document in the row
  int64_t size() const { return index.size(1); }
};

// Tokens 0 .. s-1 of each row, with `doc_ids` [b, s] (undefined: one document per row).
TokenInfo row_tokens(int64_t b, int64_t s, const at::Tensor& doc_ids, at::Device device);

// How many key tiles an attention pass computed, computed with a mask, and skipped.
struct TileCounts {
  int64_t full = 0, masked = 0, skipped = 0;
};

// Online-softmax state of queries q [b, nh, n, d]: out [b, nh, n, d] (normalised) and lse
// [b, nh, n] in the statistics dtype. Start from empty_state().
struct AttentionState {
  at::Tensor out;
  at::Tensor lse;
};
AttentionState empty_state(const at::Tensor& q);

// Folds keys k, v [b, nkv, m, d] (tokens `kt`) into the state of queries q [b, nh, n, d] (tokens
// `qt`), tile by tile (`block` tokens; <= 0: one tile). nkv divides nh (query head j uses KV head
// j / (nh / nkv)). `progress` (optional) runs after every computed tile: ring attention polls its
// transfers there, which is what moves a CPU MPI transfer along while the tiles compute.
void attention_fold(const at::Tensor& q, const TokenInfo& qt, const at::Tensor& k,
                    const at::Tensor& v, const TokenInfo& kt, int64_t block, AttentionState& state,
                    TileCounts* counts = nullptr, const std::function<void()>& progress = {});

// The gradient contributions of one key set given the final state: adds to dq [b, nh, n, d] and
// dk, dv [b, nkv, m, d] (statistics dtype). `dout` [b, nh, n, d] and `delta` = rowsum(dout * out)
// [b, nh, n] in the statistics dtype.
void attention_fold_backward(const at::Tensor& q, const TokenInfo& qt, const at::Tensor& k,
                             const at::Tensor& v, const TokenInfo& kt, int64_t block,
                             const at::Tensor& lse, const at::Tensor& dout, const at::Tensor& delta,
                             at::Tensor& dq, at::Tensor& dk, at::Tensor& dv,
                             TileCounts* counts = nullptr,
                             const std::function<void()>& progress = {});

// Causal attention of the tokens `tok` of q, k, v among themselves ([b, nh, n, d], [b, nkv, n,
// d]), blockwise forward and backward (an autograd op). Equals causal_attention for row tokens.
at::Tensor blockwise_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const TokenInfo& tok, int64_t block);

// The statistics dtype of an attention input: fp32, or fp64 for fp64 inputs.
at::ScalarType attention_stat_dtype(const at::Tensor& x);

}  // namespace loom::ops
