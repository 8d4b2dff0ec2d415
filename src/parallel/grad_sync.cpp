#include "loom/parallel/grad_sync.h"

#include <ATen/core/grad_mode.h>

#include <algorithm>

#include "loom/core/error.h"

namespace loom::parallel {

namespace {
bool active(const comm::CommunicatorPtr& c) { return c && c->size() > 1; }
}  // namespace

GradSync::GradSync(std::vector<Parameter>* params, GradSyncOptions options)
    : params_(params), options_(std::move(options)) {
  LOOM_INTERNAL_CHECK(params_ != nullptr, "GradSync without parameters");
  if (active(options_.dp) && options_.shards == nullptr) {
    LOOM_CHECK_CONFIG(options_.bucket_bytes > 0,
                      "the DP gradient bucket size must be > 0 bytes, got {}",
                      options_.bucket_bytes);
    buckets_ = std::make_unique<GradBuckets>(params_, options_.dp, options_.bucket_bytes,
                                             options_.overlap);
  }
  if (active(options_.tp)) {
    for (size_t i = 0; i < params_->size(); ++i) {
      if ((*params_)[i].shard.partial_grad) partial_.push_back(i);
    }
  }
  if (options_.embedding) {
    LOOM_INTERNAL_CHECK(options_.embedding->size() == 2,
                        "the tied embedding's group has {} ranks, not the first and last stage",
                        options_.embedding->size());
    auto it = std::find_if(params_->begin(), params_->end(),
                           [&](const Parameter& p) { return p.name == options_.tied_parameter; });
    LOOM_INTERNAL_CHECK(it != params_->end(),
                        "an embedding group, but no parameter '{}' on this rank",
                        options_.tied_parameter);
    tied_ = it - params_->begin();
  }
}

GradSync::~GradSync() = default;

void GradSync::zero_grad() {
  if (buckets_) {
    buckets_->zero();
    return;
  }
  for (auto& p : *params_) {
    if (p.tensor.grad().defined()) p.tensor.mutable_grad().reset();
  }
}

void GradSync::arm(bool final_pass) {
  if (buckets_) buckets_->arm(final_pass);
}

void GradSync::finish() {
  // 1. DP (Note: gradient buckets): may still be in flight on the buffers 2 and 3 write.
  if (buckets_) buckets_->finish();
  // 2. TP partial sums (Note: tensor-parallel shards).
  if (!partial_.empty()) {
    std::vector<Parameter*> ps;
    for (size_t i : partial_) ps.push_back(&(*params_)[i]);
    all_reduce_gradients(ps, *options_.tp);
  }
  // 3. The tied embedding's two copies, after the DP sum (Note: loss scaling).
  if (tied_ >= 0)
    all_reduce_gradients({&(*params_)[static_cast<size_t>(tied_)]}, *options_.embedding);
  // 4. ZeRO-1's reduce-scatter reads what 1-3 wrote.
  if (options_.shards) options_.shards->reduce_scatter_gradients();
}

void all_reduce_gradients(const std::vector<Parameter*>& params, comm::Communicator& comm) {
  if (params.empty() || comm.size() == 1) return;
  const at::Device device = params.front()->tensor.device();
  std::vector<at::Tensor> flat;
  for (auto* p : params) {
    const at::Tensor& g = p->tensor.grad();
    flat.push_back(g.defined() ? g.reshape({-1})
                               : at::zeros({p->tensor.numel()}, p->tensor.options()));
  }
  at::Tensor buf = at::cat(flat);
  const bool staged = buf.device() != comm.device();  // e.g. CUDA gradients over the MPI world
  if (staged) buf = buf.to(comm.device());
  comm.all_reduce(buf);
  if (staged) buf = buf.to(device);
  int64_t off = 0;
  at::NoGradGuard no_grad;
  for (auto* p : params) {
    at::Tensor view = buf.narrow(0, off, p->tensor.numel()).view(p->tensor.sizes());
    if (p->tensor.grad().defined()) {
      p->tensor.mutable_grad().copy_(view);
    } else {
      p->tensor.mutable_grad() = view.clone();
    }
    off += p->tensor.numel();
  }
}

}  // namespace loom::parallel
