// The step plan: what this rank computes in one training step, produced by a pure function from
// the global batch's samples and the layout. This is the seam where the balance scheduler plugs in
// (DESIGN.md decision 5): the executor runs whatever plan it is handed.
//
// [Note: step plan]
//
//     loader: the global batch's samples     planner (pure, no communicator)        executor
//     [(index, length), ...] of step k  -->  StepPlan for (dp rank, layout)   -->  micro-batches
//     through
//                                            - micro-batches: rows of pieces        the pipeline
//                                            runner,
//                                              (packed documents), token counts      loss / N, aux
//                                              / M_all
//                                            - N: loss tokens of the global batch
//                                            - M_all: micro-batches over all DP ranks
//
// A sample is a token sequence of `length` tokens whose length - 1 next-token targets all count in
// the loss: a fixed window (seq_len + 1 tokens) or a whole document. A piece is a contiguous part
// of one sample, [begin, begin + tokens + 1): `tokens` inputs and `tokens` targets; a sample longer
// than the budget is cut into consecutive pieces that share their boundary token, so every target
// of the sample is predicted exactly once. A row of a micro-batch holds pieces back to back;
// attention never crosses a piece and positions restart at 0 in each one ([Note: packed
// sequences]).
//
// Modes:
//   WINDOWS: DP rank r takes samples [r G/dp, (r+1) G/dp) of the G samples, in micro-batches of
//            micro_batch_size rows of one window each (today's fixed-shape batches).
//   DOCUMENTS: DP rank r takes the same contiguous share of the documents, cuts each into pieces of
//            at most max_piece_tokens tokens (the context length; every piece but a document's
//            last is that long), and packs them first-fit, in order, into micro-batches of one row
//            of at most micro_batch_tokens tokens (padded up to a multiple of pad_multiple with
//            positions that do not count, for sequence parallelism).
// Either way N = sum of (length - 1) over the whole global batch and M_all is the number of
// micro-batches of every DP rank, both computed here for all ranks (so no communication is needed),
// which makes the loss per token over the global batch whatever the packing and the split.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace loom::data {

enum class BatchMode { kWindows, kDocuments };

struct SampleRef {
  int64_t index = 0;   // the sample's index in its split
  int64_t length = 0;  // its tokens (inputs + the last target), >= 2
};

// Tokens [begin, begin + tokens + 1) of global-batch sample `sample` (an index into the samples
// handed to plan_step): `tokens` inputs, `tokens` targets.
struct Piece {
  int64_t sample = 0;
  int64_t begin = 0;
  int64_t tokens = 0;
};

struct MicroBatchPlan {
  std::vector<std::vector<Piece>> rows;  // [rows][pieces in the row]
  int64_t row_len = 0;                   // positions per row, padding included
  int64_t tokens = 0;                    // real (non-padding) input tokens = loss tokens
  // Hybrid data parallelism: the pool ranks that run this micro-batch's one sequence together with
  // ring attention, in ring order, and this rank's place among them (its share: model::cp_shard of
  // the whole row over group.size() ranks). Empty: this rank alone. `rows`, `row_len` and `tokens`
  // describe the whole sequence, which every member assembles.
  std::vector<int> group;
  int group_rank = 0;
};

struct StepPlan {
  std::vector<MicroBatchPlan> micro_batches;  // this rank's, in execution order
  int64_t loss_tokens = 0;                    // N: over the whole global batch
  int64_t global_micro_batches = 0;           // M_all: over every DP rank
  // Sum over the global batch's pieces (each an attention sequence) of tokens^2: the attention
  // term of the step's model FLOPs (ModelSpec::step_flops), whatever the packing.
  double sequence_tokens_sq = 0;
  int64_t global_samples = 0;
  // Real tokens of this rank's micro-batches (a group share: its sequence's over the group size).
  int64_t local_tokens() const;
};

// T(s) = a s^2 + b s + c: the time (any unit) one rank spends on a sequence of s tokens.
struct CostModel {
  double a = 0, b = 1, c = 0;
  double operator()(double s) const { return (a * s + b) * s + c; }
  // One member's share of a sequence of s tokens split over a group of d ranks with ring attention
  // (which splits the length terms evenly): (a s^2 + b s) / d + c.
  double share(double s, double d) const { return (a * s * s + b * s) / d + c; }
  std::string describe() const;
};

// Note: hybrid data parallelism balance modes.
enum class HdpBalance {
  kDp,  // DP-balance: equal sums of micro-batch costs
  kPp,  // PP-balance: equal pipeline times, sum + (stages - 1) x the costliest micro-batch
};
// "dp" / "pp" (parallel.hdp_balance; "" picks pp when `stages` > 1, else dp); throws a kConfig
// error naming the value otherwise.
HdpBalance parse_hdp_balance(const std::string& name, int stages);
std::string hdp_balance_name(HdpBalance balance);

