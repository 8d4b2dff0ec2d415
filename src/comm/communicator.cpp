#include "loom/comm/communicator.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <numeric>

#include "loom/comm/flight_recorder.h"
#include "loom/core/error.h"
#include "loom/core/hash.h"

namespace loom::comm {
namespace {

int64_t nbytes(const at::Tensor& t) { return t.numel() * static_cast<int64_t>(t.element_size()); }

bool supported_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
    case at::kDouble:
    case at::kBFloat16:
    case at::kHalf:
    case at::kInt:
    case at::kLong:
    case at::kChar:
    case at::kByte:
    case at::kBool:
      return true;
    default:
      return false;
  }
}

// Elements per row (dim 0): the product of the other dims; a 0-d tensor is one row of one element.
int64_t row_elems(const at::Tensor& t) {
  int64_t n = 1;
  for (int64_t d = 1; d < t.dim(); ++d) n *= t.size(d);
  return n;
}

int64_t rows(const at::Tensor& t) { return t.dim() == 0 ? 1 : t.size(0); }

}  // namespace

Communicator::Communicator(int rank, int size, std::vector<int> world_ranks, std::string name,
                           double timeout_s)
    : rank_(rank),
      size_(size),
      world_ranks_(std::move(world_ranks)),
      name_(std::move(name)),
      timeout_s_(timeout_s),
      stats_(std::make_shared<CommStats>()) {
  LOOM_INTERNAL_CHECK(static_cast<int>(world_ranks_.size()) == size_,
                      "communicator '{}': {} world ranks for size {}", name_, world_ranks_.size(),
                      size_);
}

Communicator::~Communicator() = default;

void Communicator::set_timeout_s(double seconds) {
  LOOM_CHECK(seconds > 0, "communicator '{}': timeout must be > 0 s, got {}", name_, seconds);
  timeout_s_ = seconds;
}

bool Communicator::reduces_natively(at::ScalarType dtype, ReduceOp op) const {
  return !is_reduced_precision(dtype);
}

void Communicator::check_tensor(const at::Tensor& t, const char* op, const char* what) const {
  LOOM_CHECK(t.defined(), "{} on communicator '{}': {} is undefined", op, name_, what);
  LOOM_CHECK(t.is_contiguous(), "{} on communicator '{}': {} must be contiguous", op, name_, what);
  LOOM_CHECK(supported_dtype(t.scalar_type()),
             "{} on communicator '{}': backend {} does not support dtype {} ({})", op, name_,
             backend(), c10::toString(t.scalar_type()), what);
  LOOM_CHECK(t.device().type() == device().type(),
             "{} on communicator '{}': {} is on {}, but backend {} works on {} tensors", op, name_,
             what, t.device().str(), backend(), device().str());
}

void Communicator::check_peer(int peer, const char* op) const {
  LOOM_CHECK(peer >= 0 && peer < size_, "{} on communicator '{}': peer rank {} is outside [0, {})",
             op, name_, peer, size_);
}

Work::Info Communicator::begin(OpKind kind, int64_t bytes, std::string detail, bool async) {
  Work::Info info;
  info.comm = name_;
  // Collectives and point-to-point operations count separately (as in c10d): every member makes
  // the same collectives in the same order, so their numbers agree across ranks and the desync
  // report can compare them; sends and receives pair ranks and have their own count.
  bool p2p = kind == OpKind::kSend || kind == OpKind::kRecv;
  info.seq = p2p ? p2p_seq_++ : seq_++;
  info.kind = kind;
  info.bytes = bytes;
  info.default_timeout_s = timeout_s_;
  info.start = std::chrono::steady_clock::now();
  // Blocking calls are watched by the watchdog (they cannot time out by themselves); async ones
  // time out in Work::wait, or are watched when the backend has a thread-safe completion query.
  bool watched = !async || watchdog_watches_async();
  if (recorder_key_name_ != name_ || recorder_key_.empty()) {
    // Unique in the job as long as live communicators of one backend have distinct names or
    // members; this object's first operation under the name starts its progress afresh (an
    // earlier communicator of the same key would otherwise lend it its sequence numbers).
    // Short (it is copied into every recorder entry): the members as a size and a hash.
    recorder_key_ = fmt::format("{}:{}@{}x{:016x}", backend(), name_, world_ranks_.size(),
                                fnv1a64(fmt::format("{}", fmt::join(world_ranks_, ","))));
    recorder_key_name_ = name_;
    FlightRecorder::instance().forget(recorder_key_);
  }
  info.recorder_id =
      FlightRecorder::instance().start(name_, recorder_key_, world_ranks_, info.seq, kind, bytes,
                                       std::move(detail), watched ? timeout_s_ : 0.0);
  return info;
}

