#include "loom/ops/context_attention.h"

#include <torch/csrc/autograd/custom_function.h>

#include <vector>

#include "../parallel/autograd_comm.h"
#include "loom/core/error.h"
#include "loom/core/timer.h"

namespace loom::ops {

CpCounters& cp_counters() {
  static CpCounters c;
  return c;
}

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Ring transfers are matched by tag (MPI order within a tag): keys/values and their gradients.
constexpr int kKvTag = 16001;
constexpr int kGradTag = 16002;

// The communicator travels through autograd as a raw pointer; the model that owns the
// ContextParallel outlives every backward pass of its forward (as for TensorParallel).
using parallel::detail::from_handle;
using parallel::detail::handle;

int64_t bytes_of(const at::Tensor& t) { return t.numel() * static_cast<int64_t>(t.element_size()); }

// ---- all-to-all between the sequence and the heads (Ulysses) ----

// x [b, H, n, d] (this rank's n tokens, all H heads) -> [b, H/g, g n, d] (heads group `rank`, the
// tokens of every rank of the group, rank-major).
at::Tensor seq_to_heads_impl(const at::Tensor& x, comm::Communicator& c) {
  const int64_t g = c.size(), b = x.size(0), h = x.size(1), n = x.size(2), d = x.size(3);
  at::Tensor in = x.reshape({b, g, h / g, n, d}).permute({1, 0, 2, 3, 4}).contiguous();
  at::Tensor out = at::empty_like(in);
  c.all_to_all(out, in);
  cp_counters().a2a_bytes += bytes_of(in) * (g - 1) / g;
  return out.permute({1, 2, 0, 3, 4}).reshape({b, h / g, g * n, d});
}

// The inverse: y [b, h, g n, d] -> [b, g h, n, d].
at::Tensor heads_to_seq_impl(const at::Tensor& y, comm::Communicator& c) {
  const int64_t g = c.size(), b = y.size(0), h = y.size(1), n = y.size(2) / g, d = y.size(3);
  at::Tensor in = y.reshape({b, h, g, n, d}).permute({2, 0, 1, 3, 4}).contiguous();
  at::Tensor out = at::empty_like(in);
  c.all_to_all(out, in);
  cp_counters().a2a_bytes += bytes_of(in) * (g - 1) / g;
  return out.permute({1, 0, 2, 3, 4}).reshape({b, g * h, n, d});
}

struct SeqToHeads : public torch::autograd::Function<SeqToHeads> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, int64_t comm) {
    ctx->saved_data["comm"] = comm;
    return {seq_to_heads_impl(x, *reinterpret_cast<comm::Communicator*>(comm))};
  }
  static variable_list backward(AutogradContext* ctx, variable_list g) {
    return {heads_to_seq_impl(g[0], from_handle(ctx)), at::Tensor()};
  }
};

struct HeadsToSeq : public torch::autograd::Function<HeadsToSeq> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& y, int64_t comm) {
    ctx->saved_data["comm"] = comm;
    return {heads_to_seq_impl(y, *reinterpret_cast<comm::Communicator*>(comm))};
  }
  static variable_list backward(AutogradContext* ctx, variable_list g) {
    return {seq_to_heads_impl(g[0], from_handle(ctx)), at::Tensor()};
  }
};

// ---- ring attention ----

// A transfer around the ring: send `out` to the next rank, receive into a fresh buffer from the
// previous one.
struct RingHop {
  comm::WorkPtr work;
  at::Tensor incoming;
  int64_t bytes = 0;
};

RingHop start_hop(comm::Communicator& c, const at::Tensor& out, int tag) {
  const int n = c.size(), r = c.rank();
  RingHop h;
  h.incoming = at::empty_like(out);
  h.work = c.batch_isend_irecv({comm::P2POp::send(out, (r + 1) % n, tag),
                                comm::P2POp::recv(h.incoming, (r + n - 1) % n, tag)});
  h.bytes = bytes_of(out);
  (tag == kKvTag ? cp_counters().kv_bytes : cp_counters().grad_bytes) += h.bytes;
  return h;
}

