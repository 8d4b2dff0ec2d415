#include "loom/comm/nccl_communicator.h"

#include <fmt/format.h>

#include <cstring>

#include "loom/comm/cuda_check.h"
#include "loom/comm/cuda_stream_glue.h"
#include "loom/comm/flight_recorder.h"
#include "loom/core/logging.h"

namespace loom::comm {
namespace {

class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    LOOM_CHECK_CUDA(cudaGetDevice(&previous_));
    if (previous_ != device) LOOM_CHECK_CUDA(cudaSetDevice(device));
  }
  ~DeviceGuard() { cudaSetDevice(previous_); }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
};

// An owned cudaEvent_t (timing disabled: cheaper to record and query).
class Event {
 public:
  Event() { LOOM_CHECK_CUDA(cudaEventCreateWithFlags(&event_, cudaEventDisableTiming)); }
  ~Event() {
    if (event_) cudaEventDestroy(event_);
  }
  Event(const Event&) = delete;
  Event& operator=(const Event&) = delete;
  cudaEvent_t get() const { return event_; }

 private:
  cudaEvent_t event_ = nullptr;
};

ncclDataType_t nccl_type(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return ncclFloat32;
    case at::kDouble:
      return ncclFloat64;
    case at::kBFloat16:
      return ncclBfloat16;
    case at::kHalf:
      return ncclFloat16;
    case at::kInt:
      return ncclInt32;
    case at::kLong:
      return ncclInt64;
    case at::kChar:
      return ncclInt8;
    case at::kByte:
      return ncclUint8;
    case at::kBool:
      return ncclUint8;
    default:
      break;
  }
  LOOM_THROW(ErrorKind::kUnsupported, "backend nccl does not support dtype {}", c10::toString(t));
}

ncclRedOp_t nccl_op(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum:
      return ncclSum;
    case ReduceOp::kMax:
      return ncclMax;
    case ReduceOp::kMin:
      return ncclMin;
    case ReduceOp::kAvg:
      return ncclAvg;
  }
  return ncclSum;
}

char* byte_ptr(const at::Tensor& t) { return static_cast<char*>(t.data_ptr()); }

class NcclWork final : public Work {
 public:
  NcclWork(Info info, std::shared_ptr<CommStats> stats, int device, std::vector<at::Tensor> keep)
      : Work(std::move(info), std::move(stats)),
        device_(device),
        done_(std::make_shared<Event>()),
        keep_(std::move(keep)) {}
  cudaEvent_t event() const { return done_->get(); }
  // For the watchdog, which may outlive this Work: shares the event.
  std::function<bool()> completion_query() const {
    std::shared_ptr<Event> ev = done_;
    return [ev] { return cudaEventQuery(ev->get()) != cudaErrorNotReady; };
  }

 protected:
  bool ends_record_on_wait() const override { return false; }
  bool test() override {
    cudaError_t rc = cudaEventQuery(done_->get());
    if (rc == cudaErrorNotReady) return false;
    LOOM_CHECK_CUDA(rc);
    return true;
  }
  // No host wait: wait() orders the caller's stream instead (on_complete_wait).
  bool block(std::chrono::steady_clock::time_point) override { return true; }
  void on_complete_wait() override {
    DeviceGuard g(device_);
    LOOM_CHECK_CUDA(cudaStreamWaitEvent(glue::current_stream(device_), done_->get(), 0));
  }

 private:
  int device_;
  std::shared_ptr<Event> done_;
  std::vector<at::Tensor> keep_;
};

}  // namespace

std::shared_ptr<NcclCommunicator> NcclCommunicator::create(CommunicatorPtr bootstrap, int device) {
  LOOM_CHECK(bootstrap != nullptr, "NcclCommunicator::create: no bootstrap communicator");
  LOOM_CHECK_KIND(ErrorKind::kUnsupported, glue::torch_has_cuda(),
                  "backend nccl needs a CUDA LibTorch; this build links a CPU-only LibTorch");
  ncclUniqueId id;
  std::memset(&id, 0, sizeof(id));
  if (bootstrap->rank() == 0) LOOM_CHECK_NCCL(ncclGetUniqueId(&id));
  at::Tensor blob = at::empty({int64_t(sizeof(id))}, at::kByte);
  std::memcpy(blob.data_ptr(), &id, sizeof(id));
  bootstrap->broadcast(blob, {/*root=*/0});
  std::memcpy(&id, blob.data_ptr(), sizeof(id));
  DeviceGuard g(device);
  ncclComm_t comm = nullptr;
  LOOM_CHECK_NCCL(ncclCommInitRank(&comm, bootstrap->size(), id, bootstrap->rank()));
  return std::shared_ptr<NcclCommunicator>(
      new NcclCommunicator(comm, bootstrap, device, bootstrap->name(), bootstrap->timeout_s()));
}