WorkPtr Communicator::finish(WorkPtr work, bool async) {
  if (!async) work->wait();
  return work;
}

// ---- all_reduce -----------------------------------------------------------------------------

WorkPtr Communicator::all_reduce_impl(at::Tensor& tensor, const AllReduceOptions& opts,
                                      bool async) {
  check_tensor(tensor, "all_reduce", "tensor");
  check_reducible(tensor.scalar_type(), opts.op, "all_reduce");
  Work::Info info = begin(
      OpKind::kAllReduce, nbytes(tensor),
      fmt::format("{} {}", c10::toString(tensor.scalar_type()), reduce_op_name(opts.op)), async);
  ReduceOp op = opts.op == ReduceOp::kAvg ? ReduceOp::kSum : opts.op;
  bool upcast = !reduces_natively(tensor.scalar_type(), op);
  at::Tensor buf = upcast ? tensor.to(at::kFloat) : tensor;
  WorkPtr work = do_all_reduce(buf, op, async, std::move(info));
  if (opts.op == ReduceOp::kAvg) {
    int n = size_;
    work->add_finalizer([buf, n]() mutable { buf.div_(n); });
  }
  if (upcast) {
    work->add_finalizer([buf, tensor]() mutable { tensor.copy_(buf); });
  }
  return finish(std::move(work), async);
}

void Communicator::all_reduce(at::Tensor& tensor, const AllReduceOptions& opts) {
  all_reduce_impl(tensor, opts, false);
}
WorkPtr Communicator::iall_reduce(at::Tensor& tensor, const AllReduceOptions& opts) {
  return all_reduce_impl(tensor, opts, true);
}

// ---- shared checks --------------------------------------------------------------------------

void Communicator::check_pair(const at::Tensor& input, const at::Tensor& output,
                              const char* op) const {
  check_tensor(input, op, "input");
  check_tensor(output, op, "output");
  LOOM_CHECK(input.scalar_type() == output.scalar_type(),
             "{} on communicator '{}': input dtype {} != output dtype {}", op, name_,
             c10::toString(input.scalar_type()), c10::toString(output.scalar_type()));
}

void Communicator::check_reducible(at::ScalarType dtype, ReduceOp op, const char* what) const {
  LOOM_CHECK_KIND(ErrorKind::kUnsupported, dtype != at::kBool,
                  "{} on communicator '{}': backend {} does not reduce bool tensors", what, name_,
                  backend());
  LOOM_CHECK_KIND(ErrorKind::kUnsupported,
                  !(at::isIntegralType(dtype, /*includeBool=*/false) && op == ReduceOp::kAvg),
                  "{} on communicator '{}': avg is not defined for integer dtype {}; use sum", what,
                  name_, c10::toString(dtype));
}

std::vector<int64_t> Communicator::split_counts(const std::vector<int64_t>& splits,
                                                const at::Tensor& t, const char* op,
                                                const char* what) const {
  std::vector<int64_t> counts(size_);
  if (splits.empty()) {
    LOOM_CHECK(t.numel() % size_ == 0,
               "{} on communicator '{}': {} has {} elements, not divisible by {} ranks", op, name_,
               what, t.numel(), size_);
    std::fill(counts.begin(), counts.end(), t.numel() / size_);
    return counts;
  }
  LOOM_CHECK(static_cast<int>(splits.size()) == size_,
             "{} on communicator '{}': {} {} split sizes for {} ranks", op, name_, splits.size(),
             what, size_);
  int64_t total = std::accumulate(splits.begin(), splits.end(), int64_t{0});
  LOOM_CHECK(total == rows(t), "{} on communicator '{}': {} split sizes sum to {} rows, {} has {}",
             op, name_, what, total, what, rows(t));
  int64_t row = row_elems(t);
  for (int r = 0; r < size_; ++r) {
    LOOM_CHECK(splits[r] >= 0, "{} on communicator '{}': negative {} split size {} for rank {}", op,
               name_, what, splits[r], r);
    counts[r] = splits[r] * row;
  }
  return counts;
}

// ---- all_gather -----------------------------------------------------------------------------

WorkPtr Communicator::all_gather_impl(at::Tensor& output, const at::Tensor& input,
                                      const AllGatherOptions& opts, bool async) {
  check_pair(input, output, "all_gather");
  if (opts.output_split_sizes.empty()) {
    LOOM_CHECK(output.numel() == input.numel() * size_,
               "all_gather on communicator '{}': output has {} elements, expected {} x {} = {}",
               name_, output.numel(), size_, input.numel(), input.numel() * size_);
  }
  std::vector<int64_t> counts =
      split_counts(opts.output_split_sizes, output, "all_gather", "output");
  LOOM_CHECK(counts[rank_] == input.numel(),
             "all_gather on communicator '{}': this rank's share of the output is {} elements, but "
             "input has {}",
             name_, counts[rank_], input.numel());
  Work::Info info = begin(OpKind::kAllGather, nbytes(output),
                          fmt::format("{}{}", c10::toString(input.scalar_type()),
                                      opts.output_split_sizes.empty() ? "" : " uneven"),
                          async);
  return finish(do_all_gather(output, input, counts, async, std::move(info)), async);
}

