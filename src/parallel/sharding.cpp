#include "loom/parallel/sharding.h"

#include "loom/core/error.h"

namespace loom::parallel {

at::Tensor shard_of(const at::Tensor& full, const TpShard& sh, int tp_size, int tp_rank) {
  if (sh.dim < 0 || tp_size == 1) return full;
  at::Tensor t = full;
  const int64_t size = t.size(sh.dim);
  if (sh.padded > size) {
    auto pad_shape = t.sizes().vec();
    pad_shape[sh.dim] = sh.padded - size;
    t = at::cat({t, at::zeros(pad_shape, t.options())}, sh.dim);
  }
  LOOM_CHECK(t.size(sh.dim) % (sh.blocks * tp_size) == 0,
             "cannot split dimension {} of size {} into {} block(s) x {} TP ranks", sh.dim,
             t.size(sh.dim), sh.blocks, tp_size);
  std::vector<at::Tensor> parts;
  for (const auto& block : t.chunk(sh.blocks, sh.dim))
    parts.push_back(block.chunk(tp_size, sh.dim)[tp_rank]);
  return at::cat(parts, sh.dim).contiguous();
}

at::Tensor local_of(const at::Tensor& full, const Parameter& p) {
  at::Tensor t = full;
  if (p.ep_sharded()) {
    LOOM_CHECK(t.size(0) % p.ep_size == 0, "parameter '{}': {} experts over {} EP ranks", p.name,
               t.size(0), p.ep_size);
    t = t.chunk(p.ep_size, 0)[p.ep_rank];
  }
  return shard_of(t, p.shard, p.tp_size, p.tp_rank);
}

at::Tensor unshard(const std::vector<at::Tensor>& shards, const TpShard& sh,
                   at::IntArrayRef global_shape) {
  if (sh.dim < 0 || shards.size() == 1) return shards.at(0);
  std::vector<at::Tensor> blocks;
  for (int64_t b = 0; b < sh.blocks; ++b) {
    std::vector<at::Tensor> pieces;
    for (const auto& s : shards) pieces.push_back(s.chunk(sh.blocks, sh.dim)[b]);
    blocks.push_back(at::cat(pieces, sh.dim));
  }
  return at::cat(blocks, sh.dim).narrow(sh.dim, 0, global_shape[sh.dim]).contiguous();
}

at::Tensor full_tensor(const Parameter& p, const at::Tensor& local, comm::Communicator* tp) {
  if (!p.tp_sharded()) return local.detach();
  LOOM_INTERNAL_CHECK(tp != nullptr && tp->size() == p.tp_size,
                      "parameter '{}' is sharded over {} TP ranks, but no "
                      "such TP group was given",
                      p.name, p.tp_size);
  at::Tensor in = local.detach().contiguous().view({-1}).to(tp->device());
  at::Tensor out = at::empty({tp->size() * in.numel()}, in.options());
  tp->all_gather(out, in);
  std::vector<at::Tensor> shards;
  for (const auto& c : out.chunk(tp->size()))
    shards.push_back(c.view(local.sizes()).to(local.device()));
  return unshard(shards, p.shard, p.global_shape);
}

}  // namespace loom::parallel
