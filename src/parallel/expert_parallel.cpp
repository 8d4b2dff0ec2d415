#include "loom/parallel/expert_parallel.h"

#include <numeric>

#include "autograd_comm.h"
#include "loom/core/error.h"

namespace loom::parallel {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor exchange(const at::Tensor& x, const std::vector<int64_t>& send,
                    const std::vector<int64_t>& recv, comm::Communicator& c) {
  const int64_t rows = std::accumulate(recv.begin(), recv.end(), int64_t{0});
  auto shape = x.sizes().vec();
  shape[0] = rows;
  const at::Tensor in = x.contiguous().to(c.device());
  at::Tensor out = at::empty(shape, in.options());
  comm::AllToAllOptions o;
  o.input_split_sizes = send;
  o.output_split_sizes = recv;
  c.all_to_all(out, in, o);
  int64_t row_bytes = x.element_size();
  for (int64_t d = 1; d < x.dim(); ++d) row_bytes *= x.size(d);
  dispatcher_bytes() +=
      (std::accumulate(send.begin(), send.end(), int64_t{0}) - send[c.rank()]) * row_bytes;
  return out.to(x.device());
}

struct AllToAllRows : public torch::autograd::Function<AllToAllRows> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, std::vector<int64_t> send,
                               std::vector<int64_t> recv, int64_t comm) {
    ctx->saved_data["comm"] = comm;
    ctx->saved_data["send"] = send;
    ctx->saved_data["recv"] = recv;
    return {exchange(x, send, recv, *reinterpret_cast<comm::Communicator*>(comm))};
  }
  static variable_list backward(AutogradContext* ctx, variable_list g) {
    const auto send = ctx->saved_data["send"].toIntVector();
    const auto recv = ctx->saved_data["recv"].toIntVector();
    return {exchange(g[0], recv, send, detail::from_handle(ctx)), at::Tensor(), at::Tensor(),
            at::Tensor()};
  }
};

}  // namespace

ExpertParallel make_expert_parallel(comm::CommunicatorPtr group, int ep, int ep_rank, int etp,
                                    int etp_rank) {
  ExpertParallel e;
  e.ep = ep;
  e.ep_rank = ep_rank;
  e.etp = etp;
  e.etp_rank = etp_rank;
  if (!group || group->size() == 1) {
    LOOM_INTERNAL_CHECK(ep * etp == 1, "an expert group of one rank for ep {} x etp {}", ep, etp);
    e.member_ep = {ep_rank};
    e.member_etp = {etp_rank};
    return e;
  }
  LOOM_INTERNAL_CHECK(group->size() == ep * etp, "expert group of {} ranks for ep {} x etp {}",
                      group->size(), ep, etp);
  e.comm = std::move(group);
  at::Tensor mine =
      at::tensor({static_cast<int64_t>(ep_rank), static_cast<int64_t>(etp_rank)}, at::kLong)
          .to(e.comm->device());
  at::Tensor all = at::empty({2 * e.comm->size()}, mine.options());
  e.comm->all_gather(all, mine);
  all = all.cpu();
  const auto* v = all.data_ptr<int64_t>();
  for (int i = 0; i < e.comm->size(); ++i) {
    e.member_ep.push_back(static_cast<int>(v[2 * i]));
    e.member_etp.push_back(static_cast<int>(v[2 * i + 1]));
  }
  return e;
}

at::Tensor all_to_all_rows(const at::Tensor& x, const std::vector<int64_t>& send,
                           const std::vector<int64_t>& recv, comm::Communicator& comm) {
  LOOM_INTERNAL_CHECK(static_cast<int>(send.size()) == comm.size() &&
                          static_cast<int>(recv.size()) == comm.size() &&
                          std::accumulate(send.begin(), send.end(), int64_t{0}) == x.size(0),
                      "all_to_all_rows: {} rows for send splits of {} ranks", x.size(0),
                      send.size());
  return AllToAllRows::apply(x, send, recv, detail::handle(comm))[0];
}

at::Tensor expert_full_tensor(const Parameter& p, const at::Tensor& local,
                              const ExpertParallel& ep) {
  LOOM_INTERNAL_CHECK(p.ep_sharded() && ep.enabled() && p.ep_size == ep.ep,
                      "parameter '{}' is not sharded over this expert group of ep {}", p.name,
                      ep.ep);
  comm::Communicator& c = *ep.comm;
  const at::Tensor in = local.detach().contiguous().view({-1}).to(c.device());
  at::Tensor out = at::empty({c.size() * in.numel()}, in.options());
  c.all_gather(out, in);
  const std::vector<at::Tensor> parts = out.chunk(c.size());
  // One ep index's experts: its expert-TP shards in expert-TP order.
  std::vector<int64_t> block_shape = p.global_shape;
  block_shape[0] /= ep.ep;
  std::vector<at::Tensor> experts;
  for (int q = 0; q < ep.ep; ++q) {
    std::vector<at::Tensor> shards(static_cast<size_t>(ep.etp));
    for (int m = 0; m < c.size(); ++m) {
      if (ep.member_ep[static_cast<size_t>(m)] != q) continue;
      shards.at(static_cast<size_t>(ep.member_etp[static_cast<size_t>(m)])) =
          parts[static_cast<size_t>(m)].view(local.sizes()).to(local.device());
    }
    experts.push_back(unshard(shards, p.shard, block_shape));
  }
  return at::cat(experts, 0);
}

int64_t& dispatcher_bytes() {
  static int64_t bytes = 0;
  return bytes;
}

}  // namespace loom::parallel
