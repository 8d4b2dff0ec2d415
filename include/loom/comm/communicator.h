// Communicator: the one interface all parallel code talks to (DESIGN.md decision 3).
//
// Backends: MpiCommunicator (CPU tensors), NcclCommunicator (CUDA tensors), LocalCommunicator (a
// world of one, for builds without MPI). Public methods are non-virtual: they check arguments,
// count bytes and time in stats(), record the operation in the FlightRecorder, and call the
// backend's do_* hook (NVI). Every collective has a blocking form (`all_reduce`) and an async one
// (`iall_reduce`) that returns a Work; the blocking form of the MPI backend calls the blocking MPI
// routine, so it costs what raw MPI costs.
//
// A communicator is used by one thread at a time (like an MPI communicator under
// MPI_THREAD_SERIALIZED); different communicators may be used from different threads.
//
// Tensors must be contiguous and on the backend's device. Split sizes count rows along dim 0.
// Supported dtypes: float32, float64, bfloat16, float16, int32, int64, int8, uint8 (bool for data
// movement). Sums (and avg) of bfloat16/float16 accumulate in fp32 and round once at the end.
#pragma once

#include <ATen/ATen.h>

#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "loom/comm/stats.h"
#include "loom/comm/types.h"
#include "loom/comm/work.h"

namespace loom::comm {

class Communicator : public std::enable_shared_from_this<Communicator> {
 public:
  virtual ~Communicator();
  Communicator(const Communicator&) = delete;
  Communicator& operator=(const Communicator&) = delete;

  int rank() const { return rank_; }
  int size() const { return size_; }
  // Member ranks in the world communicator's numbering; world_ranks()[rank()] is this process.
  const std::vector<int>& world_ranks() const { return world_ranks_; }
  const std::string& name() const { return name_; }
  void set_name(std::string name) { name_ = std::move(name); }
  virtual const char* backend() const = 0;
  // The device tensors must live on (kCPU for MPI).
  virtual at::Device device() const = 0;

  CommStats& stats() { return *stats_; }
  double timeout_s() const { return timeout_s_; }
  void set_timeout_s(double seconds);

  // ---- collectives (blocking) ----
  void all_reduce(at::Tensor& tensor, const AllReduceOptions& opts = {});
  // output: (sum of rows, ...) = size x input rows when equal.
  void all_gather(at::Tensor& output, const at::Tensor& input, const AllGatherOptions& opts = {});
  // input: size x output rows when equal.
  void reduce_scatter(at::Tensor& output, const at::Tensor& input,
                      const ReduceScatterOptions& opts = {});
  void all_to_all(at::Tensor& output, const at::Tensor& input, const AllToAllOptions& opts = {});
  void broadcast(at::Tensor& tensor, const BroadcastOptions& opts = {});
  void send(const at::Tensor& tensor, int dst, int tag = 0);
  void recv(at::Tensor& tensor, int src, int tag = 0);
  void barrier();

  // ---- collectives (async) ----
  WorkPtr iall_reduce(at::Tensor& tensor, const AllReduceOptions& opts = {});
  WorkPtr iall_gather(at::Tensor& output, const at::Tensor& input,
                      const AllGatherOptions& opts = {});
  WorkPtr ireduce_scatter(at::Tensor& output, const at::Tensor& input,
                          const ReduceScatterOptions& opts = {});
  WorkPtr iall_to_all(at::Tensor& output, const at::Tensor& input,
                      const AllToAllOptions& opts = {});
  WorkPtr ibroadcast(at::Tensor& tensor, const BroadcastOptions& opts = {});
  WorkPtr isend(const at::Tensor& tensor, int dst, int tag = 0);
  WorkPtr irecv(at::Tensor& tensor, int src, int tag = 0);
  WorkPtr ibarrier();
  // All sends and receives posted together (no ordering deadlock), one Work for the batch.
  WorkPtr batch_isend_irecv(const std::vector<P2POp>& ops);

  // Collective over this communicator: ranks with the same color form a new communicator, ordered
  // by (key, rank). color < 0: this rank joins none and gets nullptr. Communicators are cached by
  // their member list (in world ranks), so asking twice for the same group returns the same object.
  std::shared_ptr<Communicator> split(int color, int key);

 protected:
  Communicator(int rank, int size, std::vector<int> world_ranks, std::string name,
               double timeout_s);

