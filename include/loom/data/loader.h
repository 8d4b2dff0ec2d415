// The micro-batch loader: owns the data position, asks the planner for this rank's share of each
// global batch ([Note: step plan]), assembles the micro-batches (fixed windows, or packed documents
// with their boundaries), and reads the next step on a background thread while this one computes.
//
// [Note: loader position]
// The position is the number of samples (windows or documents) consumed from the training split:
// step k reads samples [position, position + global_batch). It is the loader's whole resumable
// state, saved and restored by name ("data.consumed_samples"), so a run resumed from a checkpoint
// continues with the same samples in the same order (in DOCUMENTS mode, the same documents in the
// same packing). A prefetched step is used only if the position still matches when it is asked for
// (a resume in between discards it).
//
// [Note: outlier queue]
// WLB-LLM's outlier delay (data.outlier_tokens > 0, DOCUMENTS mode): a step still reads the next
// global_batch documents, but those of more than outlier_tokens tokens go to a queue (in reading
// order) instead of into the step. The step then takes from the queue: every waiting document once
// data.outlier_batch of them wait (so rare very long documents arrive together, where the balance
// scheduler can spread them, instead of one making a step lopsided), otherwise those that have
// waited data.outlier_delay steps; and the oldest if the step would hold no loss token otherwise.
// Taken outliers follow the step's own documents. The run's last step takes the whole queue. Every
// document is trained exactly once, at most outlier_delay steps after it was read. The step's
// document count then varies, so the queue needs a planner that takes any count: hybrid data
// parallelism's (parallel.hdp), or one DP rank. The queue (each document's index and the position
// of the step that read it) is part of the loader's state: "data.outliers" = n, "data.outlier.<i>"
// and "data.outlier.<i>.read_at", so a resumed run takes the same documents in the same steps.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <deque>
#include <future>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "loom/config.pb.h"
#include "loom/data/source.h"
#include "loom/data/step_plan.h"
#include "loom/model/batch.h"

namespace loom::data {

struct LoaderOptions {
  BatchMode mode = BatchMode::kWindows;
  int64_t seq_len = 0;             // WINDOWS: tokens per window (inputs); DOCUMENTS: longest piece
  int64_t global_batch = 1;        // samples (windows or documents) per step
  int64_t micro_batch_size = 1;    // WINDOWS: rows per micro-batch
  int64_t micro_batch_tokens = 0;  // DOCUMENTS: tokens per micro-batch
  int64_t pad_multiple = 1;  // DOCUMENTS: row length rounded up to this (sequence parallelism)
  int dp_size = 1, dp_rank = 0;
  bool equal_micro_batches = false;  // DOCUMENTS: PlanLayout::equal_micro_batches
  // DOCUMENTS: the outlier queue (Note: outlier queue); outlier_tokens 0: off.
  int64_t outlier_tokens = 0;
  int64_t outlier_delay = 4;
  int64_t outlier_batch = 2;
  // DOCUMENTS: hybrid data parallelism (PlanLayout::hdp): dp_size / dp_rank are the pool's.
  bool hdp = false;
  CostModel cost;
  HdpBalance hdp_balance = HdpBalance::kDp;  // parallel.hdp_balance
  int stages = 1;                            // parallel.pp (the balance modes' bubble)
  double ring = 0;  // HdpOptions::ring, in the cost model's unit (the Trainer's set_ring)
  // Every token id read must lie in [0, vocab_size): an id outside it is a kIO error naming the
  // split, sample and position, whatever data.check_vocab says (that only skips the up-front scan
  // of a whole dataset). 0: unchecked.
  int64_t vocab_size = 0;
  at::Device device = at::kCPU;
  bool prefetch = true;

  PlanLayout layout() const;
  // The options a job's config asks for on DP rank `dp_rank` of `dp_size` (tp_size: sequence
  // parallelism pads packed rows to a multiple of it): train.global_batch_size (0: micro_batch_size
  // x dp), the micro-batch sizes and data.mode. kConfig errors name the field and the arithmetic.
  // `cp_size`: context parallelism splits each row over that many ranks (rows must divide by it,
  // times tp under sequence parallelism; packed rows are padded to such a multiple). Under
  // parallel.hdp pass the pool (dp x cp) as the DP size and rank, and cp_size 1; the cost model is
  // parallel.hdp_cost when given (else the caller sets it).
  static LoaderOptions from_config(const config::JobConfig& job, int dp_size, int dp_rank,
                                   int tp_size, at::Device device, int cp_size = 1);
};

// One step of this rank: its plan and its micro-batches (in the plan's order).
struct StepData {
  int64_t first_sample = 0;  // position of the step's first sample
  StepPlan plan;
  std::vector<model::Batch> batches;
};

class MicroBatchLoader {
 public:
  // `source` must outlive the loader. Throws a kConfig error when the options cannot be planned.
  MicroBatchLoader(const DataSource* source, LoaderOptions options);
  ~MicroBatchLoader();
  MicroBatchLoader(const MicroBatchLoader&) = delete;
  MicroBatchLoader& operator=(const MicroBatchLoader&) = delete;

