#include "loom/parallel/weight_grad_store.h"

#include <ATen/core/grad_mode.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/engine.h>
#include <torch/csrc/autograd/variable.h>

#include <atomic>
#include <mutex>

#include "loom/core/error.h"

namespace loom::parallel {

namespace {
std::mutex g_mu;
std::atomic<bool> g_capturing{false};
std::vector<DeferredGrad>& pending() {
  static std::vector<DeferredGrad> v;
  return v;
}

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct LinearFn : torch::autograd::Function<LinearFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const at::Tensor& bias) {
    const bool has_bias = bias.numel() > 0;  // an empty tensor stands for none
    ctx->saved_data["bias"] = has_bias;
    ctx->save_for_backward({x, weight});
    return at::linear(x, weight, has_bias ? bias : at::Tensor());
  }
  static variable_list backward(AutogradContext* ctx, variable_list g) {
    auto saved = ctx->get_saved_variables();
    const at::Tensor& x = saved[0];
    const at::Tensor& w = saved[1];
    const at::Tensor gy = g[0];
    const int64_t out = w.size(0), in = w.size(1);
    at::Tensor gx = ctx->needs_input_grad(0) ? at::matmul(gy, w) : at::Tensor();
    at::Tensor gy2 = gy.reshape({-1, out});
    at::Tensor gb = ctx->saved_data["bias"].toBool() ? gy2.sum(0) : at::Tensor();
    at::Tensor gw = ctx->needs_input_grad(1) ? WeightGradStore::linear_weight_grad(w, gy2, x.reshape({-1, in}))
                                             : at::Tensor();
    return {gx, gw, gb};
  }
};
}  // namespace

WeightGradStore::Capture::Capture() {
  std::lock_guard<std::mutex> lock(g_mu);
  LOOM_INTERNAL_CHECK(!g_capturing.load(), "weight-gradient store: a capture is already alive");
  pending().clear();
  g_capturing = true;
}

WeightGradStore::Capture::~Capture() {
  std::lock_guard<std::mutex> lock(g_mu);
  g_capturing = false;
  pending().clear();
}

std::vector<DeferredGrad> WeightGradStore::Capture::take() {
  std::lock_guard<std::mutex> lock(g_mu);
  std::vector<DeferredGrad> out;
  out.swap(pending());
  return out;
}

bool WeightGradStore::defer(DeferredGrad d) {
  if (!g_capturing.load()) return false;
  std::lock_guard<std::mutex> lock(g_mu);
  if (!g_capturing.load()) return false;
  pending().push_back(std::move(d));
  return true;
}

at::Tensor WeightGradStore::linear_weight_grad(const at::Tensor& weight, const at::Tensor& gy2d,
                                               const at::Tensor& x2d) {
  if (defer({{torch::autograd::impl::gradient_edge(weight)},
             [gy2d, x2d] { return std::vector<at::Tensor>{gy2d.t().mm(x2d)}; }})) {
    return at::Tensor();
  }
  return gy2d.t().mm(x2d);
}

void WeightGradStore::run(std::vector<DeferredGrad>& work) {
  torch::autograd::edge_list roots;
  torch::autograd::variable_list grads;
  for (auto& d : work) {
    std::vector<at::Tensor> g = d.compute();
    LOOM_INTERNAL_CHECK(g.size() == d.edges.size(), "deferred gradient: {} tensors for {} edges", g.size(),
                        d.edges.size());
    for (size_t i = 0; i < g.size(); ++i) {
      if (!g[i].defined() || !d.edges[i].is_valid()) continue;
      roots.push_back(d.edges[i]);
      grads.push_back(std::move(g[i]));
    }
  }
  work.clear();
  if (roots.empty()) return;
  torch::autograd::Engine::get_default_engine().execute(roots, grads, /*keep_graph=*/false, /*create_graph=*/false,
                                                        /*accumulate_grad=*/true);
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  if (!weight.requires_grad() || !at::GradMode::is_enabled()) return at::linear(x, weight, bias);
  return LinearFn::apply(x, weight, bias.defined() ? bias : at::empty({0}, weight.options()));
}

}  // namespace loom::parallel
