#include "loom/ops/attention.h"

#include <torch/csrc/autograd/custom_function.h>

#include <cmath>
#include <limits>
#include <vector>

#include "loom/core/error.h"

namespace loom::ops {

at::ScalarType attention_stat_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

TokenInfo row_tokens(int64_t b, int64_t s, const at::Tensor& doc_ids, at::Device device) {
  TokenInfo t;
  auto opts = at::TensorOptions().dtype(at::kLong).device(device);
  t.index = at::arange(s, opts).unsqueeze(0).expand({b, s}).contiguous();
  t.doc = doc_ids.defined() ? doc_ids.to(device, at::kLong) : at::zeros({b, s}, opts);
  return t;
}

AttentionState empty_state(const at::Tensor& q) {
  const auto dt = attention_stat_dtype(q);
  AttentionState st;
  st.out = at::zeros(q.sizes(), q.options().dtype(dt));
  st.lse = at::full({q.size(0), q.size(1), q.size(2)}, -std::numeric_limits<double>::infinity(),
                    q.options().dtype(dt));
  return st;
}

namespace {

constexpr double kNegInf = -std::numeric_limits<double>::infinity();

// Per-row index and document ranges of one tile of tokens (host copies; tiles are few).
struct Tile {
  int64_t start = 0, len = 0;
  std::vector<int64_t> imin, imax, dmin, dmax;
};

// Tiles of at most `block` tokens that also end where the tokens' indices jump in some row (the
// pieces of a context-parallel split), so that a tile's index range is the range of its tokens and
// a causal tile pair is skipped or computed without a mask whenever its pieces allow. Pieces
// shorter than block / 8 share a (masked) tile with their neighbours rather than making tiny ones.
std::vector<Tile> tiles_of(const TokenInfo& t, int64_t block) {
  const int64_t n = t.size();
  if (block <= 0) block = std::max<int64_t>(n, 1);
  const at::Tensor idx = t.index.cpu(), doc = t.doc.cpu();
  std::vector<int64_t> starts{0};
  if (n > 1) {
    const at::Tensor jump =
        idx.narrow(1, 1, n - 1).ne(idx.narrow(1, 0, n - 1) + 1).any(0).contiguous();
    const bool* j = jump.data_ptr<bool>();
    for (int64_t i = 1; i < n; ++i) {
      const int64_t len = i - starts.back();
      if ((j[i - 1] && len >= std::max<int64_t>(1, block / 8)) || len >= block) starts.push_back(i);
    }
  }
  std::vector<Tile> out;
  for (size_t ti = 0; ti < starts.size(); ++ti) {
    const int64_t s = starts[ti];
    Tile tile;
    tile.start = s;
    tile.len = (ti + 1 < starts.size() ? starts[ti + 1] : n) - s;
    auto range = [&](const at::Tensor& x, std::vector<int64_t>& lo, std::vector<int64_t>& hi) {
      const at::Tensor sl = x.narrow(1, s, tile.len);
      const at::Tensor a = sl.amin(1).contiguous(), b = sl.amax(1).contiguous();
      lo.assign(a.data_ptr<int64_t>(), a.data_ptr<int64_t>() + a.numel());
      hi.assign(b.data_ptr<int64_t>(), b.data_ptr<int64_t>() + b.numel());
    };
    range(idx, tile.imin, tile.imax);
    range(doc, tile.dmin, tile.dmax);
    out.push_back(std::move(tile));
  }
  return out;
}

enum class TileKind { kSkip, kFull, kMasked };

TileKind classify_tiles(const Tile& q, const Tile& k) {
  bool any = false, all = true;
  for (size_t r = 0; r < q.imin.size(); ++r) {
    const bool none = k.imin[r] > q.imax[r] || k.dmax[r] < q.dmin[r] || k.dmin[r] > q.dmax[r];
    const bool every = k.imax[r] <= q.imin[r] && q.dmin[r] == q.dmax[r] && k.dmin[r] == k.dmax[r] &&
                       q.dmin[r] == k.dmin[r];
    any = any || !none;
    all = all && every;
  }
  if (!any) return TileKind::kSkip;
  return all ? TileKind::kFull : TileKind::kMasked;
}

TileKind classify(const Tile& q, const Tile& k, TileCounts* counts) {
  const TileKind kind = classify_tiles(q, k);
  if (counts) {
    ++(kind == TileKind::kSkip   ? counts->skipped
       : kind == TileKind::kFull ? counts->full
                                 : counts->masked);
  }
  return kind;
}

// [b, qn, kn] true where query i of the tile may see key j.
at::Tensor allowed_of(const TokenInfo& qt, const Tile& q, const TokenInfo& kt, const Tile& k) {
  const at::Tensor qi = qt.index.narrow(1, q.start, q.len), qd = qt.doc.narrow(1, q.start, q.len);
  const at::Tensor ki = kt.index.narrow(1, k.start, k.len), kd = kt.doc.narrow(1, k.start, k.len);
  return qi.unsqueeze(2).ge(ki.unsqueeze(1)).logical_and(qd.unsqueeze(2).eq(kd.unsqueeze(1)));
}

void check_shapes(const at::Tensor& q, const TokenInfo& qt, const at::Tensor& k,
                  const at::Tensor& v, const TokenInfo& kt) {
  LOOM_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && k.sizes() == v.sizes(),
             "attention: q [b, nh, n, d] and k, v [b, nkv, m, d] expected, got {}, {}, {}",
             q.sizes(), k.sizes(), v.sizes());
  LOOM_CHECK(k.size(0) == q.size(0) && k.size(3) == q.size(3) && k.size(1) >= 1 &&
                 q.size(1) % k.size(1) == 0,
             "attention: {} KV heads of q {} and k {} do not group {} query heads", k.size(1),
             q.sizes(), k.sizes(), q.size(1));
  LOOM_CHECK(qt.index.dim() == 2 && qt.index.size(0) == q.size(0) &&
                 qt.index.size(1) == q.size(2) && qt.doc.sizes() == qt.index.sizes(),
             "attention: query tokens {} for q {}", qt.index.sizes(), q.sizes());
  LOOM_CHECK(kt.index.dim() == 2 && kt.index.size(0) == k.size(0) &&
                 kt.index.size(1) == k.size(2) && kt.doc.sizes() == kt.index.sizes(),
             "attention: key tokens {} for k {}", kt.index.sizes(), k.sizes());
}

// where(x == -inf, 0, x): a safe shift for exponentials.
at::Tensor finite_or_zero(const at::Tensor& x) {
  return at::where(x.eq(kNegInf), at::zeros({}, x.options()), x);
}

}  // namespace

