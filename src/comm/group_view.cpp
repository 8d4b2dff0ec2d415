#include "loom/comm/group_view.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>

#include "loom/core/error.h"

namespace loom::comm {

namespace {

// Tags of the collectives a view builds from transfers (apart from its callers' tags).
constexpr int kCollectiveTag = 0x6c76;

// A view's Work for transfers started on the parent.
class ForwardedWork final : public Work {
 public:
  ForwardedWork(Info info, std::shared_ptr<CommStats> stats, WorkPtr inner)
      : Work(std::move(info), std::move(stats)), inner_(std::move(inner)) {}

 protected:
  bool test() override { return inner_->is_completed(); }
  void on_complete_wait() override { inner_->wait(); }  // device backends order streams here

 private:
  WorkPtr inner_;
};

class GroupView final : public Communicator {
 public:
  GroupView(CommunicatorPtr parent, std::vector<int> ranks, int rank, std::vector<int> world)
      : Communicator(rank, static_cast<int>(ranks.size()), std::move(world),
                     fmt::format("{}.group[{}]", parent->name(), fmt::join(ranks, ",")),
                     parent->timeout_s()),
        parent_(std::move(parent)),
        ranks_(std::move(ranks)) {}
  const char* backend() const override { return parent_->backend(); }
  at::Device device() const override { return parent_->device(); }

 protected:
  WorkPtr do_p2p(const std::vector<P2POp>& ops, bool async, Work::Info info) override {
    std::vector<P2POp> mapped = ops;
    for (auto& op : mapped) op.peer = ranks_[static_cast<size_t>(op.peer)];
    WorkPtr inner = parent_->batch_isend_irecv(mapped);
    if (!async) {
      inner->wait();
      return done(std::move(info));
    }
    return std::make_shared<ForwardedWork>(std::move(info), stats_ptr(), std::move(inner));
  }

  // Every member's `mine` into parts[member] (parts[rank()] = mine), by transfers.
  void exchange(const at::Tensor& mine, std::vector<at::Tensor>& parts) {
    std::vector<P2POp> ops;
    for (int i = 0; i < size(); ++i) {
      if (i == rank()) continue;
      ops.push_back(P2POp::send(mine, ranks_[static_cast<size_t>(i)], kCollectiveTag));
      ops.push_back(P2POp::recv(parts[static_cast<size_t>(i)], ranks_[static_cast<size_t>(i)],
                                kCollectiveTag));
    }
    if (!ops.empty()) parent_->batch_isend_irecv(ops)->wait();
  }

  WorkPtr do_all_reduce(at::Tensor& t, ReduceOp op, bool, Work::Info info) override {
    const at::Tensor mine = t.clone();
    std::vector<at::Tensor> parts(static_cast<size_t>(size()));
    for (int i = 0; i < size(); ++i)
      parts[static_cast<size_t>(i)] = i == rank() ? mine : at::empty_like(mine);
    exchange(mine, parts);
    at::Tensor acc = parts[0].clone();
    for (int i = 1; i < size(); ++i) {  // member order: the same result on every member
      const at::Tensor& p = parts[static_cast<size_t>(i)];
      if (op == ReduceOp::kMax) {
        acc = at::maximum(acc, p);
      } else if (op == ReduceOp::kMin) {
        acc = at::minimum(acc, p);
      } else {
        acc.add_(p);
      }
    }
    if (op == ReduceOp::kAvg) acc.div_(size());
    t.copy_(acc);
    return done(std::move(info));
  }

  WorkPtr do_all_gather(at::Tensor& out, const at::Tensor& in, const std::vector<int64_t>& counts,
                        bool, Work::Info info) override {
    at::Tensor flat = out.view(-1);
    std::vector<at::Tensor> parts(static_cast<size_t>(size()));
    int64_t at = 0;
    for (int i = 0; i < size(); ++i) {
      parts[static_cast<size_t>(i)] = flat.narrow(0, at, counts[static_cast<size_t>(i)]);
      at += counts[static_cast<size_t>(i)];
    }
    const at::Tensor mine = in.contiguous().view(-1).clone();
    parts[static_cast<size_t>(rank())].copy_(mine);
    // Receive into contiguous buffers, then place them.
    std::vector<at::Tensor> bufs(parts.size());
    for (int i = 0; i < size(); ++i)
      bufs[static_cast<size_t>(i)] =
          i == rank() ? mine : at::empty_like(parts[static_cast<size_t>(i)]);
    exchange(mine, bufs);
    for (int i = 0; i < size(); ++i) {
      if (i != rank()) parts[static_cast<size_t>(i)].copy_(bufs[static_cast<size_t>(i)]);
    }
    return done(std::move(info));
  }

