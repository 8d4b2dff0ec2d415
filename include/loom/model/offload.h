// Selective activation offload: the tensors a block saves for backward go to host memory after
// its forward and come back before its backward (ByteScale, arXiv 2502.21231, section 5).
//
// [Note: activation offload]
// A forward that builds an autograd graph keeps every tensor a backward formula needs until that
// backward runs; for a long sequence these saved activations, not the weights, are what fills a
// device. Offloading moves them out: while the block runs inside an OffloadScope, every tensor
// autograd saves (a SavedVariable: the inputs of matmuls, norms, softmax, the attention kernels'
// saved outputs, a recomputed block's checkpoint, a pipeline stage's received input) is handed to
// the scope's OffloadStore by a saved-tensor pack hook, which copies it to host memory (pinned when
// it lives on a GPU, with a non-blocking copy) and drops the device reference, so the allocator can
// reuse the memory as soon as the forward itself no longer needs the tensor. What stays on the
// device anyway is kept as it is (OffloadKeep): the model's parameters, casts and views of them (a
// bf16 copy of a weight, an expert's slice), and the forward's shared inputs (RoPE tables,
// document ids, context-parallel tables), which every block reads. A tensor saved by several
// formulas of the same block is copied once. A tensor changed in place after it was saved is not
// detected (autograd's version check does not apply to hooked tensors): the copy holds the value
// at saving, which is what backward needs.
//
// Backward: the first unpack of any of a store's tensors brings the whole store back (one batch of
// host-to-device copies) and queues the same for the store of the block before it, which backward
// reaches next. The values are bit-for-bit the saved ones, so training with offload equals training
// without (tests/model: ActivationOffload.*). On a GPU the copies are queued on the current
// (compute) stream: ordered and safe (the caching allocator reuses a freed source only after the
// queued copy), but not overlapped with compute; a copy stream with events is the next step.
//
// Mechanism: LibTorch 1.13 exposes default saved-tensor hooks only to Python; C++ reaches them
// through the autograd engine, whose get_default_saved_variable_hooks() every SavedVariable asks.
// The first OffloadScope installs an engine that answers with the scope's hooks on the thread that
// entered it (and with none elsewhere), which is how PyTorch's own Python engine provides
// torch.autograd.graph.saved_tensors_hooks. On a CPU-only machine the "host copy" is a copy in the
// same memory: the mechanism and its equivalence are tested there, its time and memory matter on
// GPUs (benchmarks/README.md).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <memory>
#include <mutex>
#include <unordered_set>
#include <vector>

namespace loom::model {

// Process-wide counters (all threads), for logs and tests.
struct OffloadCounters {
  int64_t packed = 0;        // tensors copied to host
  int64_t packed_bytes = 0;  // their bytes
  int64_t kept = 0;          // saved tensors left in place (parameters)
  int64_t shared = 0;        // saves of a tensor the store already held (no second copy)
  int64_t reloaded = 0;      // tensors brought back (each host copy once per backward)
  int64_t prefetched = 0;    // of those, brought back ahead of their block's backward
};
OffloadCounters offload_counters();

// What a store leaves in place: the tensors of `parameters` and `inputs`, views of them, and casts
// of a parameter (a ToCopy whose one input is the parameter's gradient accumulator). Without a
// parameter set, every leaf that requires grad counts as a parameter.
struct OffloadKeep {
  std::shared_ptr<const std::unordered_set<const c10::TensorImpl*>> parameters;
  std::vector<const c10::TensorImpl*> inputs;
  bool keeps(const at::Tensor& t) const;
};

// The saved tensors of one block of one micro-batch.
class OffloadStore {
 public:
  // `next`: the store backward reaches after this one (the block before), loaded when this one is
  // first unpacked; may be null. `keep`: what stays on the device (null: parameters by the leaf
  // rule of OffloadKeep).
  explicit OffloadStore(std::shared_ptr<OffloadStore> next = nullptr,
                        std::shared_ptr<const OffloadKeep> keep = nullptr)
      : next_(std::move(next)), keep_(std::move(keep)) {}

  // Whether `t` stays on the device (the hooks then hold it as it is).
  bool keeps(const at::Tensor& t) const;

  // Index of `t`'s host copy (made now, or the earlier one of the same tensor).
  size_t pack(const at::Tensor& t);
  // The tensor saved as `index`, on its original device (bringing the store back first).
  at::Tensor unpack(size_t index);
  // Starts bringing every tensor back (non-blocking copies on a GPU); idempotent.
  void load(bool prefetch);

  int64_t host_bytes() const;
  size_t size() const;

 private:
  struct Entry {
    explicit Entry(const at::Tensor& t) : original(t.getIntrusivePtr()) {}
    c10::weak_intrusive_ptr<c10::TensorImpl> original;  // identity for sharing (held weakly)
    at::Tensor host;                                    // the copy in host memory
    at::Tensor device;                                  // brought back (GPU only)
    int64_t version = 0;                                // of the original when saved
    at::Device home = at::kCPU;
  };
  mutable std::mutex mu_;
  std::vector<Entry> entries_;
  bool loaded_ = false;
  bool next_started_ = false;
  std::shared_ptr<OffloadStore> next_;
  std::shared_ptr<const OffloadKeep> keep_;
};

// While alive, tensors autograd saves on this thread go to `store` (a null store: none do, which
// lets an inner region opt out). Nests; not copyable.
class OffloadScope {
 public:
  explicit OffloadScope(std::shared_ptr<OffloadStore> store);
  ~OffloadScope();
  OffloadScope(const OffloadScope&) = delete;
  OffloadScope& operator=(const OffloadScope&) = delete;

 private:
  std::shared_ptr<OffloadStore> previous_;
};

// Blocks of a chunk of `layers` whose activations a micro-batch with offload fraction `r` moves:
// r * layers rounded to the nearest (halves up), the first ones (their activations wait longest
// for backward). r in [0, 1].
int64_t offloaded_layers(double r, int64_t layers);

}  // namespace loom::model