  // Backend hooks. `async`: return a pending Work (else complete the operation before returning).
  // do_all_to_all's `uneven`: the caller gave split sizes (the same on every rank, unlike whether
  // this rank's own counts happen to be equal, so a backend may pick its collective by it).
  // Arguments are already checked; bf16/fp16 sums arrive here already upcast to fp32 by the base.
  virtual WorkPtr do_all_reduce(at::Tensor& t, ReduceOp op, bool async, Work::Info info) = 0;
  virtual WorkPtr do_all_gather(at::Tensor& out, const at::Tensor& in,
                                const std::vector<int64_t>& counts, bool async,
                                Work::Info info) = 0;
  virtual WorkPtr do_reduce_scatter(at::Tensor& out, const at::Tensor& in,
                                    const std::vector<int64_t>& counts, ReduceOp op, bool async,
                                    Work::Info info) = 0;
  virtual WorkPtr do_all_to_all(at::Tensor& out, const at::Tensor& in,
                                const std::vector<int64_t>& send_counts,
                                const std::vector<int64_t>& recv_counts, bool async, bool uneven,
                                Work::Info info) = 0;
  virtual WorkPtr do_broadcast(at::Tensor& t, int root, bool async, Work::Info info) = 0;
  virtual WorkPtr do_p2p(const std::vector<P2POp>& ops, bool async, Work::Info info) = 0;
  virtual WorkPtr do_barrier(bool async, Work::Info info) = 0;
  // Returns the new communicator or nullptr (color < 0); the base handles caching.
  virtual std::shared_ptr<Communicator> do_split(int color, int key) = 0;
  // Whether the backend reduces `dtype` with `op` exactly itself; if not (bf16/fp16 sums, or MPI,
  // which has no 16-bit float types), the base reduces an fp32 copy and rounds once at the end.
  virtual bool reduces_natively(at::ScalarType dtype, ReduceOp op) const;
  // A thread-safe completion query the watchdog may call for async work (NCCL events).
  virtual bool watchdog_watches_async() const { return false; }

  std::shared_ptr<CommStats> stats_ptr() const { return stats_; }

 private:
  // Common path: checks, bookkeeping, upcast, backend call, and sync wait when !async.
  Work::Info begin(OpKind kind, int64_t bytes, std::string detail, bool async);
  WorkPtr finish(WorkPtr work, bool async);
  WorkPtr all_reduce_impl(at::Tensor& tensor, const AllReduceOptions& opts, bool async);
  WorkPtr all_gather_impl(at::Tensor& output, const at::Tensor& input, const AllGatherOptions& opts,
                          bool async);
  WorkPtr reduce_scatter_impl(at::Tensor& output, const at::Tensor& input,
                              const ReduceScatterOptions& opts, bool async);
  WorkPtr all_to_all_impl(at::Tensor& output, const at::Tensor& input, const AllToAllOptions& opts,
                          bool async);
  WorkPtr broadcast_impl(at::Tensor& tensor, const BroadcastOptions& opts, bool async);
  WorkPtr p2p_impl(const std::vector<P2POp>& ops, bool async);
  WorkPtr barrier_impl(bool async);
  void check_tensor(const at::Tensor& t, const char* op, const char* what) const;
  void check_peer(int peer, const char* op) const;
  void check_pair(const at::Tensor& input, const at::Tensor& output, const char* op) const;
  void check_reducible(at::ScalarType dtype, ReduceOp op, const char* what) const;
  // Elements per rank from row split sizes (empty: equal shares), validated against `t`.
  std::vector<int64_t> split_counts(const std::vector<int64_t>& splits, const at::Tensor& t,
                                    const char* op, const char* what) const;

  int rank_;
  int size_;
  std::vector<int> world_ranks_;
  std::string name_;
  double timeout_s_;
  int64_t seq_ = 0;      // collectives
  int64_t p2p_seq_ = 0;  // sends and receives
  // "backend:name@<size>x<hash of the world ranks>": its FlightRecorder key (Note: desync report).
  std::string recorder_key_;
  std::string recorder_key_name_;
  std::shared_ptr<CommStats> stats_;
  std::mutex split_mu_;
  std::map<std::vector<int>, std::weak_ptr<Communicator>> split_cache_;
};

using CommunicatorPtr = std::shared_ptr<Communicator>;

// Host values reduced over a communicator whatever its device (staged through it and back): the
// small sums, maxima and agreements of the training loop (losses, norms, "did any rank fail").
// A null communicator or one of size 1 leaves the values as they are. Collective over `comm`.
void all_reduce_host(at::Tensor& t, Communicator* comm, ReduceOp op = ReduceOp::kSum);
double all_reduce_scalar(double v, Communicator* comm, ReduceOp op = ReduceOp::kSum);

}  // namespace loom::comm
