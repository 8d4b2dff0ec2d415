// The step executor: runs this rank's micro-batches of a step through its model chunks, forward and
// backward, and evaluation forward-only, on one path whatever the layout.
//
// [Note: step executor]
// There is one executor, the pipeline runner ([Note: pipeline runner]). Without pipeline
// parallelism it runs a one-stage table: 1F1B on one stage is F0 B0 F1 B1 ..., which is Megatron's
// forward_backward_no_pipelining, so the same code computes the same floating-point operations in
// the same order as a hand-written loop (tests/train: bit-identical in fp64 and fp32). The loss
// each stage differentiates is set here and only here ([Note: loss scaling]):
//   the last virtual stage: loss_sum_mb / N  (+ its MoE layers' aux_mb * aux_scale)
//   every other stage:      its MoE layers' aux_mb * aux_scale (nothing for a dense stage)
// where N is the global batch's loss-token count and aux_scale = 1 / (micro-batches x DP). The
// number of micro-batches may change from step to step (packed documents): a runner (schedule
// table) is built per count and kept. Before each backward or W pass the executor tells gradient
// synchronisation whether the pass is the chunk's last of the step (DP buckets launch only then).
#pragma once

#include <ATen/ATen.h>

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "loom/comm/communicator.h"
#include "loom/model/batch.h"
#include "loom/model/gpt.h"
#include "loom/parallel/grad_sync.h"
#include "loom/parallel/pipeline.h"

namespace loom::train {

// What one step's forward and backward produced on this rank.
struct StepSums {
  double loss_sum = 0;  // LM loss summed over this rank's tokens (last virtual stage only)
  double aux_sum = 0;   // MoE auxiliary losses summed over micro-batches (this stage's MoE layers)
  parallel::pipeline::RunnerStats stats;
};

// What an evaluation pass produced on this rank (last virtual stage only; zeros elsewhere).
struct EvalSums {
  double loss_sum = 0;
  double tokens = 0;
};

class StepExecutor {
 public:
  // `chunks`: this rank's model chunks (chunk c = virtual stage c * pp + pp rank), which must
  // outlive the executor. `schedule`: kind, stages, chunks and micro-batch group (its microbatches
  // field is ignored: set per step). `pp`: the pipeline group (null or size 1: one stage). `sync`:
  // told before every backward pass whether it is a chunk's final one (may be null).
  StepExecutor(std::vector<model::GptModel*> chunks, parallel::pipeline::ScheduleOptions schedule,
               comm::CommunicatorPtr pp, parallel::GradSync* sync, at::Device device);
  ~StepExecutor();

  // Forward and backward of `batches` (this rank's micro-batches, in order); parameter gradients
  // accumulate in .grad(). `loss_tokens`: N of the note; `aux_scale` likewise. `before_backward`
  // (optional) runs before this rank's first backward pass of the step (fault injection).
  StepSums train(const std::vector<model::Batch>& batches, double loss_tokens, double aux_scale,
                 const std::function<void()>& before_backward = nullptr);
  // Forward only (the caller holds no-grad): the loss sum and token count over `batches`.
  EvalSums evaluate(const std::vector<model::Batch>& batches);

  // The runner (schedule table) for `microbatches` micro-batches per step, built on first use.
  // Throws a kConfig error when the schedule cannot run that many (e.g. interleaving needs a
  // multiple of the pipeline size).
  const parallel::pipeline::PipelineRunner& runner(int microbatches);
  const parallel::pipeline::ScheduleOptions& schedule() const { return schedule_; }
  int stages() const { return schedule_.stages; }
  // One line for the log: the schedule, stages x chunks, `microbatches` per step and this rank's
  // layers ("1f1b schedule, 2 stages x 1 chunk(s), 8 micro-batches per step; this rank: layers
  // [0, 2) +embedding").
  std::string describe(const std::string& microbatches) const;

 private:
  struct Runner {
    std::unique_ptr<parallel::pipeline::PipelineRunner> runner;
    std::vector<parallel::pipeline::Action>
        final_passes;  // each chunk's last B (and W) of the table
  };
  Runner& runner_for(int microbatches);
  parallel::pipeline::RunnerCallbacks callbacks(const std::vector<model::Batch>& batches) const;

  std::vector<model::GptModel*> chunks_;
  parallel::pipeline::ScheduleOptions schedule_;
  comm::CommunicatorPtr pp_;
  parallel::GradSync* sync_;
  at::Device device_;
  std::map<int, Runner> runners_;
};

}  // namespace loom::train
