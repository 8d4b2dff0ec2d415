#include "loom/comm/mpi_communicator.h"

#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <mutex>
#include <numeric>
#include <thread>

#include "loom/core/error.h"
#include "loom/core/logging.h"

namespace loom {
namespace detail {
std::string mpi_error_string(int code) {
  char text[MPI_MAX_ERROR_STRING];
  int len = 0;
  if (MPI_Error_string(code, text, &len) != MPI_SUCCESS) return fmt::format("MPI error {}", code);
  return fmt::format("{} (MPI error {})", std::string(text, len), code);
}
}  // namespace detail

namespace comm {
namespace {

// MPI counts are int: refuse larger messages instead of truncating them.
int to_count(int64_t n, const char* op) {
  LOOM_CHECK_KIND(ErrorKind::kUnsupported, n >= 0 && n <= INT_MAX,
                  "{}: {} elements exceed MPI's int count limit ({}); split the message", op, n,
                  INT_MAX);
  return static_cast<int>(n);
}

std::vector<int> to_counts(const std::vector<int64_t>& c, const char* op) {
  std::vector<int> out(c.size());
  for (size_t i = 0; i < c.size(); ++i) out[i] = to_count(c[i], op);
  return out;
}

std::vector<int> displacements(const std::vector<int>& counts, const char* op) {
  std::vector<int> d(counts.size());
  int64_t acc = 0;
  for (size_t i = 0; i < counts.size(); ++i) {
    d[i] = to_count(acc, op);
    acc += counts[i];
  }
  return d;
}

// Moves count arrays into a vector without copying their storage: MPI holds pointers into them.
// (A braced list would copy, since std::initializer_list elements are const.)
template <typename... V>
std::vector<std::vector<int>> own(V&&... arrays) {
  std::vector<std::vector<int>> out;
  out.reserve(sizeof...(arrays));
  (out.push_back(std::move(arrays)), ...);
  return out;
}

bool all_equal(const std::vector<int64_t>& v) {
  return std::adjacent_find(v.begin(), v.end(), std::not_equal_to<>()) == v.end();
}

MPI_Op mpi_op(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum:
      return MPI_SUM;
    case ReduceOp::kMax:
      return MPI_MAX;
    case ReduceOp::kMin:
      return MPI_MIN;
    case ReduceOp::kAvg:
      break;  // the base turns avg into sum + divide
  }
  LOOM_THROW(ErrorKind::kInternal, "reduce op {} reached the MPI backend", reduce_op_name(op));
}

class MpiWork final : public Work {
 public:
  MpiWork(Info info, std::shared_ptr<CommStats> stats, std::vector<MPI_Request> requests,
          std::vector<at::Tensor> keep, std::vector<std::vector<int>> arrays)
      : Work(std::move(info), std::move(stats)),
        requests_(std::move(requests)),
        keep_(std::move(keep)),
        arrays_(std::move(arrays)) {}

