// The pipeline runner: executes one rank's schedule table ([Note: pipeline schedule tables]) on its
// model chunks, moving activations and their gradients between neighbouring stages.
//
// [Note: pipeline runner]
// For each action of the table, in order:
//   F(mb, c): the input comes from the previous virtual stage (none on the first), received into a
//             fresh leaf that requires grad; `forward` runs the chunk; the output is sent to the next
//             virtual stage (none on the last), and input, output and losses are kept for B. The
//             output's storage is released once sent (Megatron's deallocate_output_tensor): B needs
//             its place in the graph, not its values, so only the send holds them, until it completes.
//   B(mb, c): the output gradient comes from the next virtual stage (on the last one the losses are
//             the roots); backward runs; the input gradient is sent to the previous virtual stage.
//             With a split backward (ZB-H1) the weight GEMMs are deferred ([Note: deferred weight
//             gradients]) and B frees the graph.
//   W(mb, c): the deferred weight gradients of that micro-batch.
// Virtual stage of chunk c on pipeline rank r: c * pp + r. Messages are tagged by (direction, chunk,
// micro-batch), so a receive matches its send whatever order the neighbours post them in; sends are
// non-blocking and waited for at the end of the step, and a rank blocks only on the receive its next
// pass needs. Under this model every table that check_table() accepts and simulate() completes runs
// without deadlock. A receive that does not complete within comm.timeout_s (the peer stage failed or
// stopped responding) is a kTimeout error naming both stages and the micro-batch, which the launcher
// turns into an abort of the job. Shapes need no exchange: every stage reads the micro-batch, so
// `shape(mb)` is known on both sides even when sequence lengths vary from micro-batch to
// micro-batch.
//
// The runner knows nothing of the loss: `forward` returns the terms to differentiate, already
// scaled ([Note: loss scaling]).
#pragma once

#include <ATen/ATen.h>

#include <functional>
#include <utility>
#include <vector>

#include "loom/comm/communicator.h"
#include "loom/parallel/pipeline_schedule.h"

namespace loom::parallel::pipeline {

struct ChunkOutput {
  at::Tensor hidden;  // [s, b, h] to send on (undefined on the last virtual stage)
  at::Tensor loss;    // scalar to differentiate on this stage (the scaled loss on the last virtual
                      // stage, the scaled MoE auxiliary losses elsewhere); undefined if none
};

struct RunnerCallbacks {
  // Runs chunk `chunk` on micro-batch `mb`. `input` is undefined on the first virtual stage.
  std::function<ChunkOutput(int chunk, int mb, const at::Tensor& input)> forward;
  // Shape of the activation entering virtual stage > 0 for micro-batch `mb` ([s, b, h]; SP: [s/tp, b, h]).
  std::function<std::vector<int64_t>(int mb)> shape;
  at::TensorOptions activation_options;  // dtype and device of activations on the wire
  // Optional: called before every pass (e.g. to tell data-parallel gradient buckets whether the
  // backward that follows is the last micro-batch's for that chunk).
  std::function<void(const Action&)> before_pass;
};

struct RunnerStats {
  int64_t sends = 0, recvs = 0;
  int64_t bytes_sent = 0;
  double recv_wait_s = 0;   // time blocked on receives (the bubble as this rank sees it, plus transfer)
  double compute_s = 0;     // time in forward / backward / weight passes
  double forward_s = 0;     // the F part of compute_s
  double backward_s = 0;    // the B and W part of compute_s
  int peak_in_flight = 0;   // most micro-batch-chunks holding activations at once
  int64_t released_bytes = 0;  // sent outputs whose storage was released after F (see the note)
  int64_t deferred_grads = 0;  // weight-gradient GEMMs a split backward moved from B to W
};

class PipelineRunner {
 public:
  // `pp`: the pipeline communicator (rank r = pipeline stage r); null or size 1 for one stage.
  PipelineRunner(const ScheduleOptions& options, comm::CommunicatorPtr pp);

  // Runs this rank's table for one training step. Parameter gradients accumulate in .grad().
  RunnerStats run(const RunnerCallbacks& cb);

  // Forward passes only (evaluation; the caller holds a NoGradGuard): every chunk in order, every
  // micro-batch through it, activations passed on as in run(). `microbatches` may differ from the
  // options' (at most the options' count, which sizes the message tags).
  RunnerStats forward_only(const RunnerCallbacks& cb, int microbatches);

  const ScheduleOptions& options() const { return options_; }
  const Table& table() const { return table_; }
  int rank() const { return rank_; }

 private:
  using Sends = std::vector<std::pair<comm::WorkPtr, at::Tensor>>;  // in flight, with their buffers

  int tag(int direction, int chunk, int mb) const;
  // A fresh buffer of `cb.shape(mb)` received from the neighbour `direction` names (counted in stats).
  at::Tensor receive(const RunnerCallbacks& cb, int direction, int chunk, int mb, RunnerStats& stats);
  // Sends `t` to the neighbour `direction` names, for its chunk `to_chunk`; drops completed sends.
  void send(const at::Tensor& t, int direction, int to_chunk, int mb, Sends& sends, RunnerStats& stats);
  // Receives into `buf` from the neighbour `direction` names; a timeout (comm.timeout_s) becomes a
  // kTimeout error naming this stage, the peer stage and the awaited micro-batch.
  void wait_for(at::Tensor& buf, int direction, int chunk, int mb);

  ScheduleOptions options_;
  comm::CommunicatorPtr pp_;
  int rank_ = 0;
  Table table_;
};

}  // namespace loom::parallel::pipeline
