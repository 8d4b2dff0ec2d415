#include "loom/parallel/tensor_parallel.h"

#include <ATen/core/grad_mode.h>
#include <torch/csrc/autograd/custom_function.h>

#include <limits>

#include "autograd_comm.h"
#include "loom/core/error.h"
#include "loom/parallel/weight_grad_store.h"

namespace loom::parallel {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using detail::from_handle;
using detail::handle;

at::Tensor all_reduce(const at::Tensor& x, comm::Communicator& c) {
  at::Tensor y = x.contiguous().clone();
  c.all_reduce(y);
  return y;
}

// Concatenation of every rank's x along dim 0.
at::Tensor all_gather_dim0(const at::Tensor& x, comm::Communicator& c) {
  at::Tensor in = x.contiguous();
  auto shape = in.sizes().vec();
  shape[0] *= c.size();
  at::Tensor out = at::empty(shape, in.options());
  c.all_gather(out, in);
  return out;
}

// Sum over ranks of x, this rank's chunk of dim 0.
at::Tensor reduce_scatter_dim0(const at::Tensor& x, comm::Communicator& c) {
  LOOM_CHECK(x.size(0) % c.size() == 0,
             "reduce-scatter: dim 0 ({}) is not divisible by the TP size {}", x.size(0), c.size());
  at::Tensor in = x.contiguous();
  auto shape = in.sizes().vec();
  shape[0] /= c.size();
  at::Tensor out = at::empty(shape, in.options());
  c.reduce_scatter(out, in);
  return out;
}

at::Tensor chunk_of(const at::Tensor& x, int64_t dim, comm::Communicator& c) {
  LOOM_CHECK(x.size(dim) % c.size() == 0, "split: dim {} ({}) is not divisible by the TP size {}",
             dim, x.size(dim), c.size());
  return x.chunk(c.size(), dim)[c.rank()].contiguous();
}

at::Tensor all_gather_last(const at::Tensor& x, comm::Communicator& c) {
  at::Tensor moved = x.movedim(-1, 0);
  at::Tensor g = all_gather_dim0(moved, c);  // [size * n, ...]
  return g.movedim(0, -1).contiguous();
}

struct CopyToTp : torch::autograd::Function<CopyToTp> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, int64_t comm) {
    ctx->saved_data["comm"] = comm;
    return x.view_as(x);
  }
  static variable_list backward(AutogradContext* ctx, variable_list g) {
    return {all_reduce(g[0], from_handle(ctx)), at::Tensor()};
  }
};

struct ReduceFromTp : torch::autograd::Function<ReduceFromTp> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, int64_t comm) {
    return all_reduce(x, *reinterpret_cast<comm::Communicator*>(comm));
  }
  static variable_list backward(AutogradContext*, variable_list g) { return {g[0], at::Tensor()}; }
};

struct ScatterLastDim : torch::autograd::Function<ScatterLastDim> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, int64_t comm) {
    ctx->saved_data["comm"] = comm;
    return chunk_of(x, x.dim() - 1, *reinterpret_cast<comm::Communicator*>(comm));
  }
  static variable_list backward(AutogradContext* ctx, variable_list g) {
    return {all_gather_last(g[0], from_handle(ctx)), at::Tensor()};
  }
};

struct GatherLastDim : torch::autograd::Function<GatherLastDim> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, int64_t comm) {
    ctx->saved_data["comm"] = comm;
    return all_gather_last(x, *reinterpret_cast<comm::Communicator*>(comm));
  }
  static variable_list backward(AutogradContext* ctx, variable_list g) {
    return {chunk_of(g[0], g[0].dim() - 1, from_handle(ctx)), at::Tensor()};
  }
};

struct ScatterToSp : torch::autograd::Function<ScatterToSp> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, int64_t comm) {
    ctx->saved_data["comm"] = comm;
    return chunk_of(x, 0, *reinterpret_cast<comm::Communicator*>(comm));
  }
  static variable_list backward(AutogradContext* ctx, variable_list g) {
    return {all_gather_dim0(g[0], from_handle(ctx)), at::Tensor()};
  }
};

struct GatherFromSp : torch::autograd::Function<GatherFromSp> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, int64_t comm) {
    ctx->saved_data["comm"] = comm;
    return all_gather_dim0(x, *reinterpret_cast<comm::Communicator*>(comm));
  }
  static variable_list backward(AutogradContext* ctx, variable_list g) {
    return {reduce_scatter_dim0(g[0], from_handle(ctx)), at::Tensor()};
  }
};

