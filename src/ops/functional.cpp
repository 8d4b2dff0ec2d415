#include "loom/ops/functional.h"

#include <torch/version.h>

#include <cmath>

#include "loom/core/error.h"

namespace loom::ops {

namespace {
// The dtype statistics are computed in: fp32, or fp64 for fp64 inputs (the reference tests).
at::ScalarType stat_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}
}  // namespace

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  LOOM_CHECK(x.size(-1) == weight.size(0), "rms_norm: x has {} features, weight has {}", x.size(-1),
             weight.size(0));
  at::Tensor xf = x.to(stat_dtype(x));
  at::Tensor inv = at::rsqrt(xf.pow(2).mean(-1, /*keepdim=*/true) + eps);
  return (xf * inv * weight.to(xf.scalar_type())).to(x.scalar_type());
}

at::Tensor layer_norm(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps) {
  at::Tensor xf = x.to(stat_dtype(x));
  const auto dt = xf.scalar_type();
  at::Tensor y = at::layer_norm(xf, {x.size(-1)}, weight.to(dt),
                                bias.defined() ? bias.to(dt) : at::Tensor(), eps);
  return y.to(x.scalar_type());
}

std::pair<at::Tensor, at::Tensor> rope_tables(const at::Tensor& positions, int64_t head_dim,
                                              double theta, at::ScalarType dtype) {
  const auto dt = dtype == at::kDouble ? at::kDouble : at::kFloat;
  auto opts = at::TensorOptions().dtype(dt).device(positions.device());
  // inv_freq_i = theta^(-2i/d), i = 0 .. d/2-1
  at::Tensor i = at::arange(0, head_dim / 2, opts);
  at::Tensor inv_freq = at::pow(theta, i * (-2.0 / static_cast<double>(head_dim)));
  at::Tensor angles = positions.to(dt).unsqueeze(-1) * inv_freq;  // [..., d/2]
  return {angles.cos(), angles.sin()};
}

at::Tensor apply_rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  const int64_t half = x.size(-1) / 2;
  at::Tensor xf = x.to(stat_dtype(x));
  at::Tensor x1 = xf.narrow(-1, 0, half);
  at::Tensor x2 = xf.narrow(-1, half, half);
  at::Tensor c = cos.unsqueeze(-2).to(xf.scalar_type());  // [s, b, 1, d/2]
  at::Tensor s = sin.unsqueeze(-2).to(xf.scalar_type());
  return at::cat({x1 * c - x2 * s, x2 * c + x1 * s}, -1).to(x.scalar_type());
}

at::Tensor swiglu(const at::Tensor& gate_up) {
  auto halves = gate_up.chunk(2, -1);
  return at::silu(halves[0]) * halves[1];
}

at::Tensor causal_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& doc_ids) {
  LOOM_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4,
             "causal_attention: q, k, v must be [b, heads, s, d]");
  const int64_t b = q.size(0), nh = q.size(1), s = q.size(2), d = q.size(3);
  const int64_t nkv = k.size(1);
  LOOM_CHECK(nkv >= 1 && nh % nkv == 0, "causal_attention: {} KV heads do not divide {} query heads",
             nkv, nh);
  const int64_t group = nh / nkv;
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  // [s, s] true where attention is allowed; with documents, [b, 1, s, s].
  at::Tensor allowed = at::ones({s, s}, q.options().dtype(at::kBool)).tril();
  if (doc_ids.defined()) {
    LOOM_CHECK(doc_ids.dim() == 2 && doc_ids.size(0) == b && doc_ids.size(1) == s,
               "causal_attention: doc_ids must be [b={}, s={}], got {}", b, s, doc_ids.sizes());
    at::Tensor same = doc_ids.unsqueeze(2) == doc_ids.unsqueeze(1);  // [b, s, s]
    allowed = (same & allowed).unsqueeze(1);                          // [b, 1, s, s]
  }
#if TORCH_VERSION_MAJOR >= 2
  if (q.scalar_type() != at::kDouble) {
    at::Tensor ke = group == 1 ? k : k.repeat_interleave(group, 1);
    at::Tensor ve = group == 1 ? v : v.repeat_interleave(group, 1);
    if (!doc_ids.defined()) {
      return at::scaled_dot_product_attention(q, ke, ve, {}, 0.0, /*is_causal=*/true);
    }
    return at::scaled_dot_product_attention(q, ke, ve, allowed, 0.0, /*is_causal=*/false);
  }
#endif
  // Explicit form. Query heads of one KV group are stacked so K and V are used without copies:
  // q [b, nkv, group * s, d] x k^T [b, nkv, d, s] -> scores [b, nkv, group * s, s].
  at::Tensor qg = q.reshape({b, nkv, group * s, d});
  at::Tensor scores = at::matmul(qg, k.transpose(-1, -2));
  const auto sdt = stat_dtype(q);
  scores = scores.to(sdt).mul_(scale).view({b, nkv, group, s, s});
  at::Tensor mask = allowed.dim() == 2 ? allowed : allowed.unsqueeze(1);  // broadcast to scores
  scores = scores.masked_fill(mask.logical_not(), -std::numeric_limits<double>::infinity());
  at::Tensor probs = at::softmax(scores, -1).to(q.scalar_type()).view({b, nkv, group * s, s});
  return at::matmul(probs, v).view({b, nh, s, d});
}

at::Tensor cross_entropy(const at::Tensor& logits, const at::Tensor& targets) {
  LOOM_CHECK(logits.dim() == 2 && targets.dim() == 1 && logits.size(0) == targets.size(0),
             "cross_entropy: logits [n, V] and targets [n] expected, got {} and {}", logits.sizes(),
             targets.sizes());
  at::Tensor lf = logits.to(stat_dtype(logits));
  at::Tensor logp = at::log_softmax(lf, -1);
  return -logp.gather(1, targets.unsqueeze(1)).squeeze(1);
}

}  // namespace loom::ops
