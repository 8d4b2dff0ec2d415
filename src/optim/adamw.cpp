#include "loom/optim/adamw.h"

#include <ATen/core/grad_mode.h>

#include <cmath>
#include <unordered_map>

#include "loom/core/error.h"
#include "loom/optim/clip.h"

namespace loom::optim {

AdamWOptions AdamWOptions::from_config(const config::OptimConfig& c) {
  LOOM_CHECK_CONFIG(c.beta1() >= 0 && c.beta1() < 1,
                    "field 'optim.beta1' must be in [0, 1), got {}", c.beta1());
  LOOM_CHECK_CONFIG(c.beta2() >= 0 && c.beta2() < 1,
                    "field 'optim.beta2' must be in [0, 1), got {}", c.beta2());
  LOOM_CHECK_CONFIG(c.eps() > 0, "field 'optim.eps' must be > 0, got {}", c.eps());
  LOOM_CHECK_CONFIG(c.weight_decay() >= 0, "field 'optim.weight_decay' must be >= 0, got {}",
                    c.weight_decay());
  AdamWOptions o;
  o.rule = c.optimizer() == config::OptimConfig::SGD ? AdamWOptions::Rule::kSgd
                                                     : AdamWOptions::Rule::kAdamW;
  o.beta1 = c.beta1();
  o.beta2 = c.beta2();
  o.eps = c.eps();
  o.weight_decay = c.weight_decay();
  return o;
}

AdamW::AdamW(std::vector<model::Parameter>* params, const AdamWOptions& options,
             comm::CommunicatorPtr tp, comm::CommunicatorPtr pp)
    : params_(params), options_(options), tp_(std::move(tp)), pp_(std::move(pp)) {
  if (options_.rule == AdamWOptions::Rule::kSgd) return;  // no state
  for (const auto& p : *params_) {
    exp_avg_.push_back(at::zeros_like(p.tensor, at::MemoryFormat::Contiguous));
    exp_avg_sq_.push_back(at::zeros_like(p.tensor, at::MemoryFormat::Contiguous));
  }
}

void adamw_update(at::Tensor& w, const at::Tensor& g, at::Tensor& m, at::Tensor& v, bool decay,
                  double lr, int64_t step, const AdamWOptions& o) {
  if (o.rule == AdamWOptions::Rule::kSgd) {
    if (decay && o.weight_decay != 0.0) w.mul_(1.0 - lr * o.weight_decay);
    if (g.defined()) w.sub_(g.scalar_type() == w.scalar_type() ? g : g.to(w.scalar_type()), lr);
    return;
  }
  const double b1 = o.beta1, b2 = o.beta2;
  const double bc1 = 1.0 - std::pow(b1, static_cast<double>(step));
  const double bc2 = 1.0 - std::pow(b2, static_cast<double>(step));
  const double step_size = lr / bc1;
  const double bc2_sqrt = std::sqrt(bc2);
  if (g.defined()) {
    const at::Tensor gg = g.scalar_type() == m.scalar_type() ? g : g.to(m.scalar_type());
    m.mul_(b1).add_(gg, 1.0 - b1);
    v.mul_(b2).addcmul_(gg, gg, 1.0 - b2);
  } else {
    m.mul_(b1);
    v.mul_(b2);
  }
  if (decay && o.weight_decay != 0.0) w.mul_(1.0 - lr * o.weight_decay);
  // w -= step_size * m / (sqrt(v) / sqrt(bc2) + eps)
  at::Tensor denom = v.sqrt().div_(bc2_sqrt).add_(o.eps);
  w.addcdiv_(m, denom, -step_size);
}

void AdamW::step(double lr) {
  at::NoGradGuard no_grad;
  ++step_;
  const bool sgd = options_.rule == AdamWOptions::Rule::kSgd;
  at::Tensor none;
  for (size_t i = 0; i < params_->size(); ++i) {
    auto& p = (*params_)[i];
    at::Tensor w = p.tensor;
    adamw_update(w, w.grad(), sgd ? none : exp_avg_[i], sgd ? none : exp_avg_sq_[i], p.weight_decay,
                 lr, step_, options_);
  }
}

std::vector<NamedTensor> AdamW::state() const {
  std::vector<NamedTensor> out;
  for (size_t i = 0; i < exp_avg_.size(); ++i) {
    out.push_back({(*params_)[i].name + ".exp_avg", exp_avg_[i]});
    out.push_back({(*params_)[i].name + ".exp_avg_sq", exp_avg_sq_[i]});
  }
  return out;
}

void AdamW::load_state(const std::vector<NamedTensor>& state, int64_t step) {
  std::unordered_map<std::string, const at::Tensor*> by_name;
  for (const auto& s : state) by_name[s.name] = &s.tensor;
  at::NoGradGuard no_grad;
  for (size_t i = 0; i < exp_avg_.size(); ++i) {
    for (auto [suffix, dst] : {std::pair<const char*, at::Tensor*>{".exp_avg", &exp_avg_[i]},
                               {".exp_avg_sq", &exp_avg_sq_[i]}}) {
      const std::string name = (*params_)[i].name + suffix;
      auto it = by_name.find(name);
      LOOM_CHECK_KIND(ErrorKind::kIO, it != by_name.end(), "optimizer state '{}' is missing", name);
      LOOM_CHECK_KIND(ErrorKind::kIO, it->second->sizes() == dst->sizes(),
                      "optimizer state '{}' has shape {}, the parameter needs {}", name,
                      it->second->sizes(), dst->sizes());
      dst->copy_(*it->second);
    }
  }
  step_ = step;
}

std::vector<std::string> moment_names(const std::vector<model::Parameter>& params,
                                      const AdamWOptions& o) {
  std::vector<std::string> names;
  if (o.rule == AdamWOptions::Rule::kSgd) return names;
  for (const auto& p : params) {
    names.push_back(p.name + ".exp_avg");
    names.push_back(p.name + ".exp_avg_sq");
  }
  return names;
}

std::vector<std::string> AdamW::state_names() const { return moment_names(*params_, options_); }

int64_t AdamW::state_bytes() const {
  int64_t n = 0;
  for (size_t i = 0; i < exp_avg_.size(); ++i) {
    n += exp_avg_[i].nbytes() + exp_avg_sq_[i].nbytes();
  }
  return n;
}

double AdamW::clip_grad_norm(double max_norm) {
  return optim::clip_grad_norm(*params_, max_norm, tp_.get(), pp_.get());
}

at::Tensor AdamW::grad_square_sums() const { return optim::grad_square_sums(*params_); }

void AdamW::scale_gradients(double coeff) {
  at::NoGradGuard no_grad;
  for (const auto& p : *params_) {
    if (p.tensor.grad().defined()) p.tensor.mutable_grad().mul_(coeff);
  }
}

std::vector<at::Tensor> AdamW::reduced_gradients() const {
  std::vector<at::Tensor> out;
  for (const auto& p : *params_) {
    const at::Tensor& g = p.tensor.grad();
    out.push_back(g.defined() ? g.detach() : at::zeros_like(p.tensor));
  }
  return out;
}

}  // namespace loom::optim
