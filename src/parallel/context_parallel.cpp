#include "loom/parallel/context_parallel.h"

#include <algorithm>
#include <numeric>
#include <utility>

#include "loom/core/error.h"

namespace loom::parallel {

CpCommType parse_cp_comm_type(const std::string& s) {
  if (s == "p2p" || s.empty()) return CpCommType::kP2P;
  if (s == "a2a") return CpCommType::kA2A;
  if (s == "a2a+p2p") return CpCommType::kA2AP2P;
  LOOM_THROW(::loom::ErrorKind::kConfig,
             "field 'parallel.cp_comm_type' is '{}': use p2p (ring), a2a (all-to-all) or "
             "a2a+p2p (hierarchical)",
             s);
}

const char* cp_comm_type_name(CpCommType t) {
  switch (t) {
    case CpCommType::kP2P:
      return "p2p";
    case CpCommType::kA2A:
      return "a2a";
    case CpCommType::kA2AP2P:
      return "a2a+p2p";
  }
  return "?";
}

ContextParallel make_context_parallel(comm::CommunicatorPtr cp, CpCommType type, int a2a_size,
                                      int64_t block) {
  ContextParallel c;
  c.type = type;
  c.block = block;
  if (!cp || cp->size() <= 1) return c;
  c.comm = cp;
  const int n = cp->size(), r = cp->rank();
  int g = 1;
  if (type == CpCommType::kA2A) g = n;
  if (type == CpCommType::kA2AP2P) {
    LOOM_CHECK_CONFIG(a2a_size > 1 && a2a_size < n && n % a2a_size == 0,
                      "parallel.cp_comm_type a2a+p2p: parallel.cp_a2a_size = {} must divide "
                      "parallel.cp = {} and lie strictly between 1 and it (a2a groups of that many "
                      "ranks, a ring across cp / cp_a2a_size of them)",
                      a2a_size, n);
    g = a2a_size;
  }
  // Keys are the CP ranks, so an a2a group's rank t is CP rank g a + t, and ring member m is the
  // a2a group m (Note: context-parallel attention).
  if (g > 1) {
    c.a2a = cp->split(r / g, r);
    c.a2a->set_name(cp->name() + ".a2a");
  }
  if (g < n) {
    c.ring = cp->split(r % g, r);
    c.ring->set_name(cp->name() + ".ring");
  }
  return c;
}

void check_cp_heads(int64_t heads, int64_t kv_heads, int g, int tp) {
  if (g <= 1) return;
  const std::string per_tp =
      tp > 1 ? fmt::format(" per TP rank (model.num_heads {} / parallel.tp {})", heads * tp, tp)
             : std::string(" (model.num_heads)");
  LOOM_CHECK_CONFIG(heads % g == 0,
                    "the all-to-all context parallelism scatters attention heads over {} ranks, "
                    "but there are {} query heads{}: {} % {} = {}; use a cp (or "
                    "parallel.cp_a2a_size) that divides the heads, or parallel.cp_comm_type p2p",
                    g, heads, per_tp, heads, g, heads % g);
  LOOM_CHECK_CONFIG(kv_heads % g == 0 || g % kv_heads == 0,
                    "the all-to-all context parallelism scatters KV heads over {} ranks: {} KV "
                    "heads{} neither split into {} groups ({} % {} = {}) nor replicate evenly "
                    "({} % {} = {}); use parallel.cp_comm_type p2p",
                    g, kv_heads,
                    tp > 1 ? fmt::format(" per TP rank (model.num_kv_heads {} / parallel.tp {})",
                                         kv_heads * tp, tp)
                           : std::string(" (model.num_kv_heads)"),
                    g, kv_heads, g, kv_heads % g, g, kv_heads, g % kv_heads);
}

namespace {

// Key visits of tokens at offsets [a, a + len) of a document: sum of (t + 1).
double work_of(int64_t a, int64_t len) {
  const double x = static_cast<double>(a), n = static_cast<double>(len);
  return n * x + n * (n + 1) / 2;
}

struct Piece {
  int64_t begin = 0, len = 0;  // global token indices
  int64_t doc_begin = 0;       // its document's first index
};

// The balanced split of one row into cp lists of pieces (Note: balanced context-parallel split).
std::vector<std::vector<Piece>> split_row(const std::vector<std::pair<int64_t, int64_t>>& docs,
                                          int64_t s, int cp) {
  const int64_t cap = s / cp;
  std::vector<std::vector<Piece>> pieces(static_cast<size_t>(cp));
  std::vector<int64_t> count(static_cast<size_t>(cp), 0);
  std::vector<double> work(static_cast<size_t>(cp), 0.0);
  auto give = [&](int r, int64_t begin, int64_t len, int64_t doc_begin) {
    if (len <= 0) return;
    pieces[static_cast<size_t>(r)].push_back({begin, len, doc_begin});
    count[static_cast<size_t>(r)] += len;
    work[static_cast<size_t>(r)] += work_of(begin - doc_begin, len);
  };
  double total = 0;
  for (const auto& [b, len] : docs) total += work_of(0, len);
  std::vector<std::pair<int64_t, int64_t>> whole;
  for (const auto& [b, len] : docs) {
    if (len > cap || (work_of(0, len) > total / (8.0 * cp) && len >= 16LL * cp)) {  // Note
      // Zig-zag: 2cp pieces, the first len % 2cp one token longer; rank r: pieces r, 2cp-1-r.
      const int64_t parts = 2LL * cp, base = len / parts, extra = len % parts;
      int64_t at = b;
      for (int64_t p = 0; p < parts; ++p) {
        const int64_t n = base + (p < extra ? 1 : 0);
        const int r = p < cp ? static_cast<int>(p) : static_cast<int>(parts - 1 - p);
        give(r, at, n, b);
        at += n;
      }
    } else {
      whole.emplace_back(b, len);
    }
  }
  std::stable_sort(whole.begin(), whole.end(),
                   [](const auto& x, const auto& y) { return x.second > y.second; });
  auto least_loaded = [&](int64_t need) {
    int best = -1;
    for (int r = 0; r < cp; ++r) {
      if (count[static_cast<size_t>(r)] + need > cap) continue;
      if (best < 0 || work[static_cast<size_t>(r)] < work[static_cast<size_t>(best)]) best = r;
    }
    return best;
  };
  std::vector<std::pair<int64_t, int64_t>> rest;
  for (const auto& [b, len] : whole) {
    const int r = least_loaded(len);
    if (r >= 0) {
      give(r, b, len, b);
    } else {
      rest.emplace_back(b, len);
    }
  }
  // Documents that fit nowhere whole: fill the remaining room, least-loaded rank first.
  std::sort(rest.begin(), rest.end());
  for (const auto& [b, len] : rest) {
    int64_t at = b;
    while (at < b + len) {
      const int r = least_loaded(1);
      LOOM_INTERNAL_CHECK(r >= 0, "balanced_cp_index: no room left for document at {}", b);
      const int64_t n = std::min(b + len - at, cap - count[static_cast<size_t>(r)]);
      give(r, at, n, b);
      at += n;
    }
  }
  // Ranks over their share (uneven zig-zag pieces) give their last tokens to ranks with room.
  for (int r = 0; r < cp; ++r) {
    auto& mine = pieces[static_cast<size_t>(r)];
    std::sort(mine.begin(), mine.end(),
              [](const Piece& x, const Piece& y) { return x.begin < y.begin; });
    while (count[static_cast<size_t>(r)] > cap) {
      Piece& last = mine.back();
      const int to = least_loaded(1);
      LOOM_INTERNAL_CHECK(to >= 0, "balanced_cp_index: no rank has room");
      const int64_t n = std::min(
          {count[static_cast<size_t>(r)] - cap, last.len, cap - count[static_cast<size_t>(to)]});
      last.len -= n;
      count[static_cast<size_t>(r)] -= n;
      work[static_cast<size_t>(r)] -= work_of(last.begin + last.len - last.doc_begin, n);
      give(to, last.begin + last.len, n, last.doc_begin);
      if (last.len == 0) mine.pop_back();
    }
  }
  return pieces;
}

std::vector<std::pair<int64_t, int64_t>> documents_of(const at::Tensor& doc_ids, int64_t row,
                                                      int64_t s) {
  std::vector<std::pair<int64_t, int64_t>> docs;
  if (!doc_ids.defined()) {
    docs.emplace_back(0, s);
    return docs;
  }
  const int64_t* d = doc_ids.data_ptr<int64_t>() + row * s;
  int64_t start = 0;
  for (int64_t t = 1; t <= s; ++t) {
    if (t == s || d[t] != d[t - 1]) {
      LOOM_CHECK(t == s || d[t] > d[t - 1],
                 "context parallelism: doc_ids of row {} decrease at position {} ({} after {}); "
                 "documents must be packed in order",
                 row, t, d[t], d[t - 1]);
      docs.emplace_back(start, t - start);
      start = t;
    }
  }
  return docs;
}

}  // namespace

at::Tensor balanced_cp_index(const at::Tensor& doc_ids, int64_t b, int64_t s, int cp) {
  LOOM_CHECK(cp >= 1 && s % cp == 0,
             "context parallelism over {} ranks: a row of {} tokens does not split evenly ({} % "
             "{} = {})",
             cp, s, s, cp, s % std::max(cp, 1));
  at::Tensor docs;
  if (doc_ids.defined()) {
    LOOM_CHECK(doc_ids.dim() == 2 && doc_ids.size(0) == b && doc_ids.size(1) == s,
               "balanced_cp_index: doc_ids {} for a [{}, {}] batch", doc_ids.sizes(), b, s);
    docs = doc_ids.to(at::kCPU, at::kLong).contiguous();
  }
  const int64_t n = s / cp;
  at::Tensor index = at::empty({cp, b, n}, at::kLong);
  auto acc = index.accessor<int64_t, 3>();
  for (int64_t row = 0; row < b; ++row) {
    const auto pieces = split_row(documents_of(docs, row, s), s, cp);
    for (int r = 0; r < cp; ++r) {
      auto mine = pieces[static_cast<size_t>(r)];
      std::sort(mine.begin(), mine.end(),
                [](const Piece& x, const Piece& y) { return x.begin < y.begin; });
      int64_t at = 0;
      for (const Piece& p : mine) {
        for (int64_t t = 0; t < p.len; ++t) acc[r][row][at++] = p.begin + t;
      }
      LOOM_INTERNAL_CHECK(at == n, "balanced_cp_index: rank {} got {} tokens of row {}, not {}", r,
                          at, row, n);
    }
  }
  return index;
}

at::Tensor contiguous_cp_index(int64_t b, int64_t s, int cp) {
  LOOM_CHECK(cp >= 1 && s % cp == 0, "contiguous_cp_index: {} tokens over {} ranks", s, cp);
  return at::arange(s, at::kLong).view({cp, 1, s / cp}).expand({cp, b, s / cp}).contiguous();
}

std::vector<double> cp_attention_work(const at::Tensor& index, const at::Tensor& doc_ids) {
  const int64_t cp = index.size(0), b = index.size(1), n = index.size(2), s = cp * n;
  at::Tensor docs;
  if (doc_ids.defined()) docs = doc_ids.to(at::kCPU, at::kLong).contiguous();
  std::vector<double> work(static_cast<size_t>(cp), 0.0);
  const at::Tensor idx = index.to(at::kCPU).contiguous();
  auto acc = idx.accessor<int64_t, 3>();
  for (int64_t row = 0; row < b; ++row) {
    // Each position's document start.
    std::vector<int64_t> start(static_cast<size_t>(s), 0);
    for (const auto& [begin, len] : documents_of(docs, row, s)) {
      for (int64_t t = begin; t < begin + len; ++t) start[static_cast<size_t>(t)] = begin;
    }
    for (int64_t r = 0; r < cp; ++r) {
      for (int64_t t = 0; t < n; ++t) {
        const int64_t i = acc[r][row][t];
        work[static_cast<size_t>(r)] += static_cast<double>(i - start[static_cast<size_t>(i)] + 1);
      }
    }
  }
  return work;
}

}  // namespace loom::parallel
