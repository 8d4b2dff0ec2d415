#include "loom/model/batch.h"

#include "loom/core/error.h"
#include "loom/parallel/context_parallel.h"

namespace loom::model {

int64_t Batch::num_loss_tokens() const {
  if (!loss_mask.defined()) return tokens.numel();
  return static_cast<int64_t>(loss_mask.sum().item<double>() + 0.5);
}

Batch Batch::to(at::Device device) const {
  Batch b;
  auto mv = [&](const at::Tensor& t) { return t.defined() ? t.to(device) : t; };
  b.tokens = mv(tokens);
  b.targets = mv(targets);
  b.loss_mask = mv(loss_mask);
  b.position_ids = mv(position_ids);
  b.doc_ids = mv(doc_ids);
  b.padding = mv(padding);
  b.source = mv(source);
  b.cp_index = mv(cp_index);
  b.cp_doc = mv(cp_doc);
  b.cp_group = cp_group;
  b.offload = offload;
  return b;
}

Batch packed_batch(const at::Tensor& tokens, const at::Tensor& targets,
                   const std::vector<std::vector<int64_t>>& cu_seqlens) {
  LOOM_CHECK(tokens.dim() == 2 && targets.sizes() == tokens.sizes(),
             "packed_batch: tokens and targets must both be [b, s], got {} and {}", tokens.sizes(),
             targets.sizes());
  const int64_t b = tokens.size(0), s = tokens.size(1);
  LOOM_CHECK(static_cast<int64_t>(cu_seqlens.size()) == b,
             "packed_batch: cu_seqlens has {} rows, the batch has {}", cu_seqlens.size(), b);
  at::Tensor doc = at::empty({b, s}, at::kLong);
  at::Tensor pos = at::empty({b, s}, at::kLong);
  auto d = doc.accessor<int64_t, 2>();
  auto p = pos.accessor<int64_t, 2>();
  for (int64_t r = 0; r < b; ++r) {
    const auto& cu = cu_seqlens[r];
    LOOM_CHECK(cu.size() >= 2 && cu.front() == 0 && cu.back() == s,
               "packed_batch: cu_seqlens of row {} must start at 0 and end at s = {}", r, s);
    for (size_t i = 0; i + 1 < cu.size(); ++i) {
      LOOM_CHECK(cu[i + 1] > cu[i], "packed_batch: cu_seqlens of row {} must increase (entry {})",
                 r, i + 1);
      for (int64_t t = cu[i]; t < cu[i + 1]; ++t) {
        d[r][t] = static_cast<int64_t>(i);
        p[r][t] = t - cu[i];
      }
    }
  }
  Batch batch;
  batch.tokens = tokens;
  batch.targets = targets;
  batch.doc_ids = doc.to(tokens.device());
  batch.position_ids = pos.to(tokens.device());
  return batch;
}

Batch cp_shard(const Batch& full, int cp, int rank) {
  if (cp <= 1) return full;
  LOOM_CHECK(!full.cp_index.defined(), "cp_shard: the batch is already split");
  const int64_t b = full.batch_size(), s = full.seq_len();
  const at::Device device = full.tokens.device();
  const at::Tensor docs =
      full.doc_ids.defined() ? full.doc_ids.to(at::kCPU, at::kLong) : at::zeros({b, s}, at::kLong);
  const at::Tensor index = parallel::balanced_cp_index(full.doc_ids.defined() ? docs : at::Tensor(),
                                                       b, s, cp);  // [cp, b, n]
  std::vector<at::Tensor> doc_rows;
  for (int r = 0; r < cp; ++r) doc_rows.push_back(at::gather(docs, 1, index[r]));
  Batch out;
  out.cp_index = index.to(device);
  out.cp_doc = at::stack(doc_rows).to(device);
  const at::Tensor mine = out.cp_index[rank];  // [b, n]
  auto take = [&](const at::Tensor& t) { return t.defined() ? at::gather(t, 1, mine) : t; };
  out.tokens = take(full.tokens);
  out.targets = take(full.targets);
  out.loss_mask = take(full.loss_mask);
  out.padding = take(full.padding);
  out.source = take(full.source);
  out.position_ids = full.position_ids.defined() ? take(full.position_ids) : mine.clone();
  out.doc_ids = out.cp_doc[rank];
  out.cp_group = full.cp_group;
  out.offload = full.offload;
  return out;
}

}  // namespace loom::model
