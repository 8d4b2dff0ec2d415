#include "loom/optim/clip.h"

#include <ATen/core/grad_mode.h>

#include <cmath>

namespace loom::optim {

double grad_norm(const std::vector<model::Parameter>& params) {
  std::vector<at::Tensor> squares;
  for (const auto& p : params) {
    const at::Tensor& g = p.tensor.grad();
    if (!g.defined()) continue;
    const auto dt = g.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    squares.push_back(g.to(dt).pow(2).sum().to(at::kDouble));
  }
  if (squares.empty()) return 0.0;
  return std::sqrt(at::stack(squares).sum().item<double>());
}

double clip_grad_norm(const std::vector<model::Parameter>& params, double max_norm) {
  const double norm = grad_norm(params);
  if (max_norm <= 0 || !std::isfinite(norm) || norm <= max_norm) return norm;
  const double coeff = max_norm / (norm + 1e-6);
  at::NoGradGuard no_grad;
  for (const auto& p : params) {
    if (p.tensor.grad().defined()) p.tensor.mutable_grad().mul_(coeff);
  }
  return norm;
}

}  // namespace loom::optim