  ~MpiWork() override {
    // MPI may still write into (or read from) the buffers held by keep_: never free them under a
    // pending request. A Work destroyed before completion was usually abandoned by an exception,
    // e.g. a receive that timed out because its peer stopped responding, so waiting for it could
    // block the unwinding (and the abort that follows) forever. A receive is cancelled; anything
    // else gets a bounded wait; what is still pending after that keeps its buffers until the
    // process exits (never freed under MPI).
    if (done_) return;
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (finalized) return;
    if (info().kind == OpKind::kRecv) {
      for (auto& r : requests_) {
        if (r != MPI_REQUEST_NULL) MPI_Cancel(&r);
      }
    }
    // After a timeout the job is ending: no second wait (Work::process_timed_out).
    const double limit_s =
        Work::process_timed_out() ? 0.0 : std::min(info().default_timeout_s, 10.0);
    LOOM_LOG_WARN("{} destroyed before wait(); {} up to {:.0f} s", describe(),
                  info().kind == OpKind::kRecv ? "cancelling it" : "waiting for it", limit_s);
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(limit_s);
    int flag = 0;
    while (MPI_Testall(static_cast<int>(requests_.size()), requests_.data(), &flag,
                       MPI_STATUSES_IGNORE) == MPI_SUCCESS &&
           !flag && std::chrono::steady_clock::now() < deadline) {
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    if (!flag) {
      LOOM_LOG_WARN(
          "{} is still pending (a peer failed or stopped responding?): its buffers are kept until "
          "exit",
          describe());
      static std::mutex mu;
      // Never destroyed: MPI may use these until the process ends.
      static auto* abandoned =
          new std::vector<std::pair<std::vector<at::Tensor>, std::vector<std::vector<int>>>>();
      std::lock_guard<std::mutex> lock(mu);
      abandoned->emplace_back(std::move(keep_), std::move(arrays_));
    }
  }

 protected:
  bool test() override {
    if (done_) return true;
    int flag = 0;
    LOOM_CHECK_MPI(MPI_Testall(static_cast<int>(requests_.size()), requests_.data(), &flag,
                               MPI_STATUSES_IGNORE));
    if (flag) {
      done_ = true;
      keep_.clear();
      arrays_.clear();
    }
    return done_;
  }

 private:
  std::vector<MPI_Request> requests_;
  std::vector<at::Tensor> keep_;          // buffers MPI reads or writes until completion
  std::vector<std::vector<int>> arrays_;  // count/displacement arrays, likewise
  bool done_ = false;
};

}  // namespace

MPI_Datatype MpiCommunicator::mpi_datatype(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat:
      return MPI_FLOAT;
    case at::kDouble:
      return MPI_DOUBLE;
    case at::kInt:
      return MPI_INT32_T;
    case at::kLong:
      return MPI_INT64_T;
    case at::kChar:
      return MPI_INT8_T;
    case at::kByte:
      return MPI_UINT8_T;
    case at::kBool:
      return MPI_UINT8_T;
    // Data movement only; reductions of these are done in fp32 by the base class.
    case at::kBFloat16:
      return MPI_UINT16_T;
    case at::kHalf:
      return MPI_UINT16_T;
    default:
      break;
  }
  LOOM_THROW(ErrorKind::kUnsupported, "backend mpi does not support dtype {}",
             c10::toString(dtype));
}

std::shared_ptr<MpiCommunicator> MpiCommunicator::world(double timeout_s) {
  int initialized = 0;
  MPI_Initialized(&initialized);
  LOOM_CHECK_KIND(ErrorKind::kComm, initialized,
                  "MPI is not initialised: create a comm::Bootstrap before the world communicator");
  MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
  return std::shared_ptr<MpiCommunicator>(
      new MpiCommunicator(MPI_COMM_WORLD, /*owned=*/false, "world", timeout_s));
}

namespace {
std::vector<int> world_ranks_of(MPI_Comm comm) {
  int size = 0;
  MPI_Comm_size(comm, &size);
  MPI_Group group, world_group;
  LOOM_CHECK_MPI(MPI_Comm_group(comm, &group));
  LOOM_CHECK_MPI(MPI_Comm_group(MPI_COMM_WORLD, &world_group));
  std::vector<int> local(size), world(size);
  std::iota(local.begin(), local.end(), 0);
  LOOM_CHECK_MPI(MPI_Group_translate_ranks(group, size, local.data(), world_group, world.data()));
  MPI_Group_free(&group);
  MPI_Group_free(&world_group);
  return world;
}

int comm_rank(MPI_Comm c) {
  int r = 0;
  LOOM_CHECK_MPI(MPI_Comm_rank(c, &r));
  return r;
}
int comm_size(MPI_Comm c) {
  int s = 0;
  LOOM_CHECK_MPI(MPI_Comm_size(c, &s));
  return s;
}
}  // namespace

MpiCommunicator::MpiCommunicator(MPI_Comm comm, bool owned, std::string name, double timeout_s)
    : Communicator(comm_rank(comm), comm_size(comm), world_ranks_of(comm), std::move(name),
                   timeout_s),
      comm_(comm),
      owned_(owned) {}

MpiCommunicator::~MpiCommunicator() {
  if (!owned_) return;
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (!finalized) MPI_Comm_free(&comm_);
}

WorkPtr MpiCommunicator::completed(Work::Info info) {
  return std::make_shared<CompletedWork>(std::move(info), stats_ptr());
}

WorkPtr MpiCommunicator::pending(Work::Info info, std::vector<MPI_Request> requests,
                                 std::vector<at::Tensor> keep,
                                 std::vector<std::vector<int>> arrays) {
  return std::make_shared<MpiWork>(std::move(info), stats_ptr(), std::move(requests),
                                   std::move(keep), std::move(arrays));
}

WorkPtr MpiCommunicator::do_all_reduce(at::Tensor& t, ReduceOp op, bool async, Work::Info info) {
  int n = to_count(t.numel(), "all_reduce");
  MPI_Datatype dt = mpi_datatype(t.scalar_type());
  if (!async) {
    LOOM_CHECK_MPI(MPI_Allreduce(MPI_IN_PLACE, t.data_ptr(), n, dt, mpi_op(op), comm_));
    return completed(std::move(info));
  }
  MPI_Request req;
  LOOM_CHECK_MPI(MPI_Iallreduce(MPI_IN_PLACE, t.data_ptr(), n, dt, mpi_op(op), comm_, &req));
  return pending(std::move(info), {req}, {t});
}

WorkPtr MpiCommunicator::do_all_gather(at::Tensor& out, const at::Tensor& in,
                                       const std::vector<int64_t>& counts64, bool async,
                                       Work::Info info) {
  MPI_Datatype dt = mpi_datatype(in.scalar_type());
  std::vector<int> counts = to_counts(counts64, "all_gather");
  std::vector<int> displs = displacements(counts, "all_gather");
  // In place when the input is this rank's slot of the output (as ZeRO does with its shards).
  auto* my_slot = static_cast<char*>(out.data_ptr()) + int64_t(displs[rank()]) * in.element_size();
  const void* send = in.data_ptr() == my_slot ? MPI_IN_PLACE : in.data_ptr();
  bool equal = all_equal(counts64);
  MPI_Request req;
  if (!async) {
    if (equal) {
      LOOM_CHECK_MPI(MPI_Allgather(send, counts[0], dt, out.data_ptr(), counts[0], dt, comm_));
    } else {
      LOOM_CHECK_MPI(MPI_Allgatherv(send, counts[rank()], dt, out.data_ptr(), counts.data(),
                                    displs.data(), dt, comm_));
    }
    return completed(std::move(info));
  }
  if (equal) {
    LOOM_CHECK_MPI(MPI_Iallgather(send, counts[0], dt, out.data_ptr(), counts[0], dt, comm_, &req));
  } else {
    LOOM_CHECK_MPI(MPI_Iallgatherv(send, counts[rank()], dt, out.data_ptr(), counts.data(),
                                   displs.data(), dt, comm_, &req));
  }
  // Non-blocking collectives read their count arrays until completion: the Work owns them.
  return pending(std::move(info), {req}, {out, in}, own(std::move(counts), std::move(displs)));
}

WorkPtr MpiCommunicator::do_reduce_scatter(at::Tensor& out, const at::Tensor& in,
                                           const std::vector<int64_t>& counts64, ReduceOp op,
                                           bool async, Work::Info info) {
  MPI_Datatype dt = mpi_datatype(in.scalar_type());
  std::vector<int> counts = to_counts(counts64, "reduce_scatter");
  bool equal = all_equal(counts64);
  if (!async) {
    if (equal) {
      LOOM_CHECK_MPI(MPI_Reduce_scatter_block(in.data_ptr(), out.data_ptr(), counts[0], dt,
                                              mpi_op(op), comm_));
    } else {
      LOOM_CHECK_MPI(
          MPI_Reduce_scatter(in.data_ptr(), out.data_ptr(), counts.data(), dt, mpi_op(op), comm_));
    }
    return completed(std::move(info));
  }
  MPI_Request req;
  if (equal) {
    LOOM_CHECK_MPI(MPI_Ireduce_scatter_block(in.data_ptr(), out.data_ptr(), counts[0], dt,
                                             mpi_op(op), comm_, &req));
  } else {
    LOOM_CHECK_MPI(MPI_Ireduce_scatter(in.data_ptr(), out.data_ptr(), counts.data(), dt, mpi_op(op),
                                       comm_, &req));
  }
  return pending(std::move(info), {req}, {out, in}, own(std::move(counts)));
}

WorkPtr MpiCommunicator::do_all_to_all(at::Tensor& out, const at::Tensor& in,
                                       const std::vector<int64_t>& send64,
                                       const std::vector<int64_t>& recv64, bool async, bool uneven,
                                       Work::Info info) {
  MPI_Datatype dt = mpi_datatype(in.scalar_type());
  std::vector<int> sc = to_counts(send64, "all_to_all");
  std::vector<int> rc = to_counts(recv64, "all_to_all");
  std::vector<int> sd = displacements(sc, "all_to_all");
  std::vector<int> rd = displacements(rc, "all_to_all");
  // Every rank must call the same MPI collective: whether this rank's own counts are equal is its
  // own business (a dispatcher's counts can be equal on one rank only), whether split sizes were
  // given is the same everywhere.
  const bool equal = !uneven;
  if (!async) {
    if (equal) {
      LOOM_CHECK_MPI(MPI_Alltoall(in.data_ptr(), sc[0], dt, out.data_ptr(), rc[0], dt, comm_));
    } else {
      LOOM_CHECK_MPI(MPI_Alltoallv(in.data_ptr(), sc.data(), sd.data(), dt, out.data_ptr(),
                                   rc.data(), rd.data(), dt, comm_));
    }
    return completed(std::move(info));
  }
  MPI_Request req;
  if (equal) {
    LOOM_CHECK_MPI(MPI_Ialltoall(in.data_ptr(), sc[0], dt, out.data_ptr(), rc[0], dt, comm_, &req));
  } else {
    LOOM_CHECK_MPI(MPI_Ialltoallv(in.data_ptr(), sc.data(), sd.data(), dt, out.data_ptr(),
                                  rc.data(), rd.data(), dt, comm_, &req));
  }
  return pending(std::move(info), {req}, {out, in},
                 own(std::move(sc), std::move(rc), std::move(sd), std::move(rd)));
}

WorkPtr MpiCommunicator::do_broadcast(at::Tensor& t, int root, bool async, Work::Info info) {
  MPI_Datatype dt = mpi_datatype(t.scalar_type());
  int n = to_count(t.numel(), "broadcast");
  if (!async) {
    LOOM_CHECK_MPI(MPI_Bcast(t.data_ptr(), n, dt, root, comm_));
    return completed(std::move(info));
  }
  MPI_Request req;
  LOOM_CHECK_MPI(MPI_Ibcast(t.data_ptr(), n, dt, root, comm_, &req));
  return pending(std::move(info), {req}, {t});
}

WorkPtr MpiCommunicator::do_p2p(const std::vector<P2POp>& ops, bool async, Work::Info info) {
  if (!async && ops.size() == 1) {
    const P2POp& op = ops[0];
    MPI_Datatype dt = mpi_datatype(op.tensor.scalar_type());
    int n = to_count(op.tensor.numel(), "p2p");
    if (op.kind == P2POp::Kind::kSend) {
      LOOM_CHECK_MPI(MPI_Send(op.tensor.data_ptr(), n, dt, op.peer, op.tag, comm_));
    } else {
      LOOM_CHECK_MPI(
          MPI_Recv(op.tensor.data_ptr(), n, dt, op.peer, op.tag, comm_, MPI_STATUS_IGNORE));
    }
    return completed(std::move(info));
  }
  std::vector<MPI_Request> reqs(ops.size());
  std::vector<at::Tensor> keep;
  // Post receives first so that matching sends find them (no unexpected-message copies).
  size_t i = 0;
  for (int pass = 0; pass < 2; ++pass) {
    for (const auto& op : ops) {
      bool is_send = op.kind == P2POp::Kind::kSend;
      if (is_send != (pass == 1)) continue;
      MPI_Datatype dt = mpi_datatype(op.tensor.scalar_type());
      int n = to_count(op.tensor.numel(), "p2p");
      if (is_send) {
        LOOM_CHECK_MPI(MPI_Isend(op.tensor.data_ptr(), n, dt, op.peer, op.tag, comm_, &reqs[i++]));
      } else {
        LOOM_CHECK_MPI(MPI_Irecv(op.tensor.data_ptr(), n, dt, op.peer, op.tag, comm_, &reqs[i++]));
      }
      keep.push_back(op.tensor);
    }
  }
  if (!async) {
    LOOM_CHECK_MPI(MPI_Waitall(static_cast<int>(reqs.size()), reqs.data(), MPI_STATUSES_IGNORE));
    return completed(std::move(info));
  }
  return pending(std::move(info), std::move(reqs), std::move(keep));
}

WorkPtr MpiCommunicator::do_barrier(bool async, Work::Info info) {
  if (!async) {
    LOOM_CHECK_MPI(MPI_Barrier(comm_));
    return completed(std::move(info));
  }
  MPI_Request req;
  LOOM_CHECK_MPI(MPI_Ibarrier(comm_, &req));
  return pending(std::move(info), {req}, {});
}

std::shared_ptr<Communicator> MpiCommunicator::do_split(int color, int key) {
  MPI_Comm sub = MPI_COMM_NULL;
  LOOM_CHECK_MPI(MPI_Comm_split(comm_, color < 0 ? MPI_UNDEFINED : color, key, &sub));
  if (sub == MPI_COMM_NULL) return nullptr;
  return std::shared_ptr<MpiCommunicator>(new MpiCommunicator(
      sub, /*owned=*/true, fmt::format("{}/split{}", name(), color), timeout_s()));
}

}  // namespace comm
}  // namespace loom