// Waits for a hop; a hop already complete when its compute ended was hidden behind it.
void finish_hop(RingHop& h) {
  if (h.work->is_completed()) {
    cp_counters().hidden_bytes += h.bytes;
    return;
  }
  const Stopwatch waited;
  h.work->wait();
  cp_counters().ring_wait_s += waited.seconds();
}

// Polls the transfers in flight between tiles: an MPI transfer between CPU ranks moves only inside
// MPI calls, so without this it would wait for the next wait() and nothing would overlap.
std::function<void()> poll(std::vector<RingHop*> hops) {
  return [hops] {
    for (RingHop* h : hops) {
      if (h->work) h->work->is_completed();
    }
  };
}

void count_tiles(const TileCounts& t) {
  auto& c = cp_counters();
  c.tiles_full += t.full;
  c.tiles_masked += t.masked;
  c.tiles_skipped += t.skipped;
}

// q [b, nh, n, d], k, v [b, nkv, n, d] of ring member `rank`; index, doc [R, b, n]: the tokens of
// every ring member.
struct RingAttention : public torch::autograd::Function<RingAttention> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k,
                               const at::Tensor& v, const at::Tensor& index, const at::Tensor& doc,
                               int64_t comm, int64_t block) {
    auto& c = *reinterpret_cast<comm::Communicator*>(comm);
    const int n = c.size(), r = c.rank();
    const TokenInfo mine{index[r], doc[r]};
    AttentionState st = empty_state(q);
    at::Tensor kv = at::stack({k, v}).contiguous();  // [2, b, nkv, n, d], travels whole
    TileCounts tiles;
    for (int i = 0; i < n; ++i) {
      const int j = (r - i + n) % n;  // the ring member whose keys this rank holds now
      RingHop hop;
      if (i + 1 < n) {
        hop = start_hop(c, kv, kKvTag);
      }
      const Stopwatch compute;
      attention_fold(q, mine, kv[0], kv[1], TokenInfo{index[j], doc[j]}, block, st, &tiles,
                     poll({&hop}));
      if (hop.work) {
        cp_counters().ring_compute_s += compute.seconds();
        finish_hop(hop);
        kv = hop.incoming;
      }
    }
    count_tiles(tiles);
    ctx->save_for_backward({q, k, v, st.out, st.lse, index, doc});
    ctx->saved_data["comm"] = comm;
    ctx->saved_data["block"] = block;
    return {st.out.to(q.scalar_type())};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const at::Tensor &q = s[0], &k = s[1], &v = s[2], &out = s[3], &lse = s[4], &index = s[5],
                     &doc = s[6];
    auto& c = from_handle(ctx);
    const int64_t block = ctx->saved_data["block"].toInt();
    const int n = c.size(), r = c.rank();
    const TokenInfo mine{index[r], doc[r]};
    const auto sdt = attention_stat_dtype(q);
    const at::Tensor dout = grads[0].to(sdt).contiguous();
    const at::Tensor delta = (dout * out).sum(-1);
    at::Tensor dq = at::zeros(q.sizes(), q.options().dtype(sdt));
    at::Tensor kv = at::stack({k, v}).contiguous();
    RingHop grad_hop;  // the gradient of the keys this rank holds, from the previous holder
    TileCounts tiles;
    for (int i = 0; i < n; ++i) {
      const int j = (r - i + n) % n;
      RingHop hop;
      if (i + 1 < n) {
        hop = start_hop(c, kv, kKvTag);
      }
      const Stopwatch compute;
      at::Tensor dkv = at::zeros(kv.sizes(), kv.options().dtype(sdt));
      at::Tensor dk = dkv[0], dv = dkv[1];
      attention_fold_backward(q, mine, kv[0], kv[1], TokenInfo{index[j], doc[j]}, block, lse, dout,
                              delta, dq, dk, dv, &tiles, poll({&hop, &grad_hop}));
      if (hop.work) cp_counters().ring_compute_s += compute.seconds();
      if (grad_hop.work) {
        finish_hop(grad_hop);
        dkv.add_(grad_hop.incoming);
      }
      // Block j's gradient moves on with its keys; after n hops it is home.
      grad_hop = start_hop(c, dkv, kGradTag);
      if (hop.work) {
        finish_hop(hop);
        kv = hop.incoming;
      }
    }
    count_tiles(tiles);
    finish_hop(grad_hop);
    const at::Tensor dkv = grad_hop.incoming;
    return {dq.to(q.scalar_type()),
            dkv[0].to(k.scalar_type()),
            dkv[1].to(v.scalar_type()),
            at::Tensor(),
            at::Tensor(),
            at::Tensor(),
            at::Tensor()};
  }
};

