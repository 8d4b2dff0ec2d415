// The model's elementwise and attention ops, one function each. Today each computes with ATen
// (any device, autograd through ATen); fused CUDA kernels from kernels/ slot in here behind the same
// signatures, and are checked against these functions.
#pragma once

#include <ATen/ATen.h>

namespace loom::ops {

// y = x / sqrt(mean(x^2) + eps) * weight, statistics in fp32 (or x's dtype when wider); the result
// has x's dtype. x: [..., h], weight: [h].
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);

// LayerNorm over the last dim, statistics in fp32. bias may be undefined.
at::Tensor layer_norm(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps);

// cos and sin tables for rotary embeddings at integer positions: positions [...] (int64) ->
// two tensors [..., head_dim / 2] in fp32 (fp64 when `dtype` is kDouble).
std::pair<at::Tensor, at::Tensor> rope_tables(const at::Tensor& positions, int64_t head_dim,
                                              double theta, at::ScalarType dtype);

// Rotary embedding, "rotate half" pairing (dimension i with i + d/2; Megatron-Core's and Hugging
// Face LLaMA's convention): x [s, b, n, d]; cos/sin [s, b, d/2] (or broadcastable).
at::Tensor apply_rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);

// silu(gate) * up where `gate_up` [..., 2f] holds [gate | up] along the last dim.
at::Tensor swiglu(const at::Tensor& gate_up);

// Causal self-attention with grouped KV heads. q [b, nh, s, d]; k, v [b, nkv, s, d] with nkv | nh
// (query head j uses KV head j / (nh / nkv)). `doc_ids` [b, s] (int64) or undefined: when given,
// a position attends only to earlier positions of the same document (packed sequences). Softmax
// in fp32. Returns [b, nh, s, d] in q's dtype.
at::Tensor causal_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& doc_ids);

// Per-token cross-entropy in fp32: logits [n, V] (any float dtype), targets [n] -> loss [n].
at::Tensor cross_entropy(const at::Tensor& logits, const at::Tensor& targets);

}  // namespace loom::ops
