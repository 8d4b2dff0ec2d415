// Pipeline-parallel schedules as explicit tables (one per rank), a checker and a simulator.
//
// [Note: pipeline schedule tables]
// A schedule is, for every pipeline rank, the ordered list of passes it runs in one training step:
// F (forward of a micro-batch through one model chunk), B (its backward; with a split backward only
// the input gradient) and W (the deferred weight gradient of a split backward). One runner executes
// any table, so a schedule is just data: it can be printed, checked and simulated without running
// a model.
//
// Model chunks (virtual stages): with v chunks per rank and p ranks the model is cut into p v
// virtual stages; chunk c of rank r is virtual stage c p + r (Megatron-Core's interleaving), so a
// micro-batch visits ranks 0..p-1 with chunk 0, then 0..p-1 again with chunk 1, and so on.
//
// Schedules (p ranks, m micro-batches, rank r):
//   kAllForwardAllBackward  GPipe: F(0..m-1) then B(0..m-1). The reference; keeps m in flight.
//   k1F1B                   PipeDream-flush / Megatron: w = min(p - r - 1, m) warm-up forwards,
//                           then (F, B) pairs, then the w remaining backwards. At most p in flight.
//   kInterleaved1F1B        Megatron-Core's interleaving over v chunks with micro-batch groups of
//                           size g (default p, p <= g <= m, m % g == 0 or >= p): the forward order
//                           is the table of (micro-batch, chunk) pairs taking g micro-batches
//                           through chunk 0, the same g through chunk 1, ..., then the next group;
//                           the k-th backward is the k-th entry with the chunk mirrored (v - 1 -
//                           c). Warm-up: min((p - r - 1) 2 + (v - 1) g, m v) forwards, then (F, B)
//                           pairs, then the remaining backwards.
//   kZeroBubbleH1           ZB-H1 (Qi et al. 2023, "Zero Bubble Pipeline Parallelism"): 1F1B's
//                           order of F and B with the backward split into B (input gradient) and
//                           W (weight gradient). B is on the critical path between stages, W is
//                           not: rank r defers its first min(r, m - w) W passes (the later the
//                           stage, the longer its 1F1B cool-down idles), runs F, B, W in the steady
//                           state and B, W pairs in the cool-down, then the deferred W passes fill
//                           its tail. At most p micro-batches in flight on every rank (1F1B's
//                           peak, which only rank 0 reaches there).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "loom/config.pb.h"

namespace loom::parallel::pipeline {

enum class Pass : uint8_t {
  kForward,   // F
  kBackward,  // B: the whole backward, or only the input gradient when the schedule splits it
  kWeight,    // W: the deferred weight gradient of a split backward
};
const char* pass_name(Pass p);  // "F", "B", "W"

struct Action {
  Pass pass = Pass::kForward;
  int microbatch = 0;
  int chunk = 0;  // model chunk on this rank (virtual stage chunk * stages + rank)

  bool operator==(const Action& o) const {
    return pass == o.pass && microbatch == o.microbatch && chunk == o.chunk;
  }
  std::string str() const;  // "F3", "B0.1" (micro-batch 0, chunk 1)
};

enum class ScheduleKind : uint8_t {
  kAllForwardAllBackward,
  k1F1B,
  kInterleaved1F1B,
  kZeroBubbleH1
};
const char* schedule_name(ScheduleKind k);  // "afab", "1f1b", "interleaved", "zb-h1"
// Parses the names above (the config's `parallel.pp_schedule`); a kConfig error lists them.
ScheduleKind parse_schedule(const std::string& name);

struct ScheduleOptions;
// The schedule a job's `parallel` section asks for on `stages` pipeline ranks (kind: pp_schedule,
// or interleaved when virtual_pp > 1, else 1F1B; chunks: virtual_pp; group: pp_microbatch_group).
// The micro-batch count is left at 1: it is the step's. kConfig errors name the field.
ScheduleOptions schedule_from_config(const config::ParallelConfig& par, int stages);

struct ScheduleOptions {
  ScheduleKind kind = ScheduleKind::k1F1B;
  int stages = 1;        // p: pipeline ranks
  int chunks = 1;        // v: model chunks per rank (> 1 only for kInterleaved1F1B)
  int microbatches = 1;  // m
  int group = 0;         // interleaved: micro-batches per chunk in a row (0 = stages)

  bool split_backward() const { return kind == ScheduleKind::kZeroBubbleH1; }
  int virtual_stages() const { return stages * chunks; }
};

using Table = std::vector<Action>;

// Checks the options against what the schedule needs (a kConfig error naming the field and the
// reason: stages >= 1, micro-batches >= 1, chunks > 1 only when interleaved, the interleaved
// group within [stages, micro-batches] and its last group empty or at least `stages` long).
void check_options(const ScheduleOptions& o);

// The table of pipeline rank `rank` (after check_options).
Table build_table(const ScheduleOptions& o, int rank);
std::vector<Table> build_tables(const ScheduleOptions& o);

// Checks a table against the definition every schedule shares: each (micro-batch, chunk) has
// exactly one F and one B, and one W iff the backward is split; its B comes after its F and its W
// after its B. Throws a kInternal error naming the rank and the offending action.
void check_table(const ScheduleOptions& o, int rank, const Table& t);

// Number of warm-up forwards (forwards before the first backward) of a table.
int warmup_forwards(const Table& t);

// [Note: pipeline simulation]
// Runs the tables of every rank with fixed pass times and a fixed transfer time between stages.
// A rank runs its table in order; a pass starts when the rank is free and its inputs have arrived:
//   F(mb, s) needs F(mb, s - 1) on the previous virtual stage (s > 0), plus `p2p`;
//   B(mb, s) needs F(mb, s) and B(mb, s + 1) on the next virtual stage (s < last), plus `p2p`;
//   W(mb, s) needs B(mb, s).
// Sends never block (receives are posted ahead, as the runner does). If no rank can start its next
// pass the tables deadlock: a kInternal error lists every rank's stuck pass.
struct PassCosts {
  double forward = 1.0;
  double backward = 2.0;  // the whole backward, or the input-gradient part when split
  double weight = 0.0;    // W, when split
  double p2p = 0.0;
};

struct Simulation {
  double makespan = 0;              // time when the last rank finishes
  std::vector<double> busy;         // per rank: time spent in passes
  std::vector<int> peak_in_flight;  // per rank: most micro-batch-chunks whose F ran and whose last
                                    // backward pass (B, or W when split) has not (activations held)
  double bubble_fraction() const;   // 1 - sum(busy) / (ranks * makespan)
  // Start and end of every action, per rank, in table order.
  std::vector<std::vector<std::pair<double, double>>> spans;
};

Simulation simulate(const ScheduleOptions& o, const std::vector<Table>& tables, const PassCosts& c);

// The bubble fraction the literature gives for these options and costs (no transfer time):
//   AFAB, 1F1B:   (p - 1) (F + B + W) / (m (F + B + W) + (p - 1) (F + B + W)) = (p - 1) / (m + p -
//   1) interleaved:  (p - 1) / (v m + p - 1)  (the 1F1B bubble with chunks v times shorter) ZB-H1:
//   (p - 1) (F + B - W) / (m (F + B + W) + (p - 1) (F + B - W))   (W <= F, B)
double theoretical_bubble(const ScheduleOptions& o, const PassCosts& c);

// One line per rank, e.g. "rank 1: F0 F1 B0 F2 B1 B2", for logs and error messages.
std::string format_tables(const std::vector<Table>& tables);

}  // namespace loom::parallel::pipeline
