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
  // Note: gradient synchronisation, step 1: the dense parameters over DP, the expert shards over
  // expert DP.
  std::vector<size_t> dense, experts;
  for (size_t i = 0; i < params_->size(); ++i)
    ((options_.expert_dp && (*params_)[i].ep_sharded()) ? experts : dense).push_back(i);
  const bool replicated = options_.shards == nullptr;
  if (replicated && (active(options_.dp) || active(options_.expert_dp))) {
    LOOM_CHECK_CONFIG(options_.bucket_bytes > 0,
                      "the DP gradient bucket size must be > 0 bytes, got {}",
                      options_.bucket_bytes);
  }
  if (replicated && active(options_.dp) && !dense.empty()) {
    buckets_ = std::make_unique<GradBuckets>(params_, options_.dp, options_.bucket_bytes,
                                             options_.overlap, dense);
  } else {
    unbucketed_.insert(unbucketed_.end(), dense.begin(), dense.end());
  }
  if (replicated && active(options_.expert_dp) && !experts.empty()) {
    expert_buckets_ = std::make_unique<GradBuckets>(
        params_, options_.expert_dp, options_.bucket_bytes, options_.overlap, experts);
  } else {
    unbucketed_.insert(unbucketed_.end(), experts.begin(), experts.end());
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
  if (buckets_) buckets_->zero();
  if (expert_buckets_) expert_buckets_->zero();
  for (size_t i : unbucketed_) {
    at::Tensor& t = (*params_)[i].tensor;
    if (t.grad().defined()) t.mutable_grad().reset();
  }
}

void GradSync::arm(bool final_pass) {
  if (buckets_) buckets_->arm(final_pass);
  if (expert_buckets_) expert_buckets_->arm(final_pass);
}

double GradSync::bucket_wait_s() const {
  return (buckets_ ? buckets_->stats().wait_s : 0.0) +
         (expert_buckets_ ? expert_buckets_->stats().wait_s : 0.0);
}

void GradSync::finish() {
  // 1. DP and expert DP (Note: gradient buckets): may still be in flight on the buffers 2 and 3
  // write. Every rank finishes the two sets in the same order.
  if (buckets_) buckets_->finish();
  if (expert_buckets_) expert_buckets_->finish();
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
