// Shared by the multi-rank tests: the bootstrap and world communicator made by mpi_main.cpp, and
// helpers that make every rank agree on a result before asserting (so that one rank's failure
// cannot leave the others waiting in a collective).
#pragma once

#include <ATen/ATen.h>

#include "loom/comm/bootstrap.h"
#include "loom/comm/communicator.h"

namespace loom::testing {

loom::comm::Bootstrap& bootstrap();
loom::comm::CommunicatorPtr world();

// Sum of `local` over the world.
inline int64_t world_sum(int64_t local) {
  at::Tensor t = at::full({1}, local, at::kLong);
  world()->all_reduce(t);
  return t.item<int64_t>();
}

// Elements of `actual` that differ from `expected` (exact comparison, NaN never equal), summed
// over the world: the nccl-tests "#wrong".
inline int64_t world_wrong(const at::Tensor& actual, const at::Tensor& expected) {
  int64_t local = actual.sizes() != expected.sizes()
                      ? actual.numel() + 1
                      : at::ne(actual.to(at::kDouble), expected.to(at::kDouble)).sum().item<int64_t>();
  return world_sum(local);
}

}  // namespace loom::testing