  // The training step at the current position; advances the position by one global batch and, if
  // asked (`prefetch_next` and options.prefetch), starts reading the following step. `last`: the
  // run's final step, which also takes every document still in the outlier queue (Note: outlier
  // queue), so a finished run has trained each document it read.
  StepData next(bool prefetch_next = true, bool last = false);
  // Any global batch of a split (evaluation: kValid from sample `first_sample`); no position
  // change.
  StepData load(Split split, int64_t first_sample) const;

  // Samples consumed from the training split (Note: loader position).
  int64_t position() const { return position_; }
  void set_position(int64_t consumed_samples);
  // The resumable state by name: {"data.consumed_samples": position, "data.documents": mode}.
  std::map<std::string, int64_t> state() const;
  // Checks a saved state against this loader without changing anything: a missing or negative
  // position, or a position saved in the other data.mode, is a kIO error naming it.
  void check_state(const std::map<std::string, int64_t>& state) const;
  // Restores state() (after check_state()).
  void load_state(const std::map<std::string, int64_t>& state);

  const LoaderOptions& options() const { return options_; }
  // Hybrid data parallelism: the cost model the scheduler balances from now on (the Trainer's
  // start-up fit: Note: hybrid data parallelism cost model). Before the first next() only. A
  // fitted model is part of state() ("data.hdp_cost.a|b|c", the doubles' bits), and a resumed run
  // that fits its own takes the saved one instead, so it plans the same steps the same way.
  bool cost_fitted() const { return cost_fitted_; }
  // HdpOptions::ring (Note: hybrid data parallelism ring cost); before the first next() only.
  void set_ring(double ring) { options_.ring = ring; }
  void set_cost(const CostModel& cost, bool fitted) {
    options_.cost = cost;
    cost_fitted_ = fitted;
  }
  // One line for the log: what a step is made of.
  std::string describe() const;
  // The samples (index, length) of the global batch of `split` from `first_sample`.
  std::vector<SampleRef> global_samples(Split split, int64_t first_sample) const;

  // A document waiting in the outlier queue, and the position of the step that read it.
  struct Outlier {
    int64_t index = 0;
    int64_t length = 0;
    int64_t read_at = 0;
    bool operator==(const Outlier& o) const {
      return index == o.index && length == o.length && read_at == o.read_at;
    }
  };
  const std::deque<Outlier>& outliers() const { return outliers_; }
  // The training samples of the step at `first_sample` with the queue `queue` (Note: outlier
  // queue), which it updates: the documents read that are not outliers, then those taken from the
  // queue. Without the queue, global_samples.
  std::vector<SampleRef> step_samples(int64_t first_sample, std::deque<Outlier>& queue,
                                      bool take_all = false) const;

 private:
  StepData load_samples(Split split, int64_t first_sample, std::vector<SampleRef> samples) const;
  model::Batch assemble(Split split, const std::vector<SampleRef>& samples,
                        const MicroBatchPlan& mb) const;
  int64_t source_of(Split split, int64_t index) const;  // checked against the names
  void check_ids(Split split, int64_t sample, int64_t begin, const int64_t* ids, int64_t n) const;

  const DataSource* source_;
  size_t num_sources_ = 1;  // source_->source_names(): tokens are tagged when there are several
  LoaderOptions options_;
  int64_t position_ = 0;
  std::deque<Outlier> outliers_;
  bool cost_fitted_ = false;
  std::future<StepData> prefetch_;
  int64_t prefetch_position_ = -1;
  std::deque<Outlier> prefetch_outliers_;  // the queue the prefetched step was planned with
};

// Puts a loader back at the position it had when the guard was made, unless commit() was called: a
// training step that fails (a non-finite loss, a peer's error) leaves the data where it was, like
// the parameters, and the loader advances only with the optimizer step.
class PositionGuard {
 public:
  explicit PositionGuard(MicroBatchLoader& loader) : loader_(loader), state_(loader.state()) {}
  ~PositionGuard() {
    if (committed_) return;
    try {
      loader_.load_state(state_);  // the position and the outlier queue, as they were
    } catch (...) {                // (its own state: cannot fail; a destructor must not throw)
    }
  }
  PositionGuard(const PositionGuard&) = delete;
  PositionGuard& operator=(const PositionGuard&) = delete;
  void commit() { committed_ = true; }

 private:
  MicroBatchLoader& loader_;
  std::map<std::string, int64_t> state_;
  bool committed_ = false;
};

}  // namespace loom::data