  WorkPtr do_reduce_scatter(at::Tensor& out, const at::Tensor& in,
                            const std::vector<int64_t>& counts, ReduceOp op, bool async,
                            Work::Info info) override {
    at::Tensor all = in.contiguous().clone();
    do_all_reduce(all, op, async, info);
    int64_t at = 0;
    for (int i = 0; i < rank(); ++i) at += counts[static_cast<size_t>(i)];
    out.view(-1).copy_(all.view(-1).narrow(0, at, counts[static_cast<size_t>(rank())]));
    return done(std::move(info));
  }

  WorkPtr do_all_to_all(at::Tensor& out, const at::Tensor& in,
                        const std::vector<int64_t>& send_counts,
                        const std::vector<int64_t>& recv_counts, bool, bool,
                        Work::Info info) override {
    const at::Tensor src = in.contiguous().view(-1);
    at::Tensor dst = out.view(-1);
    std::vector<P2POp> ops;
    std::vector<std::pair<at::Tensor, at::Tensor>> places;  // (buffer, destination)
    int64_t s_at = 0, r_at = 0;
    for (int i = 0; i < size(); ++i) {
      const int64_t sc = send_counts[static_cast<size_t>(i)],
                    rc = recv_counts[static_cast<size_t>(i)];
      if (i == rank()) {
        dst.narrow(0, r_at, rc).copy_(src.narrow(0, s_at, sc));
      } else {
        const int peer = ranks_[static_cast<size_t>(i)];
        ops.push_back(P2POp::send(src.narrow(0, s_at, sc).clone(), peer, kCollectiveTag));
        at::Tensor buf = at::empty({rc}, dst.options());
        ops.push_back(P2POp::recv(buf, peer, kCollectiveTag));
        places.emplace_back(buf, dst.narrow(0, r_at, rc));
      }
      s_at += sc;
      r_at += rc;
    }
    if (!ops.empty()) parent_->batch_isend_irecv(ops)->wait();
    for (auto& [buf, place] : places) place.copy_(buf);
    return done(std::move(info));
  }

  WorkPtr do_broadcast(at::Tensor& t, int root, bool, Work::Info info) override {
    std::vector<P2POp> ops;
    if (rank() == root) {
      for (int i = 0; i < size(); ++i) {
        if (i != root)
          ops.push_back(P2POp::send(t, ranks_[static_cast<size_t>(i)], kCollectiveTag));
      }
    } else {
      ops.push_back(P2POp::recv(t, ranks_[static_cast<size_t>(root)], kCollectiveTag));
    }
    if (!ops.empty()) parent_->batch_isend_irecv(ops)->wait();
    return done(std::move(info));
  }

  WorkPtr do_barrier(bool async, Work::Info info) override {
    at::Tensor one = at::ones({1}, at::TensorOptions().device(device()).dtype(at::kFloat));
    return do_all_reduce(one, ReduceOp::kSum, async, std::move(info));
  }

  std::shared_ptr<Communicator> do_split(int, int) override {
    LOOM_THROW(ErrorKind::kInternal, "communicator '{}' is a group view: it cannot be split",
               name());
  }

 private:
  WorkPtr done(Work::Info info) {
    return std::make_shared<CompletedWork>(std::move(info), stats_ptr());
  }

  CommunicatorPtr parent_;
  std::vector<int> ranks_;
};

}  // namespace

CommunicatorPtr make_group_view(const CommunicatorPtr& parent, const std::vector<int>& ranks) {
  LOOM_CHECK(parent != nullptr, "group view of a null communicator");
  std::vector<int> world;
  int me = -1;
  for (size_t i = 0; i < ranks.size(); ++i) {
    const int r = ranks[i];
    LOOM_CHECK(r >= 0 && r < parent->size(),
               "group view of '{}': rank {} is outside the communicator's {} ranks", parent->name(),
               r, parent->size());
    LOOM_CHECK(std::count(ranks.begin(), ranks.end(), r) == 1,
               "group view of '{}': rank {} is listed twice", parent->name(), r);
    if (r == parent->rank()) me = static_cast<int>(i);
    world.push_back(parent->world_ranks()[static_cast<size_t>(r)]);
  }
  LOOM_CHECK(me >= 0, "group view of '{}' over ranks [{}]: this rank ({}) is not a member",
             parent->name(), fmt::join(ranks, ","), parent->rank());
  return std::make_shared<GroupView>(parent, ranks, me, std::move(world));
}

}  // namespace loom::comm
