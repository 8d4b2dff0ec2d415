// Deferred weight gradients, for the split backward of zero-bubble pipeline schedules.
//
// [Note: deferred weight gradients]
// ZB-H1's B pass must produce the input gradient (the previous stage waits for it) and may leave
// the weight-gradient GEMMs to a later W pass that fills the pipeline's bubbles (Qi et al. 2023; their
// Megatron implementation's WeightGradStore). Loom's weight GEMMs are deferrable: while a Capture is
// alive, the backward of every linear (`parallel::linear`, the column-parallel linear, the MoE
// experts) computes its input gradient, returns no weight gradient, and hands the store a closure
// that computes it from the saved input and output gradient, together with the weight's gradient
// edge as the function saw it (through its dtype cast or expert slice). Everything else (norms,
// biases, embeddings, the router) gets its gradient in B as usual. W then computes every deferred
// gradient and runs one backward from all those edges, so the casts are differentiated and each
// parameter's gradient accumulator runs once, with its hooks (the data-parallel buckets), as in an
// undivided backward. Without a capture nothing is deferred: the functions compute the same
// gradients in place, so every other path is unchanged.
#pragma once

#include <ATen/ATen.h>
#include <torch/csrc/autograd/edge.h>

#include <functional>
#include <vector>

namespace loom::parallel {

struct DeferredGrad {
  std::vector<torch::autograd::Edge> edges;          // where the gradients go (one per tensor)
  std::function<std::vector<at::Tensor>()> compute;  // the gradients, one per edge
};

class WeightGradStore {
 public:
  // Collects deferred work while alive (process-wide: backward functions may run on the autograd
  // engine's device threads). One capture at a time.
  class Capture {
   public:
    Capture();
    ~Capture();
    Capture(const Capture&) = delete;
    Capture& operator=(const Capture&) = delete;
    // The work deferred since the capture began (or the last take()).
    std::vector<DeferredGrad> take();
  };

  // From a backward function: defers `d` if a capture is alive (returns true), else returns false
  // and the caller computes the gradients itself.
  static bool defer(DeferredGrad d);
  // For a linear's backward: its weight gradient gy2d^T x2d ([out, n] x [n, in]), where `weight` is
  // the weight input as the function saw it (its gradient edge is where the result goes). Deferred
  // while a capture is alive (returns an undefined tensor), else computed and returned.
  static at::Tensor linear_weight_grad(const at::Tensor& weight, const at::Tensor& gy2d, const at::Tensor& x2d);
  // Computes the gradients of `work` and backpropagates them from its edges in one pass.
  static void run(std::vector<DeferredGrad>& work);
};

// at::linear(x, weight, bias) whose weight gradient is deferrable (bias gradients are not).
at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias = {});

}  // namespace loom::parallel
