// The balance scheduler of hybrid data parallelism (ByteScale, arXiv 2502.21231, section 6): a pure
// function from a variable-length global batch to every pool rank's work for the step.
//
// [Note: hybrid data parallelism plan]
// The dp x cp ranks of one (tp, pp) coordinate form a pool of P ranks, each with a capacity of C
// tokens per micro-batch. Every sequence of the global batch (a document of `length` tokens, so
// length - 1 loss tokens) gets as many ranks as its length needs, any number:
//   - a short one (length - 1 <= C) runs whole on one rank, packed with others into micro-batches
//     of at most C tokens;
//   - a long one runs on a group of D >= ceil((length - 1) / C) ranks with ring attention, each
//     holding 1 / D of its tokens (one micro-batch on each member). D is raised, up to P, so that
//     a member's share costs no more than the mean rank's (the step's total cost over P): without
//     it, one very long sequence bounds the step whatever the others do (balance_groups). A
//     sequence that fits C but costs more than the mean rank is split the same way.
// Costs follow the cost model T(s) = a s^2 + b s + c per sequence of s tokens on one rank; a
// group member's share of a long sequence costs (a s^2 + b s) / D + c (ring attention splits the
// quadratic term evenly). The plan:
//   1. Long sequences, longest first: each takes the D ranks of least cost so far (ties: lowest
//      rank), one micro-batch on each, in the order the groups are made.
//   2. Short sequences, longest first (ByteScale's descending order; LPT scheduling): each goes to
//      the rank of least cost so far, into its open micro-batch if the tokens fit, else a new one.
// Each rank runs its group shares first, in group creation order, then its packed micro-batches
// (made in the order of their longest sequences: ByteScale's DP-balance order, at each point of
// the step the ranks work on similar lengths). Deadlock freedom: when each micro-batch's forward
// and backward finish before the next starts (pp = 1), or all forwards precede all backwards in
// the same order, any two groups that share ranks are entered in the same order by all of them, so
// their point-to-point transfers on the pool's one communicator never wait on each other in a
// cycle. Under 1F1B with pipeline parallelism that no longer holds (ranks with different group
// lists interleave forwards and backwards differently), so the Trainer runs the plan laid out in
// slots: every rank the same number of micro-batches, a group's members in the same slot (Note:
// hybrid data parallelism slots in step_plan.cpp). The plan is deterministic: every rank computes
// the whole plan from the same inputs.
//
// [Note: hybrid data parallelism balance modes]
// ByteScale balances in one of two ways (section 6), HdpOptions::balance:
//   DP-balance (pp = 1): a rank's load is the sum of its micro-batches' costs; the steps above
//     even out the sums (LPT).
//   PP-balance (pipeline parallelism, `stages` > 1): a pool rank is one pipeline (its ranks at the
//     other stages run the same micro-batches), and under 1F1B a pipeline of micro-batches costing
//     w_1..w_M takes about (sum_m w_m + (stages - 1) max_m w_m) / stages: the warm-up and cool-down
//     bubbles are set by the costliest micro-batch. That estimate is the load the steps above
//     balance instead of the sum, so a pipeline holding a long sequence's share (a large bubble)
//     gets fewer other micro-batches and the pipelines of short sequences more: ranks run
//     different numbers of real micro-batches, and micro-batches of similar cost share a pipeline.
//     A long sequence's group is sized so that its share, bubble included (stages x the share),
//     costs no more than the mean rank's sum; raising D shrinks the bubble it causes.
// simulate_hdp_step measures a plan the way the Trainer runs it (slots, 1F1B over the stages,
// every group's members in step at each of its operations); tools/plan_sim compares the modes.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "loom/data/step_plan.h"

