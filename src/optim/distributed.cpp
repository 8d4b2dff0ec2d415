#include "loom/optim/distributed.h"

#include <ATen/core/grad_mode.h>

#include <algorithm>
#include <cmath>
#include <unordered_map>

#include "loom/core/error.h"
#include "loom/optim/clip.h"

namespace loom::optim {

DistributedAdamW::DistributedAdamW(std::vector<model::Parameter>* params,
                                   const AdamWOptions& options, comm::CommunicatorPtr dp,
                                   comm::CommunicatorPtr tp, comm::CommunicatorPtr pp)
    : params_(params),
      options_(options),
      dp_(std::move(dp)),
      tp_(std::move(tp)),
      pp_(std::move(pp)) {
  LOOM_INTERNAL_CHECK(dp_ != nullptr, "distributed optimizer without a DP communicator");
  LOOM_CHECK(!params_->empty(), "distributed optimizer: the model has no parameters");
  const auto dtype = params_->front().tensor.scalar_type();
  for (const auto& p : *params_) {
    LOOM_CHECK(p.tensor.scalar_type() == dtype,
               "distributed optimizer: parameter '{}' is {} but '{}' is {}; one flat buffer needs "
               "one dtype",
               p.name, c10::toString(p.tensor.scalar_type()), params_->front().name,
               c10::toString(dtype));
    offsets_.push_back(total_);
    total_ += p.tensor.numel();
  }
  const int64_t n = dp_->size();
  total_ = (total_ + n - 1) / n * n;
  shard_ = total_ / n;
  begin_ = shard_ * dp_->rank();
  const int64_t end = begin_ + shard_;
  for (size_t i = 0; i < params_->size(); ++i) {
    const int64_t lo = std::max(begin_, offsets_[i]);
    const int64_t hi = std::min(end, offsets_[i] + (*params_)[i].tensor.numel());
    if (lo < hi) segments_.push_back({i, lo - offsets_[i], lo - begin_, hi - lo});
  }
  const auto opts = params_->front().tensor.options();
  grad_ = at::zeros({shard_}, opts);
  if (options_.rule == AdamWOptions::Rule::kSgd) return;  // no state
  exp_avg_ = at::zeros({shard_}, opts);
  exp_avg_sq_ = at::zeros({shard_}, opts);
}

at::Tensor DistributedAdamW::to_comm(const at::Tensor& t) const {
  return t.device() == dp_->device() ? t : t.to(dp_->device());
}
at::Tensor DistributedAdamW::from_comm(const at::Tensor& t) const {
  const auto device = params_->front().tensor.device();
  return t.device() == device ? t : t.to(device);
}

void DistributedAdamW::reduce_scatter_gradients() {
  at::NoGradGuard no_grad;
  std::vector<at::Tensor> flat;
  for (const auto& p : *params_) {
    const at::Tensor& g = p.tensor.grad();
    flat.push_back(g.defined() ? g.reshape({-1}).to(p.tensor.scalar_type())
                               : at::zeros({p.tensor.numel()}, p.tensor.options()));
  }
  const int64_t used = offsets_.empty() ? 0 : offsets_.back() + params_->back().tensor.numel();
  if (total_ > used) flat.push_back(at::zeros({total_ - used}, params_->front().tensor.options()));
  at::Tensor in = to_comm(at::cat(flat));
  at::Tensor out = at::empty({shard_}, in.options());
  dp_->reduce_scatter(out, in);
  grad_ = from_comm(out);
}

at::Tensor DistributedAdamW::grad_square_sums() const {
  at::NoGradGuard no_grad;
  // [replicated over TP, sharded over TP] squared sums of the owned range, summed over DP.
  at::Tensor sums = at::zeros({2}, at::kDouble);
  for (const auto& s : segments_) {
    const auto& p = (*params_)[s.param];
    if (p.pipeline_copy) continue;
    const at::Tensor g = grad_.narrow(0, s.shard_offset, s.numel);
    const auto dt = g.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    sums[p.tp_sharded() ? 1 : 0] += g.to(dt).pow(2).sum().to(at::kDouble).cpu();
  }
  at::Tensor t = to_comm(sums);
  dp_->all_reduce(t);
  return t.cpu();
}

void DistributedAdamW::scale_gradients(double coeff) {
  at::NoGradGuard no_grad;
  grad_.mul_(coeff);
}

double DistributedAdamW::clip_grad_norm(double max_norm) {
  const double norm = norm_of_square_sums(grad_square_sums(), tp_.get(), pp_.get());
  const double coeff = clip_coefficient(norm, max_norm);
  if (coeff != 1.0) scale_gradients(coeff);
  return norm;
}

std::vector<at::Tensor> DistributedAdamW::reduced_gradients() const {
  at::Tensor in = to_comm(grad_);
  at::Tensor all = at::empty({total_}, in.options());
  dp_->all_gather(all, in);
  all = from_comm(all);
  std::vector<at::Tensor> out;
  for (size_t i = 0; i < params_->size(); ++i) {
    const at::Tensor& w = (*params_)[i].tensor;
    out.push_back(all.narrow(0, offsets_[i], w.numel()).view(w.sizes()));
  }
  return out;
}

void DistributedAdamW::step(double lr) {
  at::NoGradGuard no_grad;
  ++step_;
  // The owned range of the parameters, as a flat copy the update works on.
  at::Tensor master = at::zeros({shard_}, grad_.options());
  for (const auto& s : segments_) {
    master.narrow(0, s.shard_offset, s.numel)
        .copy_(
            (*params_)[s.param].tensor.detach().reshape({-1}).narrow(0, s.param_offset, s.numel));
  }
  for (const auto& s : segments_) {
    at::Tensor w = master.narrow(0, s.shard_offset, s.numel);
    at::Tensor g = grad_.narrow(0, s.shard_offset, s.numel);
    at::Tensor m, v;  // undefined for SGD
    if (exp_avg_.defined()) {
      m = exp_avg_.narrow(0, s.shard_offset, s.numel);
      v = exp_avg_sq_.narrow(0, s.shard_offset, s.numel);
    }
    adamw_update(w, g, m, v, (*params_)[s.param].weight_decay, lr, step_, options_);
  }
  at::Tensor in = to_comm(master);
  at::Tensor all = at::empty({total_}, in.options());
  dp_->all_gather(all, in);
  all = from_comm(all);
  for (size_t i = 0; i < params_->size(); ++i) {
    at::Tensor& w = (*params_)[i].tensor;
    w.detach().view({-1}).copy_(all.narrow(0, offsets_[i], w.numel()));
  }
}

std::vector<NamedTensor> DistributedAdamW::state() const {
  std::vector<NamedTensor> out;
  if (!exp_avg_.defined()) return out;  // SGD
  at::Tensor full[2];
  const at::Tensor* mine[2] = {&exp_avg_, &exp_avg_sq_};
  for (int k = 0; k < 2; ++k) {
    at::Tensor in = to_comm(*mine[k]);
    full[k] = at::empty({total_}, in.options());
    dp_->all_gather(full[k], in);
    full[k] = from_comm(full[k]);
  }
  for (size_t i = 0; i < params_->size(); ++i) {
    const auto& p = (*params_)[i];
    out.push_back({p.name + ".exp_avg",
                   full[0].narrow(0, offsets_[i], p.tensor.numel()).view(p.tensor.sizes())});
    out.push_back({p.name + ".exp_avg_sq",
                   full[1].narrow(0, offsets_[i], p.tensor.numel()).view(p.tensor.sizes())});
  }
  return out;
}

void DistributedAdamW::load_state(const std::vector<NamedTensor>& state, int64_t step) {
  std::unordered_map<std::string, const at::Tensor*> by_name;
  for (const auto& s : state) by_name[s.name] = &s.tensor;
  at::NoGradGuard no_grad;
  step_ = step;
  if (!exp_avg_.defined()) return;  // SGD
  for (auto [suffix, dst] : {std::pair<const char*, at::Tensor*>{".exp_avg", &exp_avg_},
                             {".exp_avg_sq", &exp_avg_sq_}}) {
    for (const auto& p : *params_) {
      const std::string name = p.name + suffix;
      auto it = by_name.find(name);
      LOOM_CHECK_KIND(ErrorKind::kIO, it != by_name.end(), "optimizer state '{}' is missing", name);
      LOOM_CHECK_KIND(ErrorKind::kIO, it->second->sizes() == p.tensor.sizes(),
                      "optimizer state '{}' has shape {}, the parameter needs {}", name,
                      it->second->sizes(), p.tensor.sizes());
    }
    for (const auto& s : segments_) {
      const auto& p = (*params_)[s.param];
      const at::Tensor& src = *by_name.at(p.name + suffix);
      dst->narrow(0, s.shard_offset, s.numel)
          .copy_(src.reshape({-1}).narrow(0, s.param_offset, s.numel));
    }
  }
}

int64_t DistributedAdamW::state_bytes() const {
  return exp_avg_.defined() ? exp_avg_.nbytes() + exp_avg_sq_.nbytes() : 0;
}

std::unique_ptr<Optimizer> make_optimizer(std::vector<model::Parameter>* params,
                                          const config::JobConfig& job, comm::CommunicatorPtr dp,
                                          comm::CommunicatorPtr tp, comm::CommunicatorPtr pp) {
  const auto options = AdamWOptions::from_config(job.optim());
  if (job.parallel().distributed_optimizer()) {
    LOOM_CHECK_CONFIG(dp != nullptr,
                      "parallel.distributed_optimizer needs the data-parallel group (got none)");
    return std::make_unique<DistributedAdamW>(params, options, std::move(dp), std::move(tp),
                                              std::move(pp));
  }
  return std::make_unique<AdamW>(params, options, std::move(tp), std::move(pp));
}

}  // namespace loom::optim
