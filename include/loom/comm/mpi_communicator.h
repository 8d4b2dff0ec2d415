// MpiCommunicator: the Communicator backend over MPI, for CPU tensors.
//
// Blocking forms call the blocking MPI routine (MPI_Allreduce, ...), so a Loom call costs what the
// raw MPI call costs; the FlightRecorder's watchdog guards them against hangs. Async forms use the
// MPI-3 non-blocking routines (MPI_Iallreduce, ...) and return an MpiWork. 16-bit floats travel as
// 2-byte words; their reductions are done on an fp32 copy by the base class.
#pragma once

#include <mpi.h>

#include "loom/comm/communicator.h"
#include "loom/comm/desync.h"

namespace loom::comm {

class MpiCommunicator final : public Communicator {
 public:
  // Wraps MPI_COMM_WORLD (MPI must be initialised: see Bootstrap). Errors are returned, not fatal.
  static std::shared_ptr<MpiCommunicator> world(double timeout_s = 600);
  ~MpiCommunicator() override;

  const char* backend() const override { return "mpi"; }
  at::Device device() const override { return at::Device(at::kCPU); }
  // The raw handle, for code that must compare against plain MPI (benchmarks, tests).
  MPI_Comm handle() const { return comm_; }

  static MPI_Datatype mpi_datatype(at::ScalarType dtype);

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

 private:
  MpiCommunicator(MPI_Comm comm, bool owned, std::string name, double timeout_s);
  WorkPtr completed(Work::Info info);
  WorkPtr pending(Work::Info info, std::vector<MPI_Request> requests, std::vector<at::Tensor> keep,
                  std::vector<std::vector<int>> arrays = {});

  MPI_Comm comm_;
  bool owned_;  // MPI_Comm_free on destruction (not for MPI_COMM_WORLD)
};

// The side channel of the desync report over a duplicate of MPI_COMM_WORLD (collective over the
// world; Bootstrap makes it).
std::shared_ptr<DesyncChannel> make_mpi_desync_channel();

}  // namespace loom::comm
