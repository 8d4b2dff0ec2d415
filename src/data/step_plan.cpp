#include "loom/data/step_plan.h"

#include <algorithm>

#include "loom/core/error.h"

namespace loom::data {

int64_t StepPlan::local_tokens() const {
  int64_t n = 0;
  for (const auto& mb : micro_batches) n += mb.tokens;
  return n;
}

std::string batch_mode_name(BatchMode mode) {
  return mode == BatchMode::kWindows ? "WINDOWS" : "DOCUMENTS";
}

namespace {

// First-fit packing of samples [first, last) into micro-batches of one row of at most `budget`
// tokens (Note: step plan).
std::vector<MicroBatchPlan> pack_documents(const std::vector<SampleRef>& samples, int64_t first,
                                           int64_t last, int64_t budget, int64_t piece,
                                           int64_t pad_multiple) {
  std::vector<MicroBatchPlan> mbs;
  for (int64_t s = first; s < last; ++s) {
    const int64_t targets = samples[static_cast<size_t>(s)].length - 1;
    for (int64_t begin = 0; begin < targets; begin += piece) {
      Piece p{s, begin, std::min(piece, targets - begin)};
      MicroBatchPlan* home = nullptr;
      for (auto& mb : mbs) {
        if (mb.tokens + p.tokens <= budget) {
          home = &mb;
          break;
        }
      }
      if (home == nullptr) {
        mbs.emplace_back();
        mbs.back().rows.emplace_back();
        home = &mbs.back();
      }
      home->rows.front().push_back(p);
      home->tokens += p.tokens;
    }
  }
  for (auto& mb : mbs) mb.row_len = (mb.tokens + pad_multiple - 1) / pad_multiple * pad_multiple;
  return mbs;
}

}  // namespace

StepPlan plan_step(const std::vector<SampleRef>& samples, const PlanLayout& l) {
  const auto g = static_cast<int64_t>(samples.size());
  LOOM_CHECK_CONFIG(l.dp_size >= 1 && l.dp_rank >= 0 && l.dp_rank < l.dp_size,
                    "plan: DP rank {} of {}", l.dp_rank, l.dp_size);
  LOOM_CHECK_CONFIG(
      g >= 1 && g % l.dp_size == 0,
      "the global batch holds {} samples, which do not split evenly over {} data-parallel ranks "
      "(train.global_batch_size must be a multiple of the DP size)",
      g, l.dp_size);
  StepPlan plan;
  plan.global_samples = g;
  for (const auto& s : samples) {
    // A window needs a target; a document of fewer than 2 tokens (an empty text plus its end token)
    // has none and simply contributes nothing (pack_documents gives it no piece).
    LOOM_CHECK(s.length >= 2 || (l.mode == BatchMode::kDocuments && s.length >= 0),
               "plan: sample {} has {} tokens; a training window needs at least 2 (one target)",
               s.index, s.length);
    plan.loss_tokens += std::max<int64_t>(s.length - 1, 0);
  }
  const int64_t share = g / l.dp_size;
  if (l.mode == BatchMode::kWindows) {
    LOOM_CHECK_CONFIG(l.micro_batch_size >= 1 && share % l.micro_batch_size == 0,
                      "{} samples per data-parallel rank do not split into micro-batches of "
                      "train.micro_batch_size = {}",
                      share, l.micro_batch_size);
    const int64_t len = samples.front().length;
    for (const auto& s : samples) {
      LOOM_CHECK(s.length == len,
                 "plan: WINDOWS mode needs samples of one length; sample {} has {}, not {}",
                 s.index, s.length, len);
    }
    const int64_t first = l.dp_rank * share;
    for (int64_t i = 0; i < share; i += l.micro_batch_size) {
      MicroBatchPlan mb;
      for (int64_t r = 0; r < l.micro_batch_size; ++r)
        mb.rows.push_back({Piece{first + i + r, 0, len - 1}});
      mb.row_len = len - 1;
      mb.tokens = l.micro_batch_size * (len - 1);
      plan.micro_batches.push_back(std::move(mb));
    }
    plan.global_micro_batches = static_cast<int64_t>(plan.micro_batches.size()) * l.dp_size;
    plan.sequence_tokens_sq =
        static_cast<double>(g) * static_cast<double>(len - 1) * static_cast<double>(len - 1);
    return plan;
  }
  LOOM_CHECK_CONFIG(l.micro_batch_tokens >= 1,
                    "DOCUMENTS mode needs train.micro_batch_tokens >= 1, got {}",
                    l.micro_batch_tokens);
  LOOM_CHECK_CONFIG(l.pad_multiple >= 1, "plan: pad multiple {}", l.pad_multiple);
  LOOM_CHECK_CONFIG(l.max_piece_tokens >= 1 && l.max_piece_tokens <= l.micro_batch_tokens,
                    "DOCUMENTS mode: a micro-batch of train.micro_batch_tokens = {} must hold a "
                    "piece of train.seq_len "
                    "= {} tokens",
                    l.micro_batch_tokens, l.max_piece_tokens);
  size_t most = 0;
  for (int r = 0; r < l.dp_size; ++r) {
    auto mbs = pack_documents(samples, r * share, (r + 1) * share, l.micro_batch_tokens,
                              l.max_piece_tokens, l.pad_multiple);
    most = std::max(most, mbs.size());
    plan.global_micro_batches += static_cast<int64_t>(mbs.size());
    for (const auto& mb : mbs) {
      for (const auto& row : mb.rows) {
        for (const auto& p : row)
          plan.sequence_tokens_sq += static_cast<double>(p.tokens) * static_cast<double>(p.tokens);
      }
    }
    if (r == l.dp_rank) plan.micro_batches = std::move(mbs);
  }
  if (l.equal_micro_batches) {
    MicroBatchPlan empty;
    empty.rows.emplace_back();  // one row of padding only
    empty.row_len = l.pad_multiple;
    plan.micro_batches.resize(most, empty);
    plan.global_micro_batches = static_cast<int64_t>(most) * l.dp_size;
  }
  return plan;
}

}  // namespace loom::data