void attention_fold(const at::Tensor& q, const TokenInfo& qt, const at::Tensor& k,
                    const at::Tensor& v, const TokenInfo& kt, int64_t block, AttentionState& state,
                    TileCounts* counts, const std::function<void()>& progress) {
  check_shapes(q, qt, k, v, kt);
  const int64_t b = q.size(0), nh = q.size(1), n = q.size(2), d = q.size(3);
  const int64_t nkv = k.size(1), group = nh / nkv;
  const auto sdt = attention_stat_dtype(q);
  LOOM_INTERNAL_CHECK(
      state.out.is_contiguous() && state.out.scalar_type() == sdt && state.out.sizes() == q.sizes(),
      "attention_fold: state {} for q {}", state.out.sizes(), q.sizes());
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  const at::Tensor qs = q.to(sdt).reshape({b, nkv, group, n, d});
  const at::Tensor ks = k.to(sdt), vs = v.to(sdt);
  at::Tensor out5 = state.out.view({b, nkv, group, n, d});
  at::Tensor lse4 = state.lse.view({b, nkv, group, n});
  const auto qtiles = tiles_of(qt, block), ktiles = tiles_of(kt, block);
  for (const Tile& qtile : qtiles) {
    const int64_t qn = qtile.len;
    const at::Tensor qg = qs.narrow(3, qtile.start, qn).reshape({b, nkv, group * qn, d});
    for (const Tile& ktile : ktiles) {
      const TileKind kind = classify(qtile, ktile, counts);
      if (kind == TileKind::kSkip) continue;
      const int64_t kn = ktile.len;
      const at::Tensor kk = ks.narrow(2, ktile.start, kn), vv = vs.narrow(2, ktile.start, kn);
      at::Tensor s = at::matmul(qg, kk.transpose(-1, -2)).mul_(scale).view({b, nkv, group, qn, kn});
      if (kind == TileKind::kMasked) {
        const at::Tensor allowed = allowed_of(qt, qtile, kt, ktile);
        s.masked_fill_(allowed.logical_not().view({b, 1, 1, qn, kn}), kNegInf);
      }
      const at::Tensor tl = at::logsumexp(s, -1);  // [b, nkv, group, qn]
      const at::Tensor p = at::exp(s - finite_or_zero(tl).unsqueeze(-1));
      const at::Tensor to =
          at::matmul(p.view({b, nkv, group * qn, kn}), vv).view({b, nkv, group, qn, d});
      at::Tensor o = out5.narrow(3, qtile.start, qn);
      at::Tensor old = lse4.narrow(3, qtile.start, qn);
      const at::Tensor mx = finite_or_zero(at::maximum(old, tl));
      const at::Tensor lse = mx + at::log(at::exp(old - mx) + at::exp(tl - mx));
      const at::Tensor ls = finite_or_zero(lse);
      o.mul_(at::exp(old - ls).unsqueeze(-1)).add_(to * at::exp(tl - ls).unsqueeze(-1));
      old.copy_(lse);
      if (progress) progress();
    }
  }
}

