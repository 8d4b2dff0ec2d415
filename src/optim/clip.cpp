#include "loom/optim/clip.h"

#include <ATen/core/grad_mode.h>

#include <cmath>

namespace loom::optim {

at::Tensor grad_square_sums(const std::vector<model::Parameter>& params) {
  std::vector<at::Tensor> squares[2];  // [replicated, sharded]
  for (const auto& p : params) {
    const at::Tensor& g = p.tensor.grad();
    if (!g.defined() || p.pipeline_copy) continue;
    const auto dt = g.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    squares[p.tp_sharded() ? 1 : 0].push_back(g.to(dt).pow(2).sum().to(at::kDouble));
  }
  auto total = [](const std::vector<at::Tensor>& v) {
    return v.empty() ? at::zeros({}, at::kDouble) : at::stack(v).sum().cpu();
  };
  return at::stack({total(squares[0]), total(squares[1])});
}

double norm_of_square_sums(const at::Tensor& sums, comm::Communicator* tp, comm::Communicator* pp) {
  at::Tensor sharded = sums.narrow(0, 1, 1).clone();
  comm::all_reduce_host(sharded, tp);
  const double sq = sums[0].item<double>() + sharded.item<double>();
  return std::sqrt(comm::all_reduce_scalar(sq, pp));
}

double grad_norm(const std::vector<model::Parameter>& params, comm::Communicator* tp,
                 comm::Communicator* pp) {
  return norm_of_square_sums(grad_square_sums(params), tp, pp);
}

double clip_coefficient(double norm, double max_norm) {
  if (max_norm <= 0 || !std::isfinite(norm) || norm <= max_norm) return 1.0;
  return max_norm / (norm + 1e-6);
}

double clip_grad_norm(const std::vector<model::Parameter>& params, double max_norm,
                      comm::Communicator* tp, comm::Communicator* pp) {
  const double norm = grad_norm(params, tp, pp);
  const double coeff = clip_coefficient(norm, max_norm);
  if (coeff == 1.0) return norm;
  at::NoGradGuard no_grad;
  for (const auto& p : params) {
    if (p.tensor.grad().defined()) p.tensor.mutable_grad().mul_(coeff);
  }
  return norm;
}

}  // namespace loom::optim