void Communicator::all_gather(at::Tensor& output, const at::Tensor& input,
                              const AllGatherOptions& opts) {
  all_gather_impl(output, input, opts, false);
}
WorkPtr Communicator::iall_gather(at::Tensor& output, const at::Tensor& input,
                                  const AllGatherOptions& opts) {
  return all_gather_impl(output, input, opts, true);
}

// ---- reduce_scatter -------------------------------------------------------------------------

WorkPtr Communicator::reduce_scatter_impl(at::Tensor& output, const at::Tensor& input,
                                          const ReduceScatterOptions& opts, bool async) {
  check_pair(input, output, "reduce_scatter");
  check_reducible(input.scalar_type(), opts.op, "reduce_scatter");
  if (opts.input_split_sizes.empty()) {
    LOOM_CHECK(input.numel() == output.numel() * size_,
               "reduce_scatter on communicator '{}': input has {} elements, expected {} x {} = {}",
               name_, input.numel(), size_, output.numel(), output.numel() * size_);
  }
  std::vector<int64_t> counts =
      split_counts(opts.input_split_sizes, input, "reduce_scatter", "input");
  LOOM_CHECK(counts[rank_] == output.numel(),
             "reduce_scatter on communicator '{}': this rank's share of the input is {} elements, "
             "but output has {}",
             name_, counts[rank_], output.numel());
  Work::Info info = begin(
      OpKind::kReduceScatter, nbytes(input),
      fmt::format("{} {}", c10::toString(input.scalar_type()), reduce_op_name(opts.op)), async);
  ReduceOp op = opts.op == ReduceOp::kAvg ? ReduceOp::kSum : opts.op;
  bool upcast = !reduces_natively(input.scalar_type(), op);
  at::Tensor in = upcast ? input.to(at::kFloat) : input;
  at::Tensor out = upcast ? at::empty(output.sizes(), output.options().dtype(at::kFloat)) : output;
  WorkPtr work = do_reduce_scatter(out, in, counts, op, async, std::move(info));
  if (opts.op == ReduceOp::kAvg) {
    int n = size_;
    work->add_finalizer([out, n]() mutable { out.div_(n); });
  }
  if (upcast) {
    work->add_finalizer([out, output]() mutable { output.copy_(out); });
  }
  return finish(std::move(work), async);
}

void Communicator::reduce_scatter(at::Tensor& output, const at::Tensor& input,
                                  const ReduceScatterOptions& opts) {
  reduce_scatter_impl(output, input, opts, false);
}
WorkPtr Communicator::ireduce_scatter(at::Tensor& output, const at::Tensor& input,
                                      const ReduceScatterOptions& opts) {
  return reduce_scatter_impl(output, input, opts, true);
}

// ---- all_to_all -----------------------------------------------------------------------------

WorkPtr Communicator::all_to_all_impl(at::Tensor& output, const at::Tensor& input,
                                      const AllToAllOptions& opts, bool async) {
  check_pair(input, output, "all_to_all");
  if (opts.input_split_sizes.empty() && opts.output_split_sizes.empty()) {
    LOOM_CHECK(input.numel() == output.numel(),
               "all_to_all on communicator '{}': input has {} elements, output {}", name_,
               input.numel(), output.numel());
  }
  std::vector<int64_t> send = split_counts(opts.input_split_sizes, input, "all_to_all", "input");
  std::vector<int64_t> recv = split_counts(opts.output_split_sizes, output, "all_to_all", "output");
  Work::Info info = begin(OpKind::kAllToAll, nbytes(input),
                          fmt::format("{}{}", c10::toString(input.scalar_type()),
                                      opts.input_split_sizes.empty() ? "" : " uneven"),
                          async);
  const bool uneven = !opts.input_split_sizes.empty() || !opts.output_split_sizes.empty();
  return finish(do_all_to_all(output, input, send, recv, async, uneven, std::move(info)), async);
}

void Communicator::all_to_all(at::Tensor& output, const at::Tensor& input,
                              const AllToAllOptions& opts) {
  all_to_all_impl(output, input, opts, false);
}
WorkPtr Communicator::iall_to_all(at::Tensor& output, const at::Tensor& input,
                                  const AllToAllOptions& opts) {
  return all_to_all_impl(output, input, opts, true);
}

// ---- broadcast ------------------------------------------------------------------------------