void attention_fold_backward(const at::Tensor& q, const TokenInfo& qt, const at::Tensor& k,
                             const at::Tensor& v, const TokenInfo& kt, int64_t block,
                             const at::Tensor& lse, const at::Tensor& dout, const at::Tensor& delta,
                             at::Tensor& dq, at::Tensor& dk, at::Tensor& dv, TileCounts* counts,
                             const std::function<void()>& progress) {
  check_shapes(q, qt, k, v, kt);
  const int64_t b = q.size(0), nh = q.size(1), n = q.size(2), d = q.size(3);
  const int64_t nkv = k.size(1), group = nh / nkv;
  const auto sdt = attention_stat_dtype(q);
  LOOM_INTERNAL_CHECK(dq.is_contiguous() && dk.is_contiguous() && dv.is_contiguous(),
                      "attention_fold_backward: gradient accumulators must be contiguous");
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  const at::Tensor qs = q.to(sdt).reshape({b, nkv, group, n, d});
  const at::Tensor ks = k.to(sdt), vs = v.to(sdt);
  const at::Tensor do5 = dout.reshape({b, nkv, group, n, d});
  const at::Tensor l4 = finite_or_zero(lse).reshape({b, nkv, group, n});
  const at::Tensor delta4 = delta.reshape({b, nkv, group, n});
  at::Tensor dq5 = dq.view({b, nkv, group, n, d});
  const auto qtiles = tiles_of(qt, block), ktiles = tiles_of(kt, block);
  for (const Tile& qtile : qtiles) {
    const int64_t qn = qtile.len;
    const at::Tensor qg = qs.narrow(3, qtile.start, qn).reshape({b, nkv, group * qn, d});
    const at::Tensor dog = do5.narrow(3, qtile.start, qn).reshape({b, nkv, group * qn, d});
    const at::Tensor lq = l4.narrow(3, qtile.start, qn).reshape({b, nkv, group * qn, 1});
    const at::Tensor dl = delta4.narrow(3, qtile.start, qn).reshape({b, nkv, group * qn, 1});
    at::Tensor dq_tile;
    for (const Tile& ktile : ktiles) {
      const TileKind kind = classify(qtile, ktile, counts);
      if (kind == TileKind::kSkip) continue;
      const int64_t kn = ktile.len;
      const at::Tensor kk = ks.narrow(2, ktile.start, kn), vv = vs.narrow(2, ktile.start, kn);
      at::Tensor s = at::matmul(qg, kk.transpose(-1, -2)).mul_(scale);  // [b, nkv, g*qn, kn]
      if (kind == TileKind::kMasked) {
        const at::Tensor allowed = allowed_of(qt, qtile, kt, ktile);
        s.view({b, nkv, group, qn, kn})
            .masked_fill_(allowed.logical_not().view({b, 1, 1, qn, kn}), kNegInf);
      }
      const at::Tensor p = at::exp(s - lq);
      dv.narrow(2, ktile.start, kn).add_(at::matmul(p.transpose(-1, -2), dog));
      const at::Tensor ds = p * (at::matmul(dog, vv.transpose(-1, -2)) - dl);
      const at::Tensor dqt = at::matmul(ds, kk);
      dq_tile = dq_tile.defined() ? dq_tile.add_(dqt) : dqt;
      dk.narrow(2, ktile.start, kn).add_(at::matmul(ds.transpose(-1, -2), qg).mul_(scale));
      if (progress) progress();
    }
    if (dq_tile.defined()) {
      dq5.narrow(3, qtile.start, qn).add_(dq_tile.mul_(scale).view({b, nkv, group, qn, d}));
    }
  }
}

namespace {

struct BlockwiseFunction : public torch::autograd::Function<BlockwiseFunction> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx,
                                                const at::Tensor& q, const at::Tensor& k,
                                                const at::Tensor& v, const at::Tensor& index,
                                                const at::Tensor& doc, int64_t block) {
    const TokenInfo tok{index, doc};
    AttentionState st = empty_state(q);
    attention_fold(q, tok, k, v, tok, block, st);
    ctx->save_for_backward({q, k, v, st.out, st.lse, index, doc});
    ctx->saved_data["block"] = block;
    return {st.out.to(q.scalar_type())};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const at::Tensor &q = s[0], &k = s[1], &v = s[2], &out = s[3], &lse = s[4];
    const TokenInfo tok{s[5], s[6]};
    const auto sdt = attention_stat_dtype(q);
    const at::Tensor dout = grads[0].to(sdt).contiguous();
    const at::Tensor delta = (dout * out).sum(-1);
    at::Tensor dq = at::zeros(q.sizes(), q.options().dtype(sdt));
    at::Tensor dk = at::zeros(k.sizes(), k.options().dtype(sdt));
    at::Tensor dv = at::zeros(v.sizes(), v.options().dtype(sdt));
    attention_fold_backward(q, tok, k, v, tok, ctx->saved_data["block"].toInt(), lse, dout, delta,
                            dq, dk, dv);
    return {dq.to(q.scalar_type()), dk.to(k.scalar_type()), dv.to(v.scalar_type()),
            at::Tensor(),           at::Tensor(),           at::Tensor()};
  }
};

}  // namespace

at::Tensor blockwise_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const TokenInfo& tok, int64_t block) {
  return BlockwiseFunction::apply(q, k, v, tok.index, tok.doc, block)[0];
}

}  // namespace loom::ops
