#include "loom/optim/chained.h"

#include <cmath>

#include "loom/core/error.h"
#include "loom/optim/clip.h"

namespace loom::optim {

ChainedOptimizer::ChainedOptimizer(std::vector<model::Parameter>* params,
                                   const config::JobConfig& job, comm::CommunicatorPtr dp,
                                   comm::CommunicatorPtr tp, comm::CommunicatorPtr pp,
                                   ExpertGroups experts)
    : params_(params), tp_(std::move(tp)), pp_(std::move(pp)), experts_(std::move(experts)) {
  LOOM_INTERNAL_CHECK(experts_.dp != nullptr && experts_.ep != nullptr && experts_.group != nullptr,
                      "chained optimizer: the expert groups are required");
  for (size_t i = 0; i < params_->size(); ++i) {
    const auto& p = (*params_)[i];
    (p.ep_sharded() ? expert_ : dense_).push_back(p);
    (p.ep_sharded() ? expert_index_ : dense_index_).push_back(i);
  }
  LOOM_INTERNAL_CHECK(!dense_.empty() && !expert_.empty(),
                      "chained optimizer: {} dense and {} expert parameters (both are needed)",
                      dense_.size(), expert_.size());
  // The parts' own norms are not used (clip_grad_norm combines their sums): no TP or PP groups.
  dense_opt_ = make_optimizer(&dense_, job, std::move(dp), nullptr, nullptr);
  expert_opt_ = make_optimizer(&expert_, job, experts_.dp, nullptr, nullptr);
}

void ChainedOptimizer::step(double lr) {
  dense_opt_->step(lr);
  expert_opt_->step(lr);
}

std::vector<NamedTensor> ChainedOptimizer::state() const {
  std::vector<NamedTensor> out = dense_opt_->state();                // collective over DP (ZeRO-1)
  for (auto& s : expert_opt_->state()) out.push_back(std::move(s));  // over expert DP
  return out;
}

void ChainedOptimizer::load_state(const std::vector<NamedTensor>& state, int64_t step) {
  dense_opt_->load_state(state, step);
  expert_opt_->load_state(state, step);
}

std::vector<std::string> ChainedOptimizer::state_names() const {
  std::vector<std::string> names = dense_opt_->state_names();
  for (auto& n : expert_opt_->state_names()) names.push_back(std::move(n));
  return names;
}

int64_t ChainedOptimizer::state_bytes() const {
  return dense_opt_->state_bytes() + expert_opt_->state_bytes();
}

at::Tensor ChainedOptimizer::grad_square_sums() const {
  return at::cat({dense_opt_->grad_square_sums(), expert_opt_->grad_square_sums()});
}

double ChainedOptimizer::clip_grad_norm(double max_norm) {
  const at::Tensor sums = grad_square_sums();
  // Every element once (Note: optimizers under expert parallelism).
  at::Tensor dense_sharded = sums.narrow(0, 1, 1).clone();
  at::Tensor expert_replicated = sums.narrow(0, 2, 1).clone();
  at::Tensor expert_sharded = sums.narrow(0, 3, 1).clone();
  comm::all_reduce_host(dense_sharded, tp_.get());
  comm::all_reduce_host(expert_replicated, experts_.ep.get());
  comm::all_reduce_host(expert_sharded, experts_.group.get());
  const double sq = sums[0].item<double>() + dense_sharded.item<double>() +
                    expert_replicated.item<double>() + expert_sharded.item<double>();
  const double norm = std::sqrt(comm::all_reduce_scalar(sq, pp_.get()));
  const double coeff = clip_coefficient(norm, max_norm);
  if (coeff != 1.0) scale_gradients(coeff);
  return norm;
}

void ChainedOptimizer::scale_gradients(double coeff) {
  dense_opt_->scale_gradients(coeff);
  expert_opt_->scale_gradients(coeff);
}

std::vector<at::Tensor> ChainedOptimizer::reduced_gradients() const {
  const std::vector<at::Tensor> d = dense_opt_->reduced_gradients();
  const std::vector<at::Tensor> e = expert_opt_->reduced_gradients();
  std::vector<at::Tensor> out(params_->size());
  for (size_t i = 0; i < d.size(); ++i) out[dense_index_[i]] = d[i];
  for (size_t i = 0; i < e.size(); ++i) out[expert_index_[i]] = e[i];
  return out;
}

parallel::GradientShards* ChainedOptimizer::gradient_shards() {
  return dense_opt_->gradient_shards() != nullptr ? this : nullptr;
}

void ChainedOptimizer::reduce_scatter_gradients() {
  dense_opt_->gradient_shards()->reduce_scatter_gradients();
  expert_opt_->gradient_shards()->reduce_scatter_gradients();
}

}  // namespace loom::optim
