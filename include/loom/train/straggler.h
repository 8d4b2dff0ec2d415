// Straggler detection: name the ranks that are slower than their peers.
//
// [Note: stragglers] In a synchronous job every rank's step takes as long as the slowest rank's
// (the collectives wait for it), so the step time does not show which rank is slow; its own work
// does. Every logging.straggler_every steps each rank's mean per-step compute (forward and
// backward), data, optimizer and other seconds (the rest of the step, outside those phases and the
// measured communication waits) since the last check are gathered (one small all-reduce over the
// world) and rank 0 compares each rank with the median of the ranks that do the same work: the same
// pipeline stage (stages legitimately differ: embedding, head and loss). A rank slower than
// logging.straggler_factor x that median (and by more than 5 ms) is named in the log, with the
// phase, its time, the median and the ratio. A slow node, a thermally throttled GPU, a noisy
// neighbour or a slow disk (data) show up here long before they become a timeout. With packed
// documents (data.mode DOCUMENTS) the ranks of a stage do unequal attention work within the
// planner's balance, so a factor close to 1 reports that imbalance too; the TP and clipping
// collectives inside compute and optimizer make a slow rank's TP peers look slow with it.
#pragma once

#include <string>
#include <vector>

namespace loom::train {

struct RankTimes {
  int world_rank = 0;
  int group = 0;               // ranks are compared within a group (the pipeline stage)
  std::vector<double> phases;  // seconds per step, one per phase name
};

// One line per (rank, phase) that is slower than factor x the median of its group (groups of one
// rank are not compared): "world rank 3 (stage 0): compute 1.520 s per step, median 1.010 s
// (1.50x)". Pure, for the unit test.
std::vector<std::string> find_stragglers(const std::vector<RankTimes>& ranks,
                                         const std::vector<std::string>& phase_names, double factor,
                                         double min_excess_s = 0.005);

}  // namespace loom::train