struct ReduceScatterToSp : torch::autograd::Function<ReduceScatterToSp> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, int64_t comm) {
    ctx->saved_data["comm"] = comm;
    return reduce_scatter_dim0(x, *reinterpret_cast<comm::Communicator*>(comm));
  }
  static variable_list backward(AutogradContext* ctx, variable_list g) {
    return {all_gather_dim0(g[0], from_handle(ctx)), at::Tensor()};
  }
};

struct ColumnParallelLinearFn : torch::autograd::Function<ColumnParallelLinearFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const at::Tensor& bias, int64_t comm, bool sp, bool overlap) {
    ctx->saved_data["comm"] = comm;
    ctx->saved_data["sp"] = sp;
    ctx->saved_data["overlap"] = overlap;
    const bool has_bias =
        bias.numel() > 0;  // an empty tensor stands for none (autograd needs a defined one)
    ctx->saved_data["bias"] = has_bias;
    ctx->save_for_backward(
        {x, weight});  // under SP the local chunk only; backward gathers it again
    const at::Tensor total =
        sp ? all_gather_dim0(x, *reinterpret_cast<comm::Communicator*>(comm)) : x;
    return at::linear(total, weight, has_bias ? bias : at::Tensor());
  }
  static variable_list backward(AutogradContext* ctx, variable_list g) {
    comm::Communicator& c = from_handle(ctx);
    const bool sp = ctx->saved_data["sp"].toBool();
    const bool overlap = ctx->saved_data["overlap"].toBool();
    const bool has_bias = ctx->saved_data["bias"].toBool();
    auto saved = ctx->get_saved_variables();
    const at::Tensor& w = saved[1];
    const at::Tensor x = saved[0].contiguous();  // alive until the gather has finished
    const at::Tensor gy = g[0].contiguous();
    const int64_t out = w.size(0), in = w.size(1);

    at::Tensor total = x;
    comm::WorkPtr gather;
    if (sp) {
      auto shape = x.sizes().vec();
      shape[0] *= c.size();
      total = at::empty(shape, x.options());
      gather = c.iall_gather(total, x);
      if (!overlap) gather->wait();
    }
    at::Tensor gx, gx_total;  // gx_total stays alive until the reduction has finished
    comm::WorkPtr reduce;
    if (ctx->needs_input_grad(0)) {
      gx_total = at::matmul(gy, w);  // behind the all-gather
      if (sp) {
        gather->wait();
        LOOM_CHECK(gx_total.size(0) % c.size() == 0,
                   "column-parallel linear: sequence {} not divisible by TP {}", gx_total.size(0),
                   c.size());
        auto shape = gx_total.sizes().vec();
        shape[0] /= c.size();
        gx = at::empty(shape, gx_total.options());
        reduce = c.ireduce_scatter(gx, gx_total);
      } else {
        gx = gx_total;
        reduce = c.iall_reduce(gx);
      }
      if (!overlap) reduce->wait();
    }
    if (gather) gather->wait();
    // The weight gradient runs behind the input-gradient reduction, or in a later W pass
    // (Note: deferred weight gradients).
    at::Tensor gy2 = gy.reshape({-1, out});
    at::Tensor gw = WeightGradStore::linear_weight_grad(w, gy2, total.reshape({-1, in}));
    at::Tensor gb = has_bias ? gy2.sum(0) : at::Tensor();
    if (reduce) reduce->wait();
    return {gx, gw, gb, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

struct ScaleGradient : torch::autograd::Function<ScaleGradient> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, double factor) {
    ctx->saved_data["factor"] = factor;
    return x.view_as(x);
  }
  static variable_list backward(AutogradContext* ctx, variable_list g) {
    return {g[0] * ctx->saved_data["factor"].toDouble(), at::Tensor()};
  }
};