namespace loom::data {

// The least-squares T(s) through measured (tokens, time) points (at least 3 distinct lengths);
// coefficients that come out negative are clamped to 0 and the rest refitted, so costs grow with
// length. Throws a kConfig error naming the problem for fewer points.
CostModel fit_cost_model(const std::vector<std::pair<double, double>>& points);

// Start-up timings gathered from every rank, times[rank][length], to one time per length: the
// median over the ranks (the mean of the middle two for an even count). A rank descheduled while
// it timed (ranks sharing cores) adds time to its figures only; the median ignores up to half the
// ranks so disturbed, where one such rank moves a mean. Throws a kValue error for no ranks or
// ranks of different lengths.
std::vector<double> median_over_ranks(const std::vector<std::vector<double>>& times);

struct HdpOptions {
  int pool = 1;          // ranks in the pool (dp x cp)
  int64_t capacity = 0;  // C: tokens per rank and micro-batch
  CostModel cost;
  // A sequence whose cost alone exceeds the mean rank's (the step's total over the pool) gets
  // enough ranks to bring its share under it, beyond what its length needs (else that one
  // sequence bounds the step).
  bool balance_groups = true;
  // Megatron-Core's dynamic CP instead of any group size: D rounded up to a power of two (the
  // largest that fits the pool and the sequence's tokens when that is smaller, and the plain need
  // when no power of two fits; for comparisons: tools/plan_sim).
  bool power_of_two_groups = false;
  // Note: hybrid data parallelism balance modes. `stages`: the pipeline stages (parallel.pp).
  HdpBalance balance = HdpBalance::kDp;
  int stages = 1;
  // [Note: hybrid data parallelism ring cost] The time (the cost model's unit) a group member
  // spends per token of its sequence streaming the keys and values around the ring through every
  // layer (3 x K/V bytes per token and layer x layers / link bandwidth: forward K/V, backward K/V
  // and dK/dV). Ring attention overlaps each step's transfer with its block of attention, so a
  // member's share costs max(a s^2 / D, ring s) + b s / D + c, never less than ring s + c however
  // large D is. From D = max(a s, b) / ring on (ring_knee) the share is within twice that floor:
  // more ranks shorten it by less than each adds in traffic (every member streams the whole
  // sequence), so no group is made larger than that, nor than the balance asks, nor smaller than
  // memory needs. The unit is the cost model's: per pipeline stage, this stage's layers (the
  // start-up fit times one stage). 0: transfers hide behind compute, (a s^2 + b s) / D + c.
  double ring = 0;
};

// A member's share of a sequence of s tokens over d ranks under `o` (Note: hybrid data
// parallelism ring cost).
double ring_share(const HdpOptions& o, double s, double d);
// The group size past which more ranks no longer pay for a sequence of s tokens: max(a s, b) /
// ring (a huge number without a ring cost).
double ring_knee(const HdpOptions& o, double s);

// One micro-batch of one rank: whole short sequences, or this rank's share of one long sequence.
struct HdpMicroBatch {
  std::vector<int64_t> samples;  // indices into the global batch; one for a group's share
  int64_t group = -1;            // the long sequence's group (HdpPlan::groups), or -1
  int64_t tokens = 0;            // loss tokens computed here (a group share: this rank's part)
  double cost = 0;
};

// A long sequence and the pool ranks that run it, in ring order.
struct HdpGroup {
  int64_t sample = 0;
  std::vector<int> ranks;
};

struct HdpPlan {
  std::vector<std::vector<HdpMicroBatch>> ranks;  // [pool rank][micro-batch, in execution order]
  std::vector<HdpGroup> groups;                   // in creation order
  int64_t loss_tokens = 0;                        // N of the global batch
  std::vector<double> rank_cost;                  // each rank's total
  int stages = 1;                                 // HdpOptions::stages
  // A rank's pipeline load (Note: hybrid data parallelism balance modes): its total plus
  // (stages - 1) x its costliest micro-batch (the total when stages is 1).
  double pipeline_cost(int rank) const;
  double max_cost() const;
  double mean_cost() const;
  double imbalance() const;  // max / mean (1 = perfect)
};

// The plan for the global batch `samples` (lengths >= 2). Throws a kConfig error naming the
// sequence when one needs more ranks than the pool has, or for a bad option (a pool or capacity
// below 1, a cost coefficient negative or not finite).
HdpPlan plan_hdp(const std::vector<SampleRef>& samples, const HdpOptions& options);

// The plan laid out in slots (Note: hybrid data parallelism slots in step_plan.cpp): [pool rank]
// [slot] -> the index of the micro-batch in plan.ranks[rank] that runs there, or -1 for an empty
// slot. Every rank has the same number of slots; a group's members hold its shares in one slot.
std::vector<std::vector<int>> hdp_slots(const HdpPlan& plan);

// The simulated step of `plan` as the Trainer runs it: laid out in slots (hdp_slots), each pool
// rank a pipeline of `stages` stages running the slots under 1F1B (a stage's warm-up of
// min(stages - 1 - stage, slots) forwards, then one forward and one backward in turn, then the
// remaining backwards), a micro-batch taking `time(rank, micro-batch)` through the whole model:
// 1 / stages of it per stage, a third forward and two thirds backward; an empty slot takes none.
// A forward starts after the previous stage's forward of the slot, a backward after the next
// stage's backward (the last stage's: after its forward), and a group's members run each of its
// operations together (ring attention: it starts when the last member is ready). Transfers between
// stages take no time. Returns each pool rank's finish time (the step's time is the largest).
// Throws a kInternal error if the layout would deadlock (an operation waiting on itself).
std::vector<double> simulate_hdp_step(
    const HdpPlan& plan, int stages,
    const std::function<double(int rank, const HdpMicroBatch& mb)>& time);

}  // namespace loom::data
