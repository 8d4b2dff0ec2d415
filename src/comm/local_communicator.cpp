#include "loom/comm/local_communicator.h"

#include "loom/core/error.h"

namespace loom::comm {

LocalCommunicator::LocalCommunicator(at::Device device, double timeout_s)
    : Communicator(0, 1, {0}, "world", timeout_s), device_(device) {}

WorkPtr LocalCommunicator::done(Work::Info info) {
  return std::make_shared<CompletedWork>(std::move(info), stats_ptr());
}

WorkPtr LocalCommunicator::do_all_reduce(at::Tensor&, ReduceOp, bool, Work::Info info) {
  return done(std::move(info));
}

WorkPtr LocalCommunicator::do_all_gather(at::Tensor& out, const at::Tensor& in,
                                         const std::vector<int64_t>&, bool, Work::Info info) {
  if (out.data_ptr() != in.data_ptr()) out.view(-1).copy_(in.view(-1));
  return done(std::move(info));
}

WorkPtr LocalCommunicator::do_reduce_scatter(at::Tensor& out, const at::Tensor& in,
                                             const std::vector<int64_t>&, ReduceOp, bool,
                                             Work::Info info) {
  if (out.data_ptr() != in.data_ptr()) out.view(-1).copy_(in.view(-1));
  return done(std::move(info));
}

WorkPtr LocalCommunicator::do_all_to_all(at::Tensor& out, const at::Tensor& in,
                                         const std::vector<int64_t>&, const std::vector<int64_t>&,
                                         bool, bool, Work::Info info) {
  if (out.data_ptr() != in.data_ptr()) out.view(-1).copy_(in.view(-1));
  return done(std::move(info));
}

WorkPtr LocalCommunicator::do_broadcast(at::Tensor&, int, bool, Work::Info info) {
  return done(std::move(info));
}

WorkPtr LocalCommunicator::do_p2p(const std::vector<P2POp>& ops, bool, Work::Info info) {
  for (const auto& op : ops) {
    if (op.kind == P2POp::Kind::kSend) self_messages_.emplace_back(op.tag, op.tensor.clone());
  }
  for (const auto& op : ops) {
    if (op.kind != P2POp::Kind::kRecv) continue;
    auto it = std::find_if(self_messages_.begin(), self_messages_.end(),
                           [&](const auto& m) { return m.first == op.tag; });
    LOOM_CHECK_KIND(ErrorKind::kComm, it != self_messages_.end(),
                    "recv from self with tag {} on a world of one: no matching send was posted "
                    "(it would wait forever)",
                    op.tag);
    LOOM_CHECK(it->second.numel() == op.tensor.numel(),
               "recv from self with tag {}: {} elements sent, {} expected", op.tag,
               it->second.numel(), op.tensor.numel());
    at::Tensor dst = op.tensor;
    dst.view(-1).copy_(it->second.view(-1));
    self_messages_.erase(it);
  }
  return done(std::move(info));
}

WorkPtr LocalCommunicator::do_barrier(bool, Work::Info info) { return done(std::move(info)); }

std::shared_ptr<Communicator> LocalCommunicator::do_split(int color, int) {
  if (color < 0) return nullptr;
  return std::make_shared<LocalCommunicator>(device_, timeout_s());
}

}  // namespace loom::comm
