// LocalCommunicator: a communicator of one process, for builds without MPI (the GPU machine has no
// MPI) and for single-process code paths. Every collective is the identity on a world of one; sends
// to self are queued and matched by tag.
#pragma once

#include <deque>

#include "loom/comm/communicator.h"

namespace loom::comm {

class LocalCommunicator final : public Communicator {
 public:
  explicit LocalCommunicator(at::Device device = at::kCPU, double timeout_s = 600);
  const char* backend() const override { return "local"; }
  at::Device device() const override { return device_; }

 protected:
  WorkPtr do_all_reduce(at::Tensor& t, ReduceOp op, bool async, Work::Info info) override;
  WorkPtr do_all_gather(at::Tensor& out, const at::Tensor& in, const std::vector<int64_t>& counts,
                        bool async, Work::Info info) override;
  WorkPtr do_reduce_scatter(at::Tensor& out, const at::Tensor& in,
                            const std::vector<int64_t>& counts, ReduceOp op, bool async,
                            Work::Info info) override;
  WorkPtr do_all_to_all(at::Tensor& out, const at::Tensor& in,
                        const std::vector<int64_t>& send_counts,
                        const std::vector<int64_t>& recv_counts, bool async, bool uneven,
                        Work::Info info) override;
  WorkPtr do_broadcast(at::Tensor& t, int root, bool async, Work::Info info) override;
  WorkPtr do_p2p(const std::vector<P2POp>& ops, bool async, Work::Info info) override;
  WorkPtr do_barrier(bool async, Work::Info info) override;
  std::shared_ptr<Communicator> do_split(int color, int key) override;
  bool reduces_natively(at::ScalarType, ReduceOp) const override { return true; }

 private:
  WorkPtr done(Work::Info info);
  at::Device device_;
  std::deque<std::pair<int, at::Tensor>> self_messages_;  // (tag, payload) sent to self
};

}  // namespace loom::comm