// The time of one planned micro-batch on this rank under `cost`: the sum of its pieces' T(s), or
// for a group member its share of the group's sequence, (a s^2 + b s) / D + c.
double micro_batch_cost(const MicroBatchPlan& mb, const CostModel& cost);
// Tokens of the longest sequence in a planned micro-batch (a group's: the whole sequence).
int64_t longest_sequence(const MicroBatchPlan& mb);

// ByteScale's selective offload rule (arXiv 2502.21231, section 5): the largest share r of a
// rank's `layers` layers whose saved activations can be copied to host memory while the forward
// computes, so that offloading costs no time. A micro-batch of `tokens` tokens whose forward takes
// `forward_seconds` saves `bytes_per_token_layer` bytes per token and layer; copying r * layers
// layers' worth at `bandwidth` bytes/s takes r * layers * tokens * bytes / bandwidth, which must
// not exceed the forward:
//     r = forward_seconds * bandwidth / (layers * tokens * bytes_per_token_layer),
// rounded down to whole layers (floor(r * layers) / layers), at most `max_ratio`. Attention makes
// the time grow faster than the tokens, so a longer sequence offloads more (and the copies back
// have the backward, about twice as long, to hide behind). 0 for an empty micro-batch.
double offload_ratio(double forward_seconds, double tokens, int64_t layers,
                     double bytes_per_token_layer, double bandwidth, double max_ratio);

// Which micro-batches offload how much (train.offload_*; Note: activation offload).
struct OffloadRule {
  double max_ratio = 0;    // train.offload_fraction; 0: no offload
  int64_t min_tokens = 0;  // only micro-batches whose longest sequence has at least this many
  double bandwidth = 0;    // bytes/s; > 0: offload_ratio with the cost model in seconds
  int64_t layers = 1;      // this rank's layers, over its model chunks
  double bytes_per_token_layer = 0;
  double forward_share = 1.0 / 3;  // of a micro-batch's time (1/4 under full recomputation)
};

// The offload share of one planned micro-batch on this rank: 0 when its longest sequence is below
// rule.min_tokens; else rule.max_ratio, or with a bandwidth offload_ratio(forward_share *
// micro_batch_cost(mb, cost), its tokens on this rank (a group member's share: tokens / D), ...).
double offload_share(const MicroBatchPlan& mb, const CostModel& cost, const OffloadRule& rule);

struct PlanLayout {
  BatchMode mode = BatchMode::kWindows;
  int dp_size = 1, dp_rank = 0;
  int64_t micro_batch_size = 1;    // WINDOWS: rows per micro-batch
  int64_t micro_batch_tokens = 0;  // DOCUMENTS: token budget of a micro-batch (its one row)
  int64_t max_piece_tokens = 0;    // DOCUMENTS: longest piece (the model's context, train.seq_len)
  int64_t pad_multiple = 1;        // DOCUMENTS: row length rounded up to a multiple of this
  // DOCUMENTS: every DP rank gets as many micro-batches as the busiest one, the others' plans
  // ending in empty ones (one row of pad_multiple padding positions, no loss token). A forward that
  // communicates over the data-parallel domain (the MoE GLOBAL_BATCH balance) needs the same
  // number of micro-batches everywhere; M_all then counts the empty ones too.
  bool equal_micro_batches = false;
  // DOCUMENTS under hybrid data parallelism (Note: hybrid data parallelism plan): the dp_size ranks
  // are one pool; the global batch's pieces (of at most max_piece_tokens) are planned by
  // data::plan_hdp with a capacity of micro_batch_tokens per rank and `cost`, and the plan is laid
  // out in slots (Note: hybrid data parallelism slots): every rank runs as many micro-batches.
  bool hdp = false;
  CostModel cost;
  HdpBalance hdp_balance = HdpBalance::kDp;  // Note: hybrid data parallelism balance modes
  int stages = 1;                            // pipeline stages (parallel.pp)
  double ring = 0;                           // HdpOptions::ring
};

// The plan of this rank (layout.dp_rank) for a global batch. Pure and deterministic: every rank
// computes every rank's share the same way. Throws a kConfig error when the samples cannot be
// planned (WINDOWS: samples not divisible over dp x micro_batch_size or of unequal lengths).
StepPlan plan_step(const std::vector<SampleRef>& samples, const PlanLayout& layout);

// "WINDOWS" / "DOCUMENTS".
std::string batch_mode_name(BatchMode mode);

}  // namespace loom::data
