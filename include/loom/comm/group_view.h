// A communicator over a subset of another's ranks that creates nothing: every operation is made of
// point-to-point transfers on the parent (Note: group views).
//
// [Note: group views]
// Hybrid data parallelism runs each long sequence on a group of pool ranks chosen per step
// (Note: hybrid data parallelism plan). Creating a communicator per group and step would cost a
// collective over the pool each time (and NCCL communicators take seconds and device memory), so a
// group is a view: member i is parent rank ranks[i], sends and receives go to the parent with the
// ranks translated, and the collectives a group needs (the MoE balance statistics of its sequence,
// a barrier) are built from sends and receives on the parent: every member sends its tensor to
// every other and reduces the received ones in member order, so each member computes the same
// result bit for bit. All members must call the same operations in the same order, as for any
// communicator; transfers of disjoint groups on the same parent never match each other (they join
// different pairs of ranks). A view cannot be split.
#pragma once

#include <vector>

#include "loom/comm/communicator.h"

namespace loom::comm {

// The view of `parent` ranks `ranks` (distinct, in [0, parent->size()), the calling rank among
// them; member i is ranks[i]). Named "<parent>.group[<ranks>]".
CommunicatorPtr make_group_view(const CommunicatorPtr& parent, const std::vector<int>& ranks);

}  // namespace loom::comm
