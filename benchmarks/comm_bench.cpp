// comm_bench: Loom's collectives against raw MPI, in the style of nccl-tests.
//
// For each operation and each message size (nccl-tests' "size": the all-reduce/broadcast buffer,
// the gathered output of all-gather, the full input of reduce-scatter, the send buffer of
// all-to-all) it first validates the Loom call against exact expected values (#wrong, summed over
// ranks), then times the Loom call and the same raw MPI call on the same communicator, alternating
// them iteration by iteration after a barrier. An iteration's time is the slowest rank's; the table
// shows medians, algbw = size / time, busbw = algbw x nccl-tests' factor (all-reduce 2(n-1)/n;
// all-gather, reduce-scatter, all-to-all (n-1)/n; broadcast 1), and the overhead ratio
// loom / mpi. The goal: ratio <= 1.05 for messages >= 1 MiB.
//
//   mpirun -np 8 --oversubscribe build/cpu/benchmarks/comm_bench [--max-bytes 64M] [--json out.json]
#include <ATen/Parallel.h>
#include <mpi.h>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <vector>

#include "loom/comm/bootstrap.h"
#include "loom/comm/mpi_communicator.h"
#include "loom/core/cli.h"
#include "loom/core/error.h"

namespace {

using loom::comm::Communicator;
using loom::comm::MpiCommunicator;

struct Row {
  std::string op;
  int64_t bytes, count;
  double loom_us, mpi_us, algbw, busbw, ratio;
  int64_t wrong;
};

at::ScalarType parse_dtype(const std::string& s) {
  if (s == "float32" || s == "float") return at::kFloat;
  if (s == "float64" || s == "double") return at::kDouble;
  if (s == "int32") return at::kInt;
  if (s == "int64") return at::kLong;
  if (s == "bfloat16" || s == "bf16") return at::kBFloat16;
  LOOM_THROW(loom::ErrorKind::kConfig,
             "flag --dtype: unknown dtype '{}' (float32, float64, int32, int64, bfloat16)", s);
}

// Rank r's value at index i: a small integer in [-8, 8], so every sum over <= 64 ranks is exact.
at::Tensor pattern(int r, int64_t n, at::ScalarType dtype) {
  at::Tensor i = at::arange(n, at::kLong);
  return ((i * 7 + (r + 1) * 5) % 17 - 8).to(dtype);
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

double bus_factor(const std::string& op, int n) {
  if (op == "all_reduce") return 2.0 * (n - 1) / n;
  if (op == "broadcast") return 1.0;
  return double(n - 1) / n;
}

class Bench {
 public:
  Bench(std::shared_ptr<MpiCommunicator> comm, at::ScalarType dtype, int iters, int warmup)
      : comm_(std::move(comm)), dtype_(dtype), iters_(iters), warmup_(warmup) {}

  // Returns false when the size does not fit the op (fewer elements than ranks).
  bool run(const std::string& op, int64_t bytes, Row* row) {
    int n = comm_->size(), r = comm_->rank();
    int64_t elt = at::elementSize(dtype_);
    int64_t count = bytes / elt;
    bool split_op = op != "all_reduce" && op != "broadcast";
    if (split_op) count -= count % n;
    if (count < (split_op ? n : 1)) return false;
    int64_t per = split_op ? count / n : count;

    // Buffers: `in`/`out` for Loom and raw MPI alike (nccl-tests style, one set per size).
    at::Tensor in, out;
    if (op == "all_reduce" || op == "broadcast") {
      in = pattern(r, count, dtype_);
      out = in;
    } else if (op == "all_gather") {
      in = pattern(r, per, dtype_);
      out = at::empty({count}, dtype_);
    } else if (op == "reduce_scatter") {
      in = pattern(r, count, dtype_);
      out = at::empty({per}, dtype_);
    } else {  // all_to_all
      in = pattern(r, count, dtype_);
      out = at::empty({count}, dtype_);
    }

    // 1. Validate the Loom call against the exact answer.
    at::Tensor expected = expected_result(op, count, per);
    if (op == "all_reduce" || op == "broadcast") in.copy_(pattern(r, count, dtype_));
    loom_call(op, in, out);
    at::Tensor got = (op == "all_reduce" || op == "broadcast") ? in : out;
    int64_t wrong = at::ne(got.to(at::kDouble), expected).sum().item<int64_t>();
    MPI_Allreduce(MPI_IN_PLACE, &wrong, 1, MPI_INT64_T, MPI_SUM, comm_->handle());

    // 2. Time both, alternating, after warm-up. Fewer iterations for big messages.
    int iters = static_cast<int>(std::clamp<int64_t>((int64_t(1) << 30) / std::max<int64_t>(bytes, 1), 5, iters_));
    for (int i = 0; i < warmup_; ++i) {
      loom_call(op, in, out);
      mpi_call(op, in, out);
    }
    std::vector<double> loom_t, mpi_t;
    for (int i = 0; i < iters; ++i) {
      for (int which = 0; which < 2; ++which) {
        bool loom_first = i % 2 == 0;
        bool is_loom = (which == 0) == loom_first;
        MPI_Barrier(comm_->handle());
        double t0 = MPI_Wtime();
        if (is_loom) {
          loom_call(op, in, out);
        } else {
          mpi_call(op, in, out);
        }
        double dt = MPI_Wtime() - t0;
        MPI_Allreduce(MPI_IN_PLACE, &dt, 1, MPI_DOUBLE, MPI_MAX, comm_->handle());
        (is_loom ? loom_t : mpi_t).push_back(dt);
      }
    }
    double lt = median(loom_t), mt = median(mpi_t);
    row->op = op;
    row->bytes = count * elt;
    row->count = count;
    row->loom_us = lt * 1e6;
    row->mpi_us = mt * 1e6;
    row->algbw = row->bytes / lt / 1e9;
    row->busbw = row->algbw * bus_factor(op, n);
    row->ratio = lt / mt;
    row->wrong = wrong;
    return true;
  }

 private:
  at::Tensor expected_result(const std::string& op, int64_t count, int64_t per) {
    int n = comm_->size(), r = comm_->rank();
    auto full = [&](int64_t len) {
      at::Tensor acc = at::zeros({len}, at::kDouble);
      for (int s = 0; s < n; ++s) acc += pattern(s, len, at::kDouble);
      return acc.to(dtype_).to(at::kDouble);
    };
    if (op == "all_reduce") return full(count);
    if (op == "broadcast") return pattern(0, count, dtype_).to(at::kDouble);
    if (op == "reduce_scatter") return full(count).narrow(0, r * per, per);
    if (op == "all_gather") {
      std::vector<at::Tensor> parts;
      for (int s = 0; s < n; ++s) parts.push_back(pattern(s, per, dtype_).to(at::kDouble));
      return at::cat(parts);
    }
    // all_to_all: block s of the output is block r of rank s's input.
    std::vector<at::Tensor> parts;
    for (int s = 0; s < n; ++s) {
      parts.push_back(pattern(s, count, dtype_).to(at::kDouble).narrow(0, r * per, per));
    }
    return at::cat(parts);
  }

  void loom_call(const std::string& op, at::Tensor& in, at::Tensor& out) {
    if (op == "all_reduce") {
      comm_->all_reduce(in);
    } else if (op == "all_gather") {
      comm_->all_gather(out, in);
    } else if (op == "reduce_scatter") {
      comm_->reduce_scatter(out, in);
    } else if (op == "all_to_all") {
      comm_->all_to_all(out, in);
    } else {
      comm_->broadcast(in, {0});
    }
  }

  // The same operation through plain MPI. bf16 has no MPI reduction type: the baseline for a bf16
  // reduction is the fp32 reduction of the same element count (what a correct bf16 sum costs).
  void mpi_call(const std::string& op, at::Tensor& in, at::Tensor& out) {
    MPI_Comm c = comm_->handle();
    bool reduce = op == "all_reduce" || op == "reduce_scatter";
    if (dtype_ == at::kBFloat16 && reduce) {
      if (!f32_in_.defined() || f32_in_.numel() != in.numel()) f32_in_ = in.to(at::kFloat);
      if (!f32_out_.defined() || f32_out_.numel() != out.numel()) f32_out_ = out.to(at::kFloat);
      if (op == "all_reduce") {
        MPI_Allreduce(MPI_IN_PLACE, f32_in_.data_ptr(), int(f32_in_.numel()), MPI_FLOAT, MPI_SUM, c);
      } else {
        MPI_Reduce_scatter_block(f32_in_.data_ptr(), f32_out_.data_ptr(), int(f32_out_.numel()),
                                 MPI_FLOAT, MPI_SUM, c);
      }
      return;
    }
    MPI_Datatype dt = MpiCommunicator::mpi_datatype(in.scalar_type());
    int n = comm_->size();
    if (op == "all_reduce") {
      MPI_Allreduce(MPI_IN_PLACE, in.data_ptr(), int(in.numel()), dt, MPI_SUM, c);
    } else if (op == "all_gather") {
      MPI_Allgather(in.data_ptr(), int(in.numel()), dt, out.data_ptr(), int(in.numel()), dt, c);
    } else if (op == "reduce_scatter") {
      MPI_Reduce_scatter_block(in.data_ptr(), out.data_ptr(), int(out.numel()), dt, MPI_SUM, c);
    } else if (op == "all_to_all") {
      MPI_Alltoall(in.data_ptr(), int(in.numel() / n), dt, out.data_ptr(), int(out.numel() / n), dt, c);
    } else {
      MPI_Bcast(in.data_ptr(), int(in.numel()), dt, 0, c);
    }
  }

  std::shared_ptr<MpiCommunicator> comm_;
  at::ScalarType dtype_;
  int iters_, warmup_;
  at::Tensor f32_in_, f32_out_;
};

std::string human(int64_t b) {
  if (b >= (1 << 20)) return fmt::format("{}M", b >> 20);
  if (b >= (1 << 10)) return fmt::format("{}K", b >> 10);
  return fmt::format("{}", b);
}

int run(int argc, char** argv) {
  loom::cli::CommandLine cl(
      argc, argv,
      {{"ops", "all_reduce,all_gather,reduce_scatter,all_to_all,broadcast", "operations to run"},
       {"dtype", "float32", "float32, float64, int32, int64 or bfloat16"},
       {"min-bytes", "8", "smallest message"},
       {"max-bytes", "64M", "largest message"},
       {"factor", "2", "size multiplier between rows"},
       {"iters", "20", "timed iterations per size (fewer above 32 MiB)"},
       {"warmup", "3", "untimed iterations per size"},
       {"json", "", "also write the table as JSON to this path (rank 0)"}},
      "Loom collectives vs raw MPI, nccl-tests style (run under mpirun).");
  if (cl.handled_help()) return 0;
  at::set_num_threads(1);
  loom::comm::Bootstrap boot({}, &argc, &argv);
  auto world = std::dynamic_pointer_cast<MpiCommunicator>(boot.world());
  LOOM_CHECK(world != nullptr, "comm_bench needs the MPI backend");
  at::ScalarType dtype = parse_dtype(cl.get("dtype"));
  int64_t factor = cl.get_int("factor");
  LOOM_CHECK_CONFIG(factor >= 2, "flag --factor must be >= 2, got {}", factor);
  int64_t lo = cl.get_bytes("min-bytes"), hi = cl.get_bytes("max-bytes");
  LOOM_CHECK_CONFIG(lo >= 1 && lo <= hi, "need 1 <= --min-bytes <= --max-bytes, got {} and {}", lo, hi);
  Bench bench(world, dtype, static_cast<int>(cl.get_int("iters")), static_cast<int>(cl.get_int("warmup")));
  bool root = boot.rank() == 0;
  if (root) {
    std::printf("# comm_bench: %d ranks, dtype %s, backend %s; times are medians of the slowest rank\n",
                boot.size(), c10::toString(dtype), world->backend());
    std::printf("# %10s %12s %8s %15s %10s %9s %9s %7s %10s %7s\n", "size", "count", "type", "op",
                "time(us)", "algbw", "busbw", "#wrong", "mpi(us)", "ratio");
  }
  std::vector<Row> rows;
  int64_t total_wrong = 0;
  for (const auto& op : cl.get_list("ops")) {
    LOOM_CHECK_CONFIG(op == "all_reduce" || op == "all_gather" || op == "reduce_scatter" ||
                          op == "all_to_all" || op == "broadcast",
                      "flag --ops: unknown operation '{}'", op);
    for (int64_t bytes = lo; bytes <= hi; bytes *= factor) {
      Row row;
      if (!bench.run(op, bytes, &row)) continue;
      rows.push_back(row);
      total_wrong += row.wrong;
      if (root) {
        std::printf("  %10s %12lld %8s %15s %10.1f %9.3f %9.3f %7lld %10.1f %7.3f\n",
                    human(row.bytes).c_str(), (long long)row.count, c10::toString(dtype),
                    op.c_str(), row.loom_us, row.algbw, row.busbw, (long long)row.wrong,
                    row.mpi_us, row.ratio);
        std::fflush(stdout);
      }
    }
  }
  if (root) {
    // The goal is stated for messages >= 1 MiB: summarise those.
    std::vector<double> big;
    for (const auto& r : rows) {
      if (r.bytes >= (1 << 20)) big.push_back(r.ratio);
    }
    if (!big.empty()) {
      std::printf("# ratio loom/mpi for sizes >= 1 MiB: median %.3f, max %.3f over %zu rows\n",
                  median(big), *std::max_element(big.begin(), big.end()), big.size());
    }
    std::printf("# total #wrong: %lld\n", (long long)total_wrong);
    if (!cl.get("json").empty()) {
      std::ofstream js(cl.get("json"));
      LOOM_CHECK_KIND(loom::ErrorKind::kIO, js.good(), "cannot write --json file '{}'", cl.get("json"));
      js << "{\"ranks\": " << boot.size() << ", \"dtype\": \"" << c10::toString(dtype) << "\", \"rows\": [";
      for (size_t i = 0; i < rows.size(); ++i) {
        const Row& r = rows[i];
        js << (i ? "," : "") << fmt::format(
            "\n  {{\"op\": \"{}\", \"bytes\": {}, \"count\": {}, \"time_us\": {:.3f}, \"algbw_gbps\": {:.4f}, "
            "\"busbw_gbps\": {:.4f}, \"wrong\": {}, \"mpi_time_us\": {:.3f}, \"ratio\": {:.4f}}}",
            r.op, r.bytes, r.count, r.loom_us, r.algbw, r.busbw, r.wrong, r.mpi_us, r.ratio);
      }
      js << "\n]}\n";
    }
  }
  return total_wrong == 0 ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  return loom::cli::guarded_main("comm_bench", [&] { return run(argc, argv); }, 2);
}