WorkPtr Communicator::broadcast_impl(at::Tensor& tensor, const BroadcastOptions& opts, bool async) {
  check_tensor(tensor, "broadcast", "tensor");
  check_peer(opts.root, "broadcast");
  Work::Info info =
      begin(OpKind::kBroadcast, nbytes(tensor),
            fmt::format("{} root={}", c10::toString(tensor.scalar_type()), opts.root), async);
  return finish(do_broadcast(tensor, opts.root, async, std::move(info)), async);
}

void Communicator::broadcast(at::Tensor& tensor, const BroadcastOptions& opts) {
  broadcast_impl(tensor, opts, false);
}
WorkPtr Communicator::ibroadcast(at::Tensor& tensor, const BroadcastOptions& opts) {
  return broadcast_impl(tensor, opts, true);
}

// ---- point to point -------------------------------------------------------------------------

WorkPtr Communicator::p2p_impl(const std::vector<P2POp>& ops, bool async) {
  LOOM_CHECK(!ops.empty(), "batch_isend_irecv on communicator '{}': no operations", name_);
  int64_t send_bytes = 0, recv_bytes = 0;
  std::string detail;
  for (const auto& op : ops) {
    bool is_send = op.kind == P2POp::Kind::kSend;
    check_tensor(op.tensor, is_send ? "send" : "recv", "tensor");
    check_peer(op.peer, is_send ? "send" : "recv");
    LOOM_CHECK(op.tag >= 0, "p2p on communicator '{}': tag must be >= 0, got {}", name_, op.tag);
    (is_send ? send_bytes : recv_bytes) += nbytes(op.tensor);
    if (detail.size() < 200) {
      detail +=
          fmt::format("{}{}{}", detail.empty() ? "" : " ", is_send ? "send->" : "recv<-", op.peer);
    }
  }
  // One recorder entry and Work for the batch; stats count sends and receives separately.
  OpKind kind = send_bytes > 0 ? OpKind::kSend : OpKind::kRecv;
  Work::Info info = begin(kind, send_bytes > 0 ? send_bytes : recv_bytes, detail, async);
  WorkPtr work = do_p2p(ops, async, std::move(info));
  if (send_bytes > 0 && recv_bytes > 0) {
    // The Work records the send side; count the receive side here.
    stats_->record(OpKind::kRecv, recv_bytes, 0.0);
  }
  return finish(std::move(work), async);
}

void Communicator::send(const at::Tensor& tensor, int dst, int tag) {
  p2p_impl({P2POp::send(tensor, dst, tag)}, false);
}
void Communicator::recv(at::Tensor& tensor, int src, int tag) {
  p2p_impl({P2POp::recv(tensor, src, tag)}, false);
}
WorkPtr Communicator::isend(const at::Tensor& tensor, int dst, int tag) {
  return p2p_impl({P2POp::send(tensor, dst, tag)}, true);
}
WorkPtr Communicator::irecv(at::Tensor& tensor, int src, int tag) {
  return p2p_impl({P2POp::recv(tensor, src, tag)}, true);
}
WorkPtr Communicator::batch_isend_irecv(const std::vector<P2POp>& ops) {
  return p2p_impl(ops, true);
}

// ---- barrier and split ----------------------------------------------------------------------

WorkPtr Communicator::barrier_impl(bool async) {
  Work::Info info = begin(OpKind::kBarrier, 0, "", async);
  return finish(do_barrier(async, std::move(info)), async);
}
void Communicator::barrier() { barrier_impl(false); }
WorkPtr Communicator::ibarrier() { return barrier_impl(true); }

std::shared_ptr<Communicator> Communicator::split(int color, int key) {
  Work::Info info = begin(OpKind::kSplit, 0, fmt::format("color={} key={}", color, key), false);
  std::shared_ptr<Communicator> made = do_split(color, key);
  CompletedWork(std::move(info), stats_).wait();
  if (!made) return nullptr;
  std::lock_guard<std::mutex> lock(split_mu_);
  auto& slot = split_cache_[made->world_ranks()];
  if (auto cached = slot.lock()) return cached;  // `made` is released: same members, same group
  slot = made;
  return made;
}

void all_reduce_host(at::Tensor& t, Communicator* comm, ReduceOp op) {
  if (comm == nullptr || comm->size() == 1) return;
  at::Tensor d = t.to(comm->device()).contiguous();
  comm->all_reduce(d, {op});
  if (d.data_ptr() != t.data_ptr()) t.copy_(d);
}

double all_reduce_scalar(double v, Communicator* comm, ReduceOp op) {
  at::Tensor t = at::full({1}, v, at::kDouble);
  all_reduce_host(t, comm, op);
  return t.item<double>();
}

}  // namespace loom::comm