// Rows [first, first + count) of a [cp, b, n] token tensor, concatenated along the tokens.
at::Tensor members(const at::Tensor& t, int64_t first, int64_t count) {
  std::vector<at::Tensor> parts;
  for (int64_t m = first; m < first + count; ++m) parts.push_back(t[m]);
  return count == 1 ? t[first] : at::cat(parts, 1);
}

}  // namespace

at::Tensor context_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const at::Tensor& cp_index, const at::Tensor& cp_doc,
                             const parallel::ContextParallel& cp, int64_t block) {
  LOOM_CHECK(cp_index.dim() == 3 && cp_index.size(0) == cp.size() &&
                 cp_doc.sizes() == cp_index.sizes() && cp_index.size(1) == q.size(0) &&
                 cp_index.size(2) == q.size(2),
             "context attention: token tables {} / {} for {} CP ranks and q {}", cp_index.sizes(),
             cp_doc.sizes(), cp.size(), q.sizes());
  if (block <= 0) block = cp.block > 0 ? cp.block : 512;
  if (!cp.enabled()) return blockwise_attention(q, k, v, TokenInfo{cp_index[0], cp_doc[0]}, block);
  const int g = cp.a2a_size(), rings = cp.ring_size();
  at::Tensor qh = q, kh = k, vh = v;
  if (g > 1) {
    parallel::check_cp_heads(q.size(1), k.size(1), g, 1);
    if (k.size(1) % g != 0) {  // fewer KV heads than ranks: replicate them (their gradients sum)
      kh = k.repeat_interleave(g / k.size(1), 1);
      vh = v.repeat_interleave(g / v.size(1), 1);
    }
    const int64_t h = handle(cp.a2a);
    qh = SeqToHeads::apply(qh, h)[0];
    kh = SeqToHeads::apply(kh, h)[0];
    vh = SeqToHeads::apply(vh, h)[0];
  }
  // Ring member m is a2a group m: CP ranks [g m, g (m + 1)).
  at::Tensor o;
  if (rings > 1) {
    std::vector<at::Tensor> idx, doc;
    for (int m = 0; m < rings; ++m) {
      idx.push_back(members(cp_index, static_cast<int64_t>(m) * g, g));
      doc.push_back(members(cp_doc, static_cast<int64_t>(m) * g, g));
    }
    // Tiles of at most half a member's tokens: a member's pieces are then separate tiles even where
    // the zig-zag puts two of them side by side (the middle rank's r and 2cp-1-r), so every rank
    // computes the same tile pattern and its transient tiles shrink with its share of the sequence.
    const int64_t ring_block = std::min(block, std::max<int64_t>(1, qh.size(2) / 2));
    o = RingAttention::apply(qh, kh, vh, at::stack(idx), at::stack(doc), handle(cp.ring),
                             ring_block)[0];
  } else {
    o = blockwise_attention(qh, kh, vh, TokenInfo{members(cp_index, 0, g), members(cp_doc, 0, g)},
                            block);
  }
  if (g > 1) o = HeadsToSeq::apply(o, handle(cp.a2a))[0];
  return o;
}

}  // namespace loom::ops
