// NcclCommunicator: the Communicator backend over NCCL, for CUDA tensors.
//
// Operations run on the communicator's own stream, ordered after the caller's current stream with
// an event; Work::wait() orders the caller's current stream after the operation with another event
// (no host synchronisation, STYLE.md convention 5). Tensors are kept alive until completion and
// recorded with the caching allocator for the communication stream. bf16/fp16 sums are done on an
// fp32 copy (NCCL would round at every step of its ring); max/min use NCCL's native 16-bit types.
//
// Created collectively over a CPU bootstrap communicator (MPI): rank 0 makes the NCCL unique id and
// the bootstrap broadcasts it. split() uses ncclCommSplit and splits the bootstrap the same way.
#pragma once

#include <cuda_runtime.h>
#include <nccl.h>

#include "loom/comm/communicator.h"

namespace loom::comm {

class NcclCommunicator final : public Communicator {
 public:
  static std::shared_ptr<NcclCommunicator> create(CommunicatorPtr bootstrap, int device);
  ~NcclCommunicator() override;

  const char* backend() const override { return "nccl"; }
  at::Device device() const override;
  ncclComm_t handle() const { return comm_; }
  cudaStream_t stream() const { return stream_; }
  // Aborts in-flight operations and tears the communicator down (after a timeout or a peer's
  // death).
  void abort();

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
  bool reduces_natively(at::ScalarType dtype, ReduceOp op) const override;
  // Async NCCL work is watched too: the watchdog queries its completion event.
  bool watchdog_watches_async() const override { return true; }

 private:
  NcclCommunicator(ncclComm_t comm, CommunicatorPtr bootstrap, int device, std::string name,
                   double timeout_s);
  // Orders stream_ after the caller's stream, runs `enqueue` (NCCL calls on stream_), records the
  // completion event, and returns the Work that keeps `tensors` alive.
  template <typename Fn>
  WorkPtr launch(Work::Info info, std::vector<at::Tensor> tensors, Fn&& enqueue);

  ncclComm_t comm_ = nullptr;
  CommunicatorPtr bootstrap_;  // CPU communicator over the same ranks
  int device_;
  cudaStream_t stream_ = nullptr;
  float* scratch_ = nullptr;  // one float on the device, for barrier()
  bool aborted_ = false;
};

}  // namespace loom::comm
