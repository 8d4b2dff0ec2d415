#include "loom/model/offload.h"

#include <torch/csrc/autograd/engine.h>
#include <torch/csrc/autograd/functions/accumulate_grad.h>
#include <torch/csrc/autograd/saved_variable_hooks.h>

#include <algorithm>
#include <atomic>
#include <cmath>

#include "loom/core/error.h"

namespace loom::model {

namespace {

struct AtomicCounters {
  std::atomic<int64_t> packed{0}, packed_bytes{0}, kept{0}, shared{0}, reloaded{0}, prefetched{0};
};
AtomicCounters& counters() {
  static AtomicCounters c;
  return c;
}

// The store of the innermost OffloadScope on this thread (null: none).
thread_local std::shared_ptr<OffloadStore> t_store;

// One SavedVariable's hooks: its tensor's place in the store, or the tensor itself when it stays.
struct OffloadHooks final : torch::autograd::SavedVariableHooks {
  explicit OffloadHooks(std::shared_ptr<OffloadStore> s) : store(std::move(s)) {}
  void call_pack_hook(const at::Tensor& t) override {
    if (store->keeps(t)) {  // a parameter or a shared input: on the device anyway
      kept = t;
      counters().kept.fetch_add(1, std::memory_order_relaxed);
      return;
    }
    index = store->pack(t);
  }
  at::Tensor call_unpack_hook() override { return kept.defined() ? kept : store->unpack(index); }

