#include "loom/parallel/pipeline.h"

#include <fmt/format.h>
#include <torch/csrc/autograd/engine.h>
#include <torch/csrc/autograd/variable.h>

#include <algorithm>
#include <map>
#include <optional>
#include <utility>

#include "loom/core/error.h"
#include "loom/core/timer.h"
#include "loom/core/trace.h"
#include "loom/parallel/weight_grad_store.h"

namespace loom::parallel::pipeline {

namespace {
constexpr int kForwardDir = 0;   // activations, towards the next virtual stage
constexpr int kBackwardDir = 1;  // their gradients, towards the previous one
constexpr int kMaxTag = 32767;   // the MPI standard's smallest allowed MPI_TAG_UB

// What F keeps for B and W of one (micro-batch, chunk).
struct Saved {
  at::Tensor input;               // the received leaf (undefined on the first virtual stage)
  std::vector<at::Tensor> roots;  // tensors backward starts from
  std::vector<at::Tensor> root_grads;
  std::vector<DeferredGrad> deferred;  // a split backward's weight gradients, for W
  bool last_stage = false;
};
// Backward from `roots` (with `grads`) through the autograd engine, accumulating into every leaf's
// .grad(). Unlike autograd::backward it does not compare each gradient's shape with its root's
// current shape: a sent output's storage is released after F (Note: pipeline runner), and the
// graph keeps the shape it was recorded with.
void run_backward(const std::vector<at::Tensor>& roots, const std::vector<at::Tensor>& grads) {
  torch::autograd::edge_list root_edges;
  torch::autograd::variable_list root_grads;
  for (size_t i = 0; i < roots.size(); ++i) {
    if (!roots[i].requires_grad()) continue;
    root_edges.push_back(torch::autograd::impl::gradient_edge(roots[i]));
    root_grads.push_back(grads[i]);
  }
  if (root_edges.empty()) return;
  torch::autograd::Engine::get_default_engine().execute(
      root_edges, root_grads, /*keep_graph=*/false,
      /*create_graph=*/false, /*accumulate_grad=*/true);
}
}  // namespace

PipelineRunner::PipelineRunner(const ScheduleOptions& options, comm::CommunicatorPtr pp)
    : options_(options), pp_(std::move(pp)) {
  const int size = pp_ ? pp_->size() : 1;
  LOOM_CHECK_CONFIG(size == options_.stages,
                    "the pipeline communicator has {} ranks but parallel.pp = {}", size,
                    options_.stages);
  rank_ = pp_ ? pp_->rank() : 0;
  table_ = build_table(options_, rank_);
  check_table(options_, rank_, table_);
  LOOM_CHECK_CONFIG(
      !pp_ || 2 * options_.chunks * options_.microbatches <= kMaxTag + 1,
      "pipeline: {} micro-batches x {} chunks need more message tags than MPI guarantees ({})",
      options_.microbatches, options_.chunks, kMaxTag + 1);
}

namespace {
// "F mb=3 chunk=1": a pass's slice in the trace (Note: traces).
std::string pass_name(const char* pass, const Action& a) {
  return fmt::format("{} mb={} chunk={}", pass, a.microbatch, a.chunk);
}
}  // namespace

int PipelineRunner::tag(int direction, int chunk, int mb) const {
  return (direction * options_.chunks + chunk) * options_.microbatches + mb;
}

at::Tensor PipelineRunner::receive(const RunnerCallbacks& cb, int direction, int chunk, int mb,
                                   RunnerStats& stats) {
  at::Tensor buf = at::empty(cb.shape(mb), cb.activation_options);
  Stopwatch wait;
  trace::Span span(
      "pipeline",
      [&] {
        return fmt::format("wait {} mb={} chunk={}",
                           direction == kForwardDir ? "activations" : "gradient", mb, chunk);
      },
      0);
  wait_for(buf, direction, chunk, mb);
  stats.recv_wait_s += wait.seconds();
  ++stats.recvs;
  return buf;
}

void PipelineRunner::send(const at::Tensor& t, int direction, int to_chunk, int mb, Sends& sends,
                          RunnerStats& stats) {
  // Completed sends release their buffers as the step goes (activation memory stays bounded by
  // what the schedule holds, not by the step's total traffic).
  sends.erase(
      std::remove_if(sends.begin(), sends.end(), [](auto& w) { return w.first->is_completed(); }),
      sends.end());
  const int p = options_.stages;
  const int peer = direction == kForwardDir ? (rank_ + 1) % p : (rank_ + p - 1) % p;
  at::Tensor buf = t.detach().contiguous();
  sends.emplace_back(pp_->isend(buf, peer, tag(direction, to_chunk, mb)), buf);
  ++stats.sends;
  stats.bytes_sent += static_cast<int64_t>(buf.nbytes());
}

void PipelineRunner::wait_for(at::Tensor& buf, int direction, int chunk, int mb) {
  const int p = options_.stages;
  const int peer = direction == kForwardDir ? (rank_ + p - 1) % p : (rank_ + 1) % p;
  try {
    pp_->irecv(buf, peer, tag(direction, chunk, mb))->wait();
  } catch (const Error& e) {
    if (e.kind() != ErrorKind::kTimeout) throw;
    // Name what was awaited from whom: a stage that failed or stopped responding mid-schedule.
    LOOM_THROW(ErrorKind::kTimeout,
               "pipeline stage {} (world rank {}) waited {:.0f} s for the {} of micro-batch {} "
               "(chunk {}) from "
               "pipeline stage {} (world rank {}): that stage, or one it waits for, failed or "
               "stopped responding, "
               "and the job cannot go on. {}",
               rank_, pp_->world_ranks()[static_cast<size_t>(rank_)], pp_->timeout_s(),
               direction == kForwardDir ? "activations" : "activation gradient", mb, chunk, peer,
               pp_->world_ranks()[static_cast<size_t>(peer)], e.message());
  }
}

RunnerStats PipelineRunner::run(const RunnerCallbacks& cb) {
  const int p = options_.stages, v = options_.chunks;
  const int last_vs = p * v - 1;
  RunnerStats stats;
  std::map<std::pair<int, int>, Saved> saved;  // (mb, chunk) -> what B and W need
  Sends sends;
  auto vstage = [&](int chunk) { return chunk * p + rank_; };

  int in_flight = 0;
  for (const Action& a : table_) {
    if (cb.before_pass) cb.before_pass(a);
    const int s = vstage(a.chunk);
    const auto key = std::make_pair(a.microbatch, a.chunk);
    if (a.pass == Pass::kForward) {
      Saved sv;
      if (s > 0) {
        // From the previous virtual stage: rank r - 1 with the same chunk, or rank p - 1 with the
        // previous chunk.
        sv.input = receive(cb, kForwardDir, a.chunk, a.microbatch, stats).requires_grad_(true);
      }
      Stopwatch compute;
      std::optional<trace::Span> span;
      span.emplace(
          "compute", [&] { return pass_name("F", a); }, 0);
      ChunkOutput out = cb.forward(a.chunk, a.microbatch, sv.input);
      span.reset();
      stats.forward_s += compute.seconds();
      sv.last_stage = s == last_vs;
      if (!sv.last_stage) {
        LOOM_CHECK(out.hidden.defined(),
                   "pipeline: chunk {} returned no hidden states for micro-batch {}", a.chunk,
                   a.microbatch);
        send(out.hidden, kForwardDir, rank_ == p - 1 ? a.chunk + 1 : a.chunk, a.microbatch, sends,
             stats);
        if (out.hidden.grad_fn()) {
          // Megatron's deallocate_output_tensor: B needs the output's place in the graph, not its
          // values (the next stage holds those). The send keeps its own reference until complete.
          stats.released_bytes += static_cast<int64_t>(out.hidden.nbytes());
          out.hidden.set_data(at::empty({0}, out.hidden.options()));
        }
        sv.roots.push_back(out.hidden);
        sv.root_grads.emplace_back();  // filled by B
      }
      if (out.loss.defined() && out.loss.requires_grad()) {
        sv.roots.push_back(out.loss);
        sv.root_grads.push_back(at::ones_like(out.loss));
      }
      saved.emplace(key, std::move(sv));
      stats.peak_in_flight = std::max(stats.peak_in_flight, ++in_flight);
      continue;
    }
    auto it = saved.find(key);
    LOOM_INTERNAL_CHECK(it != saved.end(), "pipeline: {} without its forward", a.str());
    Saved& sv = it->second;
    if (a.pass == Pass::kBackward) {
      if (!sv.last_stage)
        sv.root_grads[0] = receive(cb, kBackwardDir, a.chunk, a.microbatch, stats);
      Stopwatch compute;
      const bool split = options_.split_backward();
      {
        trace::Span span(
            "compute", [&] { return pass_name(split ? "B (input)" : "B", a); }, 0);
        // Split: the whole backward except the deferred weight GEMMs (Note: deferred weight
        // gradients).
        std::optional<WeightGradStore::Capture> capture;
        if (split) capture.emplace();
        run_backward(sv.roots, sv.root_grads);
        if (split) sv.deferred = capture->take();
      }
      stats.backward_s += compute.seconds();
      if (s > 0) {
        at::Tensor grad = sv.input.grad().defined() ? sv.input.grad() : at::zeros_like(sv.input);
        send(grad, kBackwardDir, rank_ == 0 ? a.chunk - 1 : a.chunk, a.microbatch, sends, stats);
      }
      if (!split) {
        saved.erase(it);
        --in_flight;
      } else {
        sv.roots.clear();  // the graph is freed; W needs only what the deferred work holds
        sv.root_grads.clear();
        sv.input = at::Tensor();
      }
      continue;
    }
    // W: the weight gradients B deferred.
    Stopwatch compute;
    stats.deferred_grads += static_cast<int64_t>(sv.deferred.size());
    trace::Span span(
        "compute", [&] { return pass_name("W", a); }, 0);
    WeightGradStore::run(sv.deferred);
    stats.backward_s += compute.seconds();
    saved.erase(it);
    --in_flight;
  }
  LOOM_INTERNAL_CHECK(saved.empty(),
                      "pipeline: {} micro-batch-chunks still hold activations after the step",
                      saved.size());
  for (auto& [work, buf] : sends) work->wait();
  stats.compute_s = stats.forward_s + stats.backward_s;
  return stats;
}

RunnerStats PipelineRunner::forward_only(const RunnerCallbacks& cb, int microbatches) {
  LOOM_CHECK(microbatches >= 0 && microbatches <= options_.microbatches,
             "pipeline: forward_only over {} micro-batches, the runner was built for at most {}",
             microbatches, options_.microbatches);
  const int p = options_.stages, v = options_.chunks;
  const int last_vs = p * v - 1;
  RunnerStats stats;
  Sends sends;
  // (chunk, micro-batch) in lexicographic order on every rank: each forward's input comes from an
  // earlier entry of the same order on the previous virtual stage, so no rank waits in a cycle.
  for (int c = 0; c < v; ++c) {
    const int s = c * p + rank_;
    for (int mb = 0; mb < microbatches; ++mb) {
      if (cb.before_pass) cb.before_pass(Action{Pass::kForward, mb, c});
      at::Tensor input;
      if (s > 0) input = receive(cb, kForwardDir, c, mb, stats);
      Stopwatch compute;
      trace::Span span(
          "compute", [&] { return fmt::format("F mb={} chunk={} (eval)", mb, c); }, 0);
      ChunkOutput out = cb.forward(c, mb, input);
      stats.forward_s += compute.seconds();
      if (s != last_vs) {
        LOOM_CHECK(out.hidden.defined(),
                   "pipeline: chunk {} returned no hidden states for micro-batch {}", c, mb);
        send(out.hidden, kForwardDir, rank_ == p - 1 ? c + 1 : c, mb, sends, stats);
      }
    }
  }
  for (auto& [work, buf] : sends) work->wait();
  stats.compute_s = stats.forward_s;
  return stats;
}

}  // namespace loom::parallel::pipeline
