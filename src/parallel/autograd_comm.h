// Internal: a communicator passed through a custom autograd function. saved_data holds IValues
// only, so the communicator travels as a raw pointer; the model (or layer) that owns it outlives
// every backward pass of its forwards.
#pragma once

#include <torch/csrc/autograd/custom_function.h>

#include <cstdint>

#include "loom/comm/communicator.h"

namespace loom::parallel::detail {

inline int64_t handle(const comm::CommunicatorPtr& c) { return reinterpret_cast<int64_t>(c.get()); }
inline int64_t handle(comm::Communicator& c) { return reinterpret_cast<int64_t>(&c); }
inline comm::Communicator& from_handle(torch::autograd::AutogradContext* ctx) {
  return *reinterpret_cast<comm::Communicator*>(ctx->saved_data["comm"].toInt());
}

}  // namespace loom::parallel::detail
