#include "loom/parallel/data_parallel.h"

#include <ATen/core/grad_mode.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/utils/lambda_post_hook.h>
#include <torch/csrc/autograd/variable.h>

#include <algorithm>

#include "loom/core/error.h"
#include "loom/core/timer.h"

namespace loom::parallel {

GradBuckets::GradBuckets(std::vector<Parameter>* params, comm::CommunicatorPtr dp,
                         int64_t bucket_bytes, bool overlap, std::vector<size_t> members)
    : params_(params), dp_(std::move(dp)), overlap_(overlap), members_(std::move(members)) {
  LOOM_INTERNAL_CHECK(dp_ != nullptr, "gradient buckets without a DP communicator");
  const size_t n = params_->size();
  if (members_.empty()) {
    for (size_t k = 0; k < n; ++k) members_.push_back(k);
  }
  LOOM_INTERNAL_CHECK(
      !members_.empty() && std::is_sorted(members_.begin(), members_.end()) && members_.back() < n,
      "gradient buckets: member indices must be non-empty, sorted and within the "
      "{} parameters",
      n);
  bucket_of_.assign(n, 0);
  offset_of_.assign(n, 0);
  // Reverse registration order; a bucket closes once it holds bucket_bytes (a larger parameter gets
  // a bucket of its own size).
  std::vector<std::vector<size_t>> groups(1);
  int64_t bytes = 0;
  for (auto it = members_.rbegin(); it != members_.rend(); ++it) {
    const size_t k = *it;
    const at::Tensor& t = (*params_)[k].tensor;
    if (!groups.back().empty() && bytes + static_cast<int64_t>(t.nbytes()) > bucket_bytes) {
      groups.emplace_back();
      bytes = 0;
    }
    groups.back().push_back(k);
    bytes += static_cast<int64_t>(t.nbytes());
  }
  for (auto& g : groups) {
    Bucket b;
    int64_t numel = 0;
    for (size_t k : g) {
      bucket_of_[k] = buckets_.size();
      offset_of_[k] = numel;
      numel += (*params_)[k].tensor.numel();
    }
    b.buffer = at::zeros({numel}, (*params_)[g.front()].tensor.options());
    b.params = std::move(g);
    buckets_.push_back(std::move(b));
  }
  for (size_t k : members_) {
    LOOM_CHECK((*params_)[k].tensor.scalar_type() == buckets_[bucket_of_[k]].buffer.scalar_type(),
               "gradient buckets: parameter '{}' has dtype {}, its bucket {}", (*params_)[k].name,
               c10::toString((*params_)[k].tensor.scalar_type()),
               c10::toString(buckets_[bucket_of_[k]].buffer.scalar_type()));
  }
  stats_.buckets = static_cast<int64_t>(buckets_.size());
  // Overlap needs the buffers where the communicator works (a CUDA model over MPI stages in
  // finish()).
  if (buckets_.front().buffer.device() != dp_->device()) overlap_ = false;
  if (overlap_) {
    for (size_t k : members_) {
      auto acc = torch::autograd::impl::grad_accumulator((*params_)[k].tensor);
      LOOM_INTERNAL_CHECK(acc != nullptr, "parameter '{}' has no gradient accumulator",
                          (*params_)[k].name);
      acc->add_post_hook(std::make_unique<torch::autograd::utils::LambdaPostHook>(
          [this, k](const torch::autograd::variable_list& outputs,
                    const torch::autograd::variable_list& inputs) {
            // An accumulator called with no gradient (a split backward's deferred weight, whose
            // gradient comes in W: Note: deferred weight gradients) has nothing to add yet.
            if (!inputs.empty() && inputs[0].defined()) on_grad_ready(k);
            return outputs;
          }));
      accumulators_.push_back(std::move(acc));
    }
  }
  zero();
}

GradBuckets::~GradBuckets() {
  armed_ = false;
  // After a timeout the job is ending: waiting for the abandoned all-reduces again would add a
  // second timeout before the abort (their buffers stay alive in the Work until the process ends).
  if (comm::Work::process_timed_out()) return;
  for (auto& b : buckets_) {
    if (b.work) {
      try {
        b.work->wait();
      } catch (...) {
      }
    }
  }
}

void GradBuckets::zero() {
  at::NoGradGuard no_grad;
  for (auto& b : buckets_) {
    LOOM_INTERNAL_CHECK(b.work == nullptr, "gradient buckets zeroed with an all-reduce in flight");
    b.buffer.zero_();
    b.launched = false;
    b.pending = static_cast<int64_t>(b.params.size());
  }
  for (size_t k : members_) {
    at::Tensor& t = (*params_)[k].tensor;
    t.mutable_grad() =
        buckets_[bucket_of_[k]].buffer.narrow(0, offset_of_[k], t.numel()).view(t.sizes());
  }
  counted_.assign(params_->size(), 0);
  next_ = 0;
  armed_ = false;
  stats_.launched_in_backward = 0;
  stats_.wait_s = 0;
}

void GradBuckets::arm(bool last_micro_batch) { armed_ = last_micro_batch && overlap_; }

void GradBuckets::on_grad_ready(size_t param) {
  // A parameter counts once per step, in the first armed pass that gives it a gradient: an
  // undivided backward runs a leaf's accumulator once, whatever the number of uses (the tied
  // embedding and head sum in its input buffer first); a pipeline arms each chunk's last B and,
  // with a split backward, its last W, where each parameter gets its final gradient in one of them
  // (Note: deferred weight gradients).
  LOOM_INTERNAL_CHECK(
      !buckets_[bucket_of_[param]].launched,
      "gradient buckets: '{}' received a gradient after its bucket's all-reduce started (a "
      "backward pass ran after the one armed as its last)",
      (*params_)[param].name);
  if (!armed_ || counted_[param]) return;
  counted_[param] = 1;
  Bucket& b = buckets_[bucket_of_[param]];
  if (b.pending > 0) --b.pending;
  if (b.pending == 0) launch_ready();
  // MPI moves a non-blocking collective forward only inside MPI calls: poll the ones in flight each
  // time backward reports, so they progress while it computes (NCCL progresses on its own).
  for (size_t k = 0; k < next_; ++k) {
    if (buckets_[k].work) buckets_[k].work->is_completed();
  }
}

void GradBuckets::launch_ready() {
  while (next_ < buckets_.size() && buckets_[next_].pending == 0) {
    launch(buckets_[next_]);
    ++stats_.launched_in_backward;
    ++next_;
  }
}

void GradBuckets::launch(Bucket& b) {
  if (b.launched) return;
  b.launched = true;
  b.work = dp_->iall_reduce(b.buffer);
}

void GradBuckets::finish() {
  Stopwatch clock;
  armed_ = false;
  for (; next_ < buckets_.size(); ++next_) {
    Bucket& b = buckets_[next_];
    if (b.buffer.device() != dp_->device()) {  // staged: blocking
      at::Tensor staged = b.buffer.to(dp_->device());
      dp_->all_reduce(staged);
      b.buffer.copy_(staged);
      b.launched = true;
    } else {
      launch(b);
    }
  }
  for (auto& b : buckets_) {
    if (b.work) {
      b.work->wait();
      b.work.reset();
    }
  }
  stats_.wait_s = clock.seconds();
}

}  // namespace loom::parallel
