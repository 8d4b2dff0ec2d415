#include "loom/model/parameter.h"

#include <ATen/CPUGeneratorImpl.h>

#include "loom/core/error.h"
#include "loom/core/hash.h"

namespace loom::model {

uint64_t parameter_seed(uint64_t job_seed, const std::string& name) {
  return splitmix64(splitmix64(job_seed) ^ fnv1a64(name));
}

at::Tensor initial_value(uint64_t job_seed, const std::string& name, at::IntArrayRef shape,
                         Init init, double std) {
  auto cpu = at::TensorOptions().dtype(at::kFloat).device(at::kCPU);
  switch (init) {
    case Init::kOnes:
      return at::ones(shape, cpu);
    case Init::kZeros:
      return at::zeros(shape, cpu);
    case Init::kNormal: {
      LOOM_CHECK(std > 0.0, "parameter '{}': normal init needs std > 0, got {}", name, std);
      auto gen = at::make_generator<at::CPUGeneratorImpl>(parameter_seed(job_seed, name));
      auto t = at::empty(shape, cpu);
      t.normal_(0.0, std, gen);
      return t;
    }
  }
  LOOM_THROW(ErrorKind::kInternal, "unknown init for parameter '{}'", name);
}

ParameterFactory::ParameterFactory(std::shared_ptr<std::vector<Parameter>> registry,
                                   uint64_t job_seed, at::TensorOptions options, std::string prefix,
                                   int tp_size, int tp_rank)
    : registry_(std::move(registry)),
      job_seed_(job_seed),
      options_(options),
      prefix_(std::move(prefix)),
      tp_size_(tp_size),
      tp_rank_(tp_rank) {}

ParameterFactory ParameterFactory::child(const std::string& name) const {
  return ParameterFactory(registry_, job_seed_, options_,
                          prefix_.empty() ? name : prefix_ + "." + name, tp_size_, tp_rank_);
}

at::Tensor ParameterFactory::make(const std::string& name, at::IntArrayRef shape, Init init,
                                  double std, int weight_decay, TpShard shard) const {
  Parameter p;
  p.global_shape = shape.vec();
  p.weight_decay = weight_decay < 0 ? shape.size() > 1 : weight_decay != 0;
  p.shard = shard;
  p.tp_size = tp_size_;
  p.tp_rank = tp_rank_;
  return add(std::move(p), name, init, std);
}

at::Tensor ParameterFactory::add(Parameter p, const std::string& name, Init init,
                                 double std) const {
  p.name = prefix_.empty() ? name : prefix_ + "." + name;
  for (const auto& q : *registry_) {
    LOOM_INTERNAL_CHECK(q.name != p.name, "parameter '{}' registered twice", p.name);
  }
  // The full tensor is drawn, then sliced: every layout starts from the same numbers.
  at::Tensor t = local_of(initial_value(job_seed_, p.name, p.global_shape, init, std), p)
                     .to(options_)
                     .detach();
  t.set_requires_grad(true);
  p.tensor = t;
  registry_->push_back(p);
  return t;
}

at::Tensor ParameterFactory::make_expert(const std::string& name, at::IntArrayRef shape, Init init,
                                         double std, TpShard shard, int ep_size, int ep_rank,
                                         int etp_size, int etp_rank) const {
  Parameter p;
  p.global_shape = shape.vec();
  p.weight_decay = shape.size() > 1;
  p.shard = shard;
  p.tp_size = etp_size;
  p.tp_rank = etp_rank;
  p.expert = true;
  p.ep_size = ep_size;
  p.ep_rank = ep_rank;
  return add(std::move(p), name, init, std);
}

}  // namespace loom::model