  std::shared_ptr<OffloadStore> store;
  at::Tensor kept;
  size_t index = 0;
};

// The autograd engine with one change: saved variables created on a thread inside an OffloadScope
// get that scope's hooks (Note: activation offload).
struct OffloadEngine final : torch::autograd::Engine {
  std::unique_ptr<torch::autograd::SavedVariableHooks> get_default_saved_variable_hooks() override {
    if (!t_store) return nullptr;
    return std::make_unique<OffloadHooks>(t_store);
  }
};

torch::autograd::Engine& offload_engine() {
  // Never destroyed: the engine's worker threads may outlive static destruction.
  static OffloadEngine* engine = new OffloadEngine();
  return *engine;
}

void install_offload_engine() {
  static std::once_flag once;
  std::call_once(once, [] { torch::autograd::set_default_engine_stub(&offload_engine); });
}

}  // namespace

bool OffloadKeep::keeps(const at::Tensor& t) const {
  const at::Tensor root = t.is_view() ? at::Tensor(t._base()) : t;  // a view's base is no view
  auto listed = [&](const c10::TensorImpl* p) {
    return (parameters && parameters->count(p) == 1) ||
           std::find(inputs.begin(), inputs.end(), p) != inputs.end();
  };
  if (listed(root.unsafeGetTensorImpl())) return true;
  // A cast of a parameter (Linear's weight in the compute dtype).
  const auto fn = root.grad_fn();
  if (fn && fn->next_edges().size() == 1 && fn->name().rfind("ToCopyBackward", 0) == 0) {
    const auto* acc =
        dynamic_cast<const torch::autograd::AccumulateGrad*>(fn->next_edges()[0].function.get());
    return acc != nullptr && listed(acc->variable.unsafeGetTensorImpl());
  }
  return false;
}

bool OffloadStore::keeps(const at::Tensor& t) const {
  if (keep_) return keep_->keeps(t);
  return t.is_leaf() && t.requires_grad();
}

OffloadCounters offload_counters() {
  const AtomicCounters& c = counters();
  OffloadCounters out;
  out.packed = c.packed.load();
  out.packed_bytes = c.packed_bytes.load();
  out.kept = c.kept.load();
  out.shared = c.shared.load();
  out.reloaded = c.reloaded.load();
  out.prefetched = c.prefetched.load();
  return out;
}

size_t OffloadStore::pack(const at::Tensor& t) {
  std::lock_guard<std::mutex> lock(mu_);
  LOOM_CHECK(!loaded_,
             "activation offload: a tensor saved into a block's store after its backward "
             "began");
  // The same tensor (same object, not modified in place since) saved by another formula of this
  // block: share its copy. The weak reference keeps the address from being reused meanwhile.
  for (size_t i = entries_.size(); i-- > 0;) {
    const Entry& e = entries_[i];
    if (e.original._unsafe_get_target() == t.unsafeGetTensorImpl() && !e.original.expired() &&
        e.version == t._version()) {
      counters().shared.fetch_add(1, std::memory_order_relaxed);
      return i;
    }
  }
  Entry e(t);
  e.version = t._version();
  e.home = t.device();
  if (t.is_cpu()) {
    e.host = t.clone(at::MemoryFormat::Contiguous);
  } else {
    // Pinned, so the device-to-host copy is asynchronous on the current stream (which orders it
    // before any later reuse of the source's memory by the caching allocator).
    e.host = at::empty(t.sizes(), t.options().device(at::kCPU).pinned_memory(true));
    e.host.copy_(t, /*non_blocking=*/true);
  }
  counters().packed.fetch_add(1, std::memory_order_relaxed);
  counters().packed_bytes.fetch_add(static_cast<int64_t>(t.numel() * t.element_size()),
                                    std::memory_order_relaxed);
  entries_.push_back(std::move(e));
  return entries_.size() - 1;
}

void OffloadStore::load(bool prefetch) {
  std::shared_ptr<OffloadStore> next;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!loaded_) {
      // On the CPU the host copy is the tensor; on a GPU, an asynchronous copy back on the current
      // stream (ordered before the backward kernels that read it). Marked loaded only when every
      // copy is made (a failed one, out of memory, is retried by the next unpack).
      std::vector<at::Tensor> back(entries_.size());
      for (size_t i = 0; i < entries_.size(); ++i) {
        if (!entries_[i].home.is_cpu()) {
          back[i] = entries_[i].host.to(entries_[i].home, /*non_blocking=*/true);
        }
      }
      for (size_t i = 0; i < entries_.size(); ++i) entries_[i].device = std::move(back[i]);
      loaded_ = true;
      counters().reloaded.fetch_add(static_cast<int64_t>(entries_.size()),
                                    std::memory_order_relaxed);
      if (prefetch) {
        counters().prefetched.fetch_add(static_cast<int64_t>(entries_.size()),
                                        std::memory_order_relaxed);
      }
    }
    // Backward has reached this block: start on the one it reaches next.
    if (!prefetch && !next_started_) {
      next_started_ = true;
      next = next_;
    }
  }
  if (next) next->load(/*prefetch=*/true);
}

at::Tensor OffloadStore::unpack(size_t index) {
  load(/*prefetch=*/false);
  std::lock_guard<std::mutex> lock(mu_);
  LOOM_CHECK(index < entries_.size(), "activation offload: saved tensor {} of a store of {}", index,
             entries_.size());
  const Entry& e = entries_[index];
  return e.home.is_cpu() ? e.host : e.device;
}

int64_t OffloadStore::host_bytes() const {
  std::lock_guard<std::mutex> lock(mu_);
  int64_t n = 0;
  for (const Entry& e : entries_) n += static_cast<int64_t>(e.host.numel() * e.host.element_size());
  return n;
}

size_t OffloadStore::size() const {
  std::lock_guard<std::mutex> lock(mu_);
  return entries_.size();
}

OffloadScope::OffloadScope(std::shared_ptr<OffloadStore> store) : previous_(std::move(t_store)) {
  install_offload_engine();
  t_store = std::move(store);
}

OffloadScope::~OffloadScope() { t_store = std::move(previous_); }

int64_t offloaded_layers(double r, int64_t layers) {
  LOOM_CHECK(r >= 0 && r <= 1, "activation offload: a fraction of {} (must be in [0, 1])", r);
  const auto n = static_cast<int64_t>(std::floor(r * static_cast<double>(layers) + 0.5));
  return std::clamp<int64_t>(n, 0, layers);
}

}  // namespace loom::model
