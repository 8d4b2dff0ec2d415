#include "loom/data/step_plan.h"

#include <algorithm>
#include <cmath>

#include "loom/core/error.h"
#include "loom/data/balance_scheduler.h"

namespace loom::data {

int64_t StepPlan::local_tokens() const {
  int64_t n = 0;
  for (const auto& mb : micro_batches)
    n += mb.group.empty() ? mb.tokens : mb.tokens / static_cast<int64_t>(mb.group.size());
  return n;
}

double micro_batch_cost(const MicroBatchPlan& mb, const CostModel& cost) {
  if (mb.group.size() > 1) {
    return cost.share(static_cast<double>(longest_sequence(mb)),
                      static_cast<double>(mb.group.size()));
  }
  double t = 0;
  for (const auto& row : mb.rows) {
    for (const Piece& p : row) t += cost(static_cast<double>(p.tokens));
  }
  return t;
}

int64_t longest_sequence(const MicroBatchPlan& mb) {
  int64_t n = 0;
  for (const auto& row : mb.rows) {
    if (mb.group.size() > 1) {  // one sequence, possibly in several pieces: the whole of it
      int64_t sum = 0;
      for (const Piece& p : row) sum += p.tokens;
      n = std::max(n, sum);
      continue;
    }
    for (const Piece& p : row) n = std::max(n, p.tokens);
  }
  return n;
}

double offload_ratio(double forward_seconds, double tokens, int64_t layers,
                     double bytes_per_token_layer, double bandwidth, double max_ratio) {
  LOOM_CHECK_CONFIG(
      bandwidth > 0 && bytes_per_token_layer > 0 && layers >= 1 && max_ratio >= 0 && max_ratio <= 1,
      "activation offload rule: bandwidth {} B/s, {} B per token and layer, {} "
      "layers, at most {} (need positive figures and a share in [0, 1])",
      bandwidth, bytes_per_token_layer, layers, max_ratio);
  if (tokens <= 0 || forward_seconds <= 0) return 0.0;
  const auto l = static_cast<double>(layers);
  const double copy_per_layer = tokens * bytes_per_token_layer / bandwidth;
  const double r = forward_seconds / (l * copy_per_layer);
  // Whole layers only, rounded down: the copies must hide.
  return std::min(max_ratio, std::floor(std::min(r, 1.0) * l + 1e-9) / l);
}

double offload_share(const MicroBatchPlan& mb, const CostModel& cost, const OffloadRule& rule) {
  if (rule.max_ratio <= 0 || mb.tokens <= 0 || longest_sequence(mb) < rule.min_tokens) return 0.0;
  if (rule.bandwidth <= 0) return rule.max_ratio;
  const double d = mb.group.size() > 1 ? static_cast<double>(mb.group.size()) : 1.0;
  return offload_ratio(rule.forward_share * micro_batch_cost(mb, cost),
                       static_cast<double>(mb.tokens) / d, rule.layers, rule.bytes_per_token_layer,
                       rule.bandwidth, rule.max_ratio);
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

// [Note: hybrid data parallelism slots]
// data::plan_hdp gives each pool rank an ordered list of micro-batches, some of them shares of a
// long sequence that a group of ranks runs together. The executor needs more than an order: every
// member of a group must reach the group's micro-batch at the same point of its schedule, since
// ring attention exchanges keys and values in each layer's forward and backward, and anything that
// communicates over the whole pool in a forward (the MoE GLOBAL_BATCH balance, expert-parallel
// dispatch) needs every rank to run the same number of micro-batches. So the plan is laid out in
// slots, the same number on every rank:
//   1. groups in creation order: a group takes the first slot after every member's last group
//      slot (so each rank meets its groups in creation order);
//   2. each rank's packed micro-batches fill its free slots in order, then follow;
//   3. a rank with fewer slots than the most ends with empty micro-batches (one row of padding).
// Every rank then runs the same sequence of actions (one pipeline table for M slots), and at slot
// m the members of a group all run the group's share: no transfer waits on a rank that is
// elsewhere, under 1F1B with pipeline parallelism too (the same table on every rank of a stage).
// An empty slot costs a rank nothing but the wait at its next group, which the balance scheduler
// already accounts for as that rank's lighter load.
void plan_hdp_step(const std::vector<SampleRef>& samples, const PlanLayout& l, StepPlan& plan) {
  LOOM_CHECK_CONFIG(l.micro_batch_tokens >= 1,
                    "parallel.hdp needs train.micro_batch_tokens >= 1 (a rank's capacity), got {}",
                    l.micro_batch_tokens);
  LOOM_CHECK_CONFIG(l.pad_multiple >= 1 && l.max_piece_tokens >= 1, "plan: pad {} piece {}",
                    l.pad_multiple, l.max_piece_tokens);
  // The sequences the scheduler places: the documents cut into pieces of at most the context.
  std::vector<Piece> pieces;
  std::vector<SampleRef> seqs;
  for (size_t i = 0; i < samples.size(); ++i) {
    const int64_t targets = samples[i].length - 1;
    for (int64_t begin = 0; begin < targets; begin += l.max_piece_tokens) {
      pieces.push_back(
          Piece{static_cast<int64_t>(i), begin, std::min(l.max_piece_tokens, targets - begin)});
      seqs.push_back(SampleRef{static_cast<int64_t>(seqs.size()), pieces.back().tokens + 1});
      plan.sequence_tokens_sq +=
          static_cast<double>(pieces.back().tokens) * static_cast<double>(pieces.back().tokens);
    }
  }
  const int pool = l.dp_size;
  HdpOptions o;
  o.pool = pool;
  o.capacity = l.micro_batch_tokens;
  o.cost = l.cost;
  o.balance = l.hdp_balance;
  o.stages = l.stages;
  o.ring = l.ring;
  const HdpPlan hp = seqs.empty() ? HdpPlan{} : plan_hdp(seqs, o);
  // Slots (Note: hybrid data parallelism slots).
  const auto table =
      seqs.empty() ? std::vector<std::vector<int>>(static_cast<size_t>(pool)) : hdp_slots(hp);
  int64_t units = static_cast<int64_t>(hp.groups.size());
  for (const auto& mbs : hp.ranks) {
    for (const auto& mb : mbs) units += mb.group < 0 ? 1 : 0;
  }
  auto round_up = [](int64_t n, int64_t m) { return (n + m - 1) / m * m; };
  MicroBatchPlan empty;
  empty.rows.emplace_back();  // one row of padding only
  empty.row_len = l.pad_multiple;
  const auto& mine = table[static_cast<size_t>(l.dp_rank)];
  for (const int k : mine) {
    const HdpMicroBatch* mb =
        k < 0 ? nullptr : &hp.ranks[static_cast<size_t>(l.dp_rank)][static_cast<size_t>(k)];
    if (mb == nullptr) {
      plan.micro_batches.push_back(empty);
      continue;
    }
    MicroBatchPlan p;
    p.rows.emplace_back();
    for (int64_t seq : mb->samples) {
      const Piece& piece = pieces[static_cast<size_t>(seq)];
      p.rows.front().push_back(piece);
      p.tokens += piece.tokens;
    }
    int64_t multiple = l.pad_multiple;
    if (mb->group >= 0) {
      p.group = hp.groups[static_cast<size_t>(mb->group)].ranks;
      p.group_rank =
          static_cast<int>(std::find(p.group.begin(), p.group.end(), l.dp_rank) - p.group.begin());
      multiple *= static_cast<int64_t>(p.group.size());
    }
    p.row_len = round_up(p.tokens, multiple);
    plan.micro_batches.push_back(std::move(p));
  }
  plan.global_micro_batches = std::max<int64_t>(units, 1);
}

}  // namespace

StepPlan plan_step(const std::vector<SampleRef>& samples, const PlanLayout& l) {
  const auto g = static_cast<int64_t>(samples.size());
  LOOM_CHECK_CONFIG(l.dp_size >= 1 && l.dp_rank >= 0 && l.dp_rank < l.dp_size,
                    "plan: DP rank {} of {}", l.dp_rank, l.dp_size);
  LOOM_CHECK_CONFIG(
      g >= 1 && (g % l.dp_size == 0 || (l.hdp && l.mode == BatchMode::kDocuments)),
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
  if (l.hdp) {
    LOOM_CHECK_CONFIG(l.mode == BatchMode::kDocuments,
                      "parallel.hdp plans whole documents: it needs data.mode DOCUMENTS");
    plan_hdp_step(samples, l, plan);
    return plan;
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