struct VocabParallelCe : torch::autograd::Function<VocabParallelCe> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& logits,
                            const at::Tensor& targets, int64_t vocab_start, int64_t vocab_size,
                            int64_t comm) {
    const auto dt = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    at::Tensor x =
        logits.detach().to(dt, /*non_blocking=*/false, /*copy=*/true);  // worked on in place
    const int64_t vl = x.size(1);
    // Padding columns (global index >= vocab_size) take no part.
    const int64_t valid = std::max<int64_t>(0, std::min<int64_t>(vl, vocab_size - vocab_start));
    if (valid < vl) x.narrow(1, valid, vl - valid).fill_(-std::numeric_limits<double>::infinity());
    auto* c = comm ? reinterpret_cast<comm::Communicator*>(comm) : nullptr;
    at::Tensor row_max = std::get<0>(x.max(1));  // [N]
    if (c) c->all_reduce(row_max, {comm::ReduceOp::kMax});
    x.sub_(row_max.unsqueeze(1));
    // The target's (shifted) logit lives on exactly one rank.
    at::Tensor local_t = targets - vocab_start;
    at::Tensor mine = (local_t >= 0).logical_and(local_t < valid);
    at::Tensor idx = at::where(mine, local_t, at::zeros_like(local_t));
    at::Tensor target_logit =
        at::where(mine, x.gather(1, idx.unsqueeze(1)).squeeze(1), at::zeros({}, x.options()));
    x.exp_();
    at::Tensor sum_exp = x.sum(1);
    if (c) {
      c->all_reduce(target_logit);
      c->all_reduce(sum_exp);
    }
    at::Tensor loss = sum_exp.log() - target_logit;
    x.div_(sum_exp.unsqueeze(1));  // softmax on the local columns
    ctx->save_for_backward({x, idx, mine});
    ctx->saved_data["in_dtype"] = static_cast<int64_t>(logits.scalar_type());
    return loss;
  }
  static variable_list backward(AutogradContext* ctx, variable_list g) {
    auto saved = ctx->get_saved_variables();
    at::Tensor grad = saved[0].clone();  // softmax
    const at::Tensor& idx = saved[1];
    const at::Tensor& mine = saved[2];
    grad.scatter_add_(1, idx.unsqueeze(1), -mine.to(grad.scalar_type()).unsqueeze(1));
    grad.mul_(g[0].to(grad.scalar_type()).unsqueeze(1));
    const auto in_dtype = static_cast<at::ScalarType>(ctx->saved_data["in_dtype"].toInt());
    return {grad.to(in_dtype), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

at::Tensor copy_to_tp(const at::Tensor& x, const TensorParallel& tp) {
  return tp.enabled() ? CopyToTp::apply(x, handle(tp.comm)) : x;
}
at::Tensor reduce_from_tp(const at::Tensor& x, const TensorParallel& tp) {
  return tp.enabled() ? ReduceFromTp::apply(x, handle(tp.comm)) : x;
}
at::Tensor scatter_last_dim(const at::Tensor& x, const TensorParallel& tp) {
  return tp.enabled() ? ScatterLastDim::apply(x, handle(tp.comm)) : x;
}
at::Tensor gather_last_dim(const at::Tensor& x, const TensorParallel& tp) {
  return tp.enabled() ? GatherLastDim::apply(x, handle(tp.comm)) : x;
}
at::Tensor scatter_to_sp(const at::Tensor& x, const TensorParallel& tp) {
  return tp.enabled() ? ScatterToSp::apply(x, handle(tp.comm)) : x;
}
at::Tensor gather_from_sp(const at::Tensor& x, const TensorParallel& tp) {
  return tp.enabled() ? GatherFromSp::apply(x, handle(tp.comm)) : x;
}
at::Tensor reduce_scatter_to_sp(const at::Tensor& x, const TensorParallel& tp) {
  return tp.enabled() ? ReduceScatterToSp::apply(x, handle(tp.comm)) : x;
}

at::Tensor column_parallel_linear(const at::Tensor& x, const at::Tensor& weight,
                                  const at::Tensor& bias, const TensorParallel& tp) {
  if (!tp.enabled()) return at::linear(x, weight, bias);
  LOOM_CHECK(weight.dim() == 2 && x.size(-1) == weight.size(1),
             "column-parallel linear: input [..., {}] against weight {}", x.size(-1),
             weight.sizes());
  return ColumnParallelLinearFn::apply(x, weight,
                                       bias.defined() ? bias : at::empty({0}, weight.options()),
                                       handle(tp.comm), tp.sp(), tp.overlap_comm);
}

at::Tensor scale_gradient(const at::Tensor& x, double factor) {
  return ScaleGradient::apply(x, factor);
}

at::Tensor vocab_parallel_cross_entropy(const at::Tensor& logits, const at::Tensor& targets,
                                        int64_t vocab_start, int64_t vocab_size,
                                        const TensorParallel& tp) {
  LOOM_CHECK(logits.dim() == 2 && targets.dim() == 1 && targets.size(0) == logits.size(0),
             "vocab-parallel cross-entropy: logits [N, V/tp] and targets [N], got {} and {}",
             logits.sizes(), targets.sizes());
  return VocabParallelCe::apply(logits, targets, vocab_start, vocab_size,
                                tp.enabled() ? handle(tp.comm) : 0);
}

}  // namespace loom::parallel