NcclCommunicator::NcclCommunicator(ncclComm_t comm, CommunicatorPtr bootstrap, int device,
                                   std::string name, double timeout_s)
    : Communicator(bootstrap->rank(), bootstrap->size(), bootstrap->world_ranks(), std::move(name),
                   timeout_s),
      comm_(comm),
      bootstrap_(std::move(bootstrap)),
      device_(device) {
  DeviceGuard g(device_);
  LOOM_CHECK_CUDA(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
  LOOM_CHECK_CUDA(cudaMalloc(&scratch_, sizeof(float)));
}

NcclCommunicator::~NcclCommunicator() {
  DeviceGuard g(device_);
  if (comm_) {
    if (aborted_) {
      // already torn down
    } else {
      ncclCommDestroy(comm_);
    }
  }
  if (scratch_) cudaFree(scratch_);
  if (stream_) cudaStreamDestroy(stream_);
}

void NcclCommunicator::abort() {
  if (comm_ && !aborted_) {
    ncclCommAbort(comm_);
    aborted_ = true;
  }
}

at::Device NcclCommunicator::device() const {
  return at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(device_));
}

bool NcclCommunicator::reduces_natively(at::ScalarType dtype, ReduceOp op) const {
  if (!is_reduced_precision(dtype)) return true;
  return op == ReduceOp::kMax || op == ReduceOp::kMin;  // exact in any precision
}

template <typename Fn>
WorkPtr NcclCommunicator::launch(Work::Info info, std::vector<at::Tensor> tensors, Fn&& enqueue) {
  LOOM_CHECK_KIND(ErrorKind::kComm, !aborted_, "communicator '{}' was aborted", name());
  DeviceGuard g(device_);
  cudaStream_t caller = glue::current_stream(device_);
  Event ready;
  LOOM_CHECK_CUDA(cudaEventRecord(ready.get(), caller));
  LOOM_CHECK_CUDA(cudaStreamWaitEvent(stream_, ready.get(), 0));
  enqueue();
  for (const auto& t : tensors) glue::record_stream(t, stream_);
  auto work = std::make_shared<NcclWork>(std::move(info), stats_ptr(), device_, std::move(tensors));
  LOOM_CHECK_CUDA(cudaEventRecord(work->event(), stream_));
  FlightRecorder::instance().set_is_done(work->info().recorder_id, work->completion_query());
  return work;
}

WorkPtr NcclCommunicator::do_all_reduce(at::Tensor& t, ReduceOp op, bool, Work::Info info) {
  return launch(std::move(info), {t}, [&] {
    LOOM_CHECK_NCCL(ncclAllReduce(t.data_ptr(), t.data_ptr(), t.numel(), nccl_type(t.scalar_type()),
                                  nccl_op(op), comm_, stream_));
  });
}

WorkPtr NcclCommunicator::do_all_gather(at::Tensor& out, const at::Tensor& in,
                                        const std::vector<int64_t>& counts, bool, Work::Info info) {
  return launch(std::move(info), {out, in}, [&] {
    ncclDataType_t dt = nccl_type(in.scalar_type());
    bool equal =
        std::adjacent_find(counts.begin(), counts.end(), std::not_equal_to<>()) == counts.end();
    if (equal) {
      LOOM_CHECK_NCCL(ncclAllGather(in.data_ptr(), out.data_ptr(), counts[0], dt, comm_, stream_));
      return;
    }
    // Uneven: one broadcast per rank into its slot, fused in a group.
    LOOM_CHECK_NCCL(ncclGroupStart());
    int64_t offset = 0;
    for (int r = 0; r < size(); ++r) {
      char* dst = byte_ptr(out) + offset * out.element_size();
      LOOM_CHECK_NCCL(ncclBroadcast(in.data_ptr(), dst, counts[r], dt, r, comm_, stream_));
      offset += counts[r];
    }
    LOOM_CHECK_NCCL(ncclGroupEnd());
  });
}

WorkPtr NcclCommunicator::do_reduce_scatter(at::Tensor& out, const at::Tensor& in,
                                            const std::vector<int64_t>& counts, ReduceOp op, bool,
                                            Work::Info info) {
  return launch(std::move(info), {out, in}, [&] {
    ncclDataType_t dt = nccl_type(in.scalar_type());
    bool equal =
        std::adjacent_find(counts.begin(), counts.end(), std::not_equal_to<>()) == counts.end();
    if (equal) {
      LOOM_CHECK_NCCL(ncclReduceScatter(in.data_ptr(), out.data_ptr(), counts[0], dt, nccl_op(op),
                                        comm_, stream_));
      return;
    }
    LOOM_CHECK_NCCL(ncclGroupStart());
    int64_t offset = 0;
    for (int r = 0; r < size(); ++r) {
      const char* src = byte_ptr(in) + offset * in.element_size();
      LOOM_CHECK_NCCL(
          ncclReduce(src, out.data_ptr(), counts[r], dt, nccl_op(op), r, comm_, stream_));
      offset += counts[r];
    }
    LOOM_CHECK_NCCL(ncclGroupEnd());
  });
}

WorkPtr NcclCommunicator::do_all_to_all(at::Tensor& out, const at::Tensor& in,
                                        const std::vector<int64_t>& send,
                                        const std::vector<int64_t>& recv, bool, bool,
                                        Work::Info info) {
  return launch(std::move(info), {out, in}, [&] {
    ncclDataType_t dt = nccl_type(in.scalar_type());
    LOOM_CHECK_NCCL(ncclGroupStart());
    int64_t so = 0, ro = 0;
    for (int r = 0; r < size(); ++r) {
      if (send[r] > 0) {
        LOOM_CHECK_NCCL(
            ncclSend(byte_ptr(in) + so * in.element_size(), send[r], dt, r, comm_, stream_));
      }
      if (recv[r] > 0) {
        LOOM_CHECK_NCCL(
            ncclRecv(byte_ptr(out) + ro * out.element_size(), recv[r], dt, r, comm_, stream_));
      }
      so += send[r];
      ro += recv[r];
    }
    LOOM_CHECK_NCCL(ncclGroupEnd());
  });
}

WorkPtr NcclCommunicator::do_broadcast(at::Tensor& t, int root, bool, Work::Info info) {
  return launch(std::move(info), {t}, [&] {
    LOOM_CHECK_NCCL(ncclBroadcast(t.data_ptr(), t.data_ptr(), t.numel(), nccl_type(t.scalar_type()),
                                  root, comm_, stream_));
  });
}

WorkPtr NcclCommunicator::do_p2p(const std::vector<P2POp>& ops, bool, Work::Info info) {
  std::vector<at::Tensor> keep;
  for (const auto& op : ops) {
    // NCCL has no tags: messages between two ranks match in posting order.
    keep.push_back(op.tensor);
  }
  return launch(std::move(info), std::move(keep), [&] {
    LOOM_CHECK_NCCL(ncclGroupStart());
    for (const auto& op : ops) {
      ncclDataType_t dt = nccl_type(op.tensor.scalar_type());
      if (op.kind == P2POp::Kind::kSend) {
        LOOM_CHECK_NCCL(
            ncclSend(op.tensor.data_ptr(), op.tensor.numel(), dt, op.peer, comm_, stream_));
      } else {
        LOOM_CHECK_NCCL(
            ncclRecv(op.tensor.data_ptr(), op.tensor.numel(), dt, op.peer, comm_, stream_));
      }
    }
    LOOM_CHECK_NCCL(ncclGroupEnd());
  });
}

WorkPtr NcclCommunicator::do_barrier(bool, Work::Info info) {
  return launch(std::move(info), {}, [&] {
    LOOM_CHECK_NCCL(ncclAllReduce(scratch_, scratch_, 1, ncclFloat32, ncclSum, comm_, stream_));
  });
}

std::shared_ptr<Communicator> NcclCommunicator::do_split(int color, int key) {
  CommunicatorPtr cpu = bootstrap_->split(color, key);
  DeviceGuard g(device_);
  ncclComm_t sub = nullptr;
  LOOM_CHECK_NCCL(ncclCommSplit(comm_, color < 0 ? NCCL_SPLIT_NOCOLOR : color, key, &sub, nullptr));
  if (color < 0 || sub == nullptr) return nullptr;
  return std::shared_ptr<NcclCommunicator>(new NcclCommunicator(
      sub, cpu, device_, fmt::format("{}/split{}", name(), color), timeout_s()));
}

}  // namespace loom::comm
