// Every collective and dtype against exact expected results (nccl-tests style: inputs are small
// integers, so every sum is exact in every dtype, and the test counts wrong elements over all
// ranks, expecting 0). Runs on 1 (no launcher), 2, 4 and 8 ranks.
#include <gtest/gtest.h>

#include <map>
#include <string>
#include <thread>

#include "loom/comm/group_view.h"
#include "loom/core/error.h"
#include "test_world.h"

using loom::comm::AllGatherOptions;
using loom::comm::AllReduceOptions;
using loom::comm::AllToAllOptions;
using loom::comm::ReduceOp;
using loom::comm::ReduceScatterOptions;
using loom::testing::world;
using loom::testing::world_sum;
using loom::testing::world_wrong;

namespace {

const std::vector<at::ScalarType> kDtypes = {at::kFloat, at::kDouble, at::kBFloat16,
                                             at::kHalf,  at::kInt,    at::kLong};

// Rank r's value at flat index i: a small integer in [-8, 8], so sums over 8 ranks stay within
// [-64, 64], exact in bfloat16 (8-bit significand) and every wider type.
at::Tensor pattern(int r, int64_t n, int64_t offset = 0) {
  at::Tensor i = at::arange(offset, offset + n, at::kLong);
  return ((i * 7 + (r + 1) * 5) % 17 - 8).to(at::kDouble);
}

// Exact reference computed in float64 over every rank's pattern, then rounded once to `dtype`.
at::Tensor reference(ReduceOp op, int world_size, int64_t n, at::ScalarType dtype,
                     int64_t offset = 0) {
  at::Tensor acc = pattern(0, n, offset);
  for (int r = 1; r < world_size; ++r) {
    at::Tensor p = pattern(r, n, offset);
    switch (op) {
      case ReduceOp::kSum:
      case ReduceOp::kAvg:
        acc = acc + p;
        break;
      case ReduceOp::kMax:
        acc = at::maximum(acc, p);
        break;
      case ReduceOp::kMin:
        acc = at::minimum(acc, p);
        break;
    }
  }
  if (op == ReduceOp::kAvg) acc = acc / world_size;
  return acc.to(dtype);
}

std::string name(at::ScalarType t) { return c10::toString(t); }

}  // namespace

TEST(Collectives, AllReduceEveryOpAndDtype) {
  auto w = world();
  for (int64_t n : {1, 7, 1000, 65537}) {
    for (auto dtype : kDtypes) {
      for (auto op : {ReduceOp::kSum, ReduceOp::kAvg, ReduceOp::kMax, ReduceOp::kMin}) {
        bool integral = dtype == at::kInt || dtype == at::kLong;
        if (integral && op == ReduceOp::kAvg) continue;
        at::Tensor t = pattern(w->rank(), n).to(dtype);
        w->all_reduce(t, {op});
        EXPECT_EQ(world_wrong(t, reference(op, w->size(), n, dtype)), 0)
            << "n=" << n << " dtype=" << name(dtype) << " op=" << loom::comm::reduce_op_name(op);
      }
    }
  }
}

// bf16/fp16 sums must accumulate in fp32 and round once: a rank holding 256 and the others 1 gives
// 256 + (n-1), which a bf16 running sum would round back to 256 at every step.
TEST(Collectives, ReducedPrecisionSumsAccumulateInFp32) {
  auto w = world();
  if (w->size() < 2) GTEST_SKIP() << "needs two ranks";
  for (auto dtype : {at::kBFloat16, at::kHalf}) {
    double big = dtype == at::kBFloat16 ? 256.0 : 2048.0;
    at::Tensor t = at::full({64}, w->rank() == 0 ? big : 1.0, at::kDouble).to(dtype);
    at::Tensor expected = at::full({64}, big + (w->size() - 1), at::kDouble).to(dtype);
    w->all_reduce(t);
    EXPECT_EQ(world_wrong(t, expected), 0) << name(dtype);
    at::Tensor in = at::full({64 * w->size()}, w->rank() == 0 ? big : 1.0, at::kDouble).to(dtype);
    at::Tensor out = at::empty({64}, dtype);
    w->reduce_scatter(out, in);
    EXPECT_EQ(world_wrong(out, expected), 0) << "reduce_scatter " << name(dtype);
  }
}

TEST(Collectives, AllGatherEqualAndUneven) {
  auto w = world();
  int n = w->size(), r = w->rank();
  for (auto dtype : kDtypes) {
    at::Tensor in = pattern(r, 6).to(dtype).view({2, 3});
    at::Tensor out = at::empty({2 * n, 3}, dtype);
    w->all_gather(out, in);
    std::vector<at::Tensor> parts;
    for (int s = 0; s < n; ++s) parts.push_back(pattern(s, 6).view({2, 3}));
    EXPECT_EQ(world_wrong(out, at::cat(parts).to(dtype)), 0) << "equal " << name(dtype);

    // Uneven: rank s contributes s+1 rows.
    std::vector<int64_t> splits(n);
    int64_t total = 0;
    parts.clear();
    for (int s = 0; s < n; ++s) {
      splits[s] = s + 1;
      total += s + 1;
      parts.push_back(pattern(s, (s + 1) * 3).view({s + 1, 3}));
    }
    at::Tensor uin = pattern(r, (r + 1) * 3).to(dtype).view({r + 1, 3});
    at::Tensor uout = at::empty({total, 3}, dtype);
    AllGatherOptions opts;
    opts.output_split_sizes = splits;
    w->all_gather(uout, uin, opts);
    EXPECT_EQ(world_wrong(uout, at::cat(parts).to(dtype)), 0) << "uneven " << name(dtype);
  }
}

TEST(Collectives, AllGatherInPlaceSlot) {
  auto w = world();
  at::Tensor out = at::zeros({w->size() * 5}, at::kFloat);
  at::Tensor mine = out.narrow(0, w->rank() * 5, 5);
  mine.copy_(pattern(w->rank(), 5));
  w->all_gather(out, mine);
  std::vector<at::Tensor> parts;
  for (int s = 0; s < w->size(); ++s) parts.push_back(pattern(s, 5));
  EXPECT_EQ(world_wrong(out, at::cat(parts).to(at::kFloat)), 0);
}

TEST(Collectives, ReduceScatterEqualAndUneven) {
  auto w = world();
  int n = w->size(), r = w->rank();
  for (auto dtype : kDtypes) {
    for (auto op : {ReduceOp::kSum, ReduceOp::kMax}) {
      int64_t per = 10;
      at::Tensor in = pattern(r, per * n).to(dtype);
      at::Tensor out = at::empty({per}, dtype);
      w->reduce_scatter(out, in, {op});
      at::Tensor full = reference(op, n, per * n, dtype);
      EXPECT_EQ(world_wrong(out, full.narrow(0, r * per, per)), 0)
          << "equal " << name(dtype) << " " << loom::comm::reduce_op_name(op);

      // Uneven: rank s receives 2*s+1 rows of 4.
      std::vector<int64_t> splits(n);
      int64_t rows = 0, my_offset = 0;
      for (int s = 0; s < n; ++s) {
        splits[s] = 2 * s + 1;
        if (s < r) my_offset += splits[s];
        rows += splits[s];
      }
      at::Tensor uin = pattern(r, rows * 4).to(dtype).view({rows, 4});
      at::Tensor uout = at::empty({splits[r], 4}, dtype);
      ReduceScatterOptions opts;
      opts.op = op;
      opts.input_split_sizes = splits;
      w->reduce_scatter(uout, uin, opts);
      at::Tensor ufull = reference(op, n, rows * 4, dtype).view({rows, 4});
      EXPECT_EQ(world_wrong(uout, ufull.narrow(0, my_offset, splits[r])), 0)
          << "uneven " << name(dtype) << " " << loom::comm::reduce_op_name(op);
    }
  }
}

TEST(Collectives, AllToAllEqualAndUneven) {
  auto w = world();
  int n = w->size(), r = w->rank();
  // Block (s -> d) holds the value 100*s + d (+ position), so every received element names its
  // sender and destination.
  auto block = [](int s, int d, int64_t rows, int64_t cols) {
    return (at::arange(rows * cols, at::kDouble) + 100 * s + d).view({rows, cols});
  };
  for (auto dtype : {at::kFloat, at::kDouble, at::kInt, at::kLong, at::kBFloat16}) {
    std::vector<at::Tensor> send, expect;
    for (int d = 0; d < n; ++d) send.push_back(block(r, d, 2, 3));
    for (int s = 0; s < n; ++s) expect.push_back(block(s, r, 2, 3));
    at::Tensor in = at::cat(send).to(dtype);
    at::Tensor out = at::empty_like(in);
    w->all_to_all(out, in);
    EXPECT_EQ(world_wrong(out, at::cat(expect).to(dtype)), 0) << "equal " << name(dtype);

    // Uneven: s sends (s + d) % 3 rows to d (zero-row blocks included).
    auto rows = [](int s, int d) { return int64_t((s + d) % 3); };
    AllToAllOptions opts;
    send.clear();
    expect.clear();
    int64_t in_rows = 0, out_rows = 0;
    for (int d = 0; d < n; ++d) {
      opts.input_split_sizes.push_back(rows(r, d));
      send.push_back(block(r, d, rows(r, d), 2));
      in_rows += rows(r, d);
    }
    for (int s = 0; s < n; ++s) {
      opts.output_split_sizes.push_back(rows(s, r));
      expect.push_back(block(s, r, rows(s, r), 2));
      out_rows += rows(s, r);
    }
    at::Tensor uin = at::cat(send).to(dtype);
    at::Tensor uout = at::empty({out_rows, 2}, dtype);
    w->all_to_all(uout, uin, opts);
    EXPECT_EQ(world_wrong(uout, at::cat(expect).to(dtype)), 0) << "uneven " << name(dtype);
  }
}

TEST(Collectives, BroadcastFromEveryRoot) {
  auto w = world();
  for (auto dtype : kDtypes) {
    for (int root = 0; root < w->size(); ++root) {
      at::Tensor t = pattern(w->rank(), 33).to(dtype);
      w->broadcast(t, {root});
      EXPECT_EQ(world_wrong(t, pattern(root, 33).to(dtype)), 0) << name(dtype) << " root " << root;
    }
  }
}

TEST(PointToPoint, RingWithBatchedSendRecv) {
  auto w = world();
  int n = w->size(), r = w->rank();
  int next = (r + 1) % n, prev = (r + n - 1) % n;
  for (auto dtype : kDtypes) {
    at::Tensor out = pattern(r, 100).to(dtype);
    at::Tensor in = at::empty({100}, dtype);
    auto work = w->batch_isend_irecv(
        {loom::comm::P2POp::send(out, next, 3), loom::comm::P2POp::recv(in, prev, 3)});
    work->wait();
    EXPECT_EQ(world_wrong(in, pattern(prev, 100).to(dtype)), 0) << name(dtype);
  }
}

TEST(PointToPoint, BlockingRingEvenOdd) {
  auto w = world();
  int n = w->size(), r = w->rank();
  if (n < 2) GTEST_SKIP() << "blocking send to self would deadlock";
  int next = (r + 1) % n, prev = (r + n - 1) % n;
  at::Tensor out = pattern(r, 50).to(at::kFloat);
  at::Tensor in = at::empty({50}, at::kFloat);
  // Even ranks send first, odd ranks receive first: no cycle of blocked sends (n even or odd).
  if (r % 2 == 0) {
    w->send(out, next, 1);
    w->recv(in, prev, 1);
  } else {
    w->recv(in, prev, 1);
    w->send(out, next, 1);
  }
  EXPECT_EQ(world_wrong(in, pattern(prev, 50).to(at::kFloat)), 0);
}

TEST(Async, ManyCollectivesInFlight) {
  auto w = world();
  std::vector<at::Tensor> ts;
  std::vector<loom::comm::WorkPtr> works;
  for (int k = 0; k < 8; ++k) {
    ts.push_back(pattern(w->rank(), 1000, k).to(k % 2 ? at::kBFloat16 : at::kFloat));
    works.push_back(w->iall_reduce(ts.back()));
  }
  at::Tensor gin = pattern(w->rank(), 10).to(at::kLong);
  at::Tensor gout = at::empty({10 * w->size()}, at::kLong);
  works.push_back(w->iall_gather(gout, gin));
  at::Tensor rin = pattern(w->rank(), 4 * w->size()).to(at::kFloat);
  at::Tensor rout = at::empty({4}, at::kFloat);
  works.push_back(w->ireduce_scatter(rout, rin));
  works.push_back(w->ibarrier());
  for (auto it = works.rbegin(); it != works.rend(); ++it) (*it)->wait();
  for (auto& wk : works) EXPECT_TRUE(wk->is_completed());
  int64_t wrong = 0;
  for (int k = 0; k < 8; ++k) {
    wrong += world_wrong(ts[k], reference(ReduceOp::kSum, w->size(), 1000, ts[k].scalar_type(), k));
  }
  EXPECT_EQ(wrong, 0);
  std::vector<at::Tensor> parts;
  for (int s = 0; s < w->size(); ++s) parts.push_back(pattern(s, 10));
  EXPECT_EQ(world_wrong(gout, at::cat(parts).to(at::kLong)), 0);
  at::Tensor full = reference(ReduceOp::kSum, w->size(), 4 * w->size(), at::kFloat);
  EXPECT_EQ(world_wrong(rout, full.narrow(0, 4 * w->rank(), 4)), 0);
}

// A receive whose sender is late: wait(timeout) reports the operation, then completes once the
// message arrives.
TEST(Async, WaitTimesOutWithAClearMessage) {
  auto w = world();
  if (w->size() < 2) GTEST_SKIP() << "needs two ranks";
  at::Tensor buf = at::zeros({4}, at::kFloat);
  loom::comm::WorkPtr pending;
  std::string message;
  if (w->rank() == 0) {
    pending = w->irecv(buf, 1, /*tag=*/77);
    try {
      pending->wait(std::chrono::milliseconds(50));
    } catch (const loom::Error& e) {
      EXPECT_EQ(e.kind(), loom::ErrorKind::kTimeout);
      message = e.what();
    }
    EXPECT_NE(message.find("recv"), std::string::npos) << message;
    EXPECT_NE(message.find("did not complete within"), std::string::npos) << message;
  }
  w->barrier();
  if (w->rank() == 1) w->send(at::full({4}, 5.0f), 0, 77);
  if (w->rank() == 0) {
    pending->wait();
    EXPECT_TRUE(at::equal(buf, at::full({4}, 5.0f)));
  }
  EXPECT_EQ(world_sum(message.empty() && w->rank() == 0 ? 1 : 0), 0);
}

TEST(Split, SubCommunicatorsAreCachedAndCorrect) {
  auto w = world();
  int n = w->size(), r = w->rank();
  // Two groups by parity, ordered by descending world rank.
  auto sub = w->split(r % 2, -r);
  ASSERT_NE(sub, nullptr);
  std::vector<int> expected;
  for (int q = n - 1; q >= 0; --q) {
    if (q % 2 == r % 2) expected.push_back(q);
  }
  EXPECT_EQ(sub->world_ranks(), expected);
  EXPECT_EQ(sub->size(), static_cast<int>(expected.size()));
  EXPECT_EQ(sub->world_ranks()[sub->rank()], r);
  at::Tensor t = at::full({3}, double(r), at::kDouble);
  sub->all_reduce(t);
  double want = 0;
  for (int q : expected) want += q;
  EXPECT_EQ(world_wrong(t, at::full({3}, want, at::kDouble)), 0);

  // The same members again: the cached communicator comes back.
  auto again = w->split(r % 2 + 10, -r);
  EXPECT_EQ(again.get(), sub.get());
  // A split of a split.
  auto subsub = sub->split(sub->rank() / 2, sub->rank());
  ASSERT_NE(subsub, nullptr);
  at::Tensor one = at::ones({1}, at::kInt);
  subsub->all_reduce(one);
  EXPECT_EQ(one.item<int>(), subsub->size());
  // color < 0: not a member of any group.
  auto none = w->split(r == 0 ? -1 : 0, r);
  EXPECT_EQ(none == nullptr, r == 0);
  if (none) {
    EXPECT_EQ(none->size(), n - 1);
  }
}

// [Note: group views]: views of the world by parity (descending world rank, as the split above)
// run every collective at once on the one parent, each group its own, and must give what the real
// split communicator of the same members gives, bit for bit; transfers go around each view's ring.
TEST(GroupView, EqualsTheSplitCommunicator) {
  auto w = world();
  const int n = w->size(), r = w->rank();
  std::vector<int> members;
  for (int q = n - 1; q >= 0; --q) {
    if (q % 2 == r % 2) members.push_back(q);
  }
  auto view = loom::comm::make_group_view(w, members);
  auto sub = w->split(r % 2, -r);
  ASSERT_EQ(view->size(), sub->size());
  ASSERT_EQ(view->rank(), sub->rank());
  EXPECT_EQ(view->world_ranks(), sub->world_ranks());
  const int d = view->size(), me = view->rank();
  std::map<std::string, int64_t> wrong;
  for (at::ScalarType dt : {at::kFloat, at::kBFloat16, at::kLong}) {
    for (ReduceOp op : {ReduceOp::kSum, ReduceOp::kMax, ReduceOp::kMin}) {
      at::Tensor a = pattern(r, 37).to(dt), b = a.clone();
      view->all_reduce(a, {op});
      sub->all_reduce(b, {op});
      wrong["all_reduce"] += at::ne(a, b).sum().item<int64_t>();
    }
  }
  // Float sums in another order than MPI's may round differently: integers only here.
  at::Tensor in = pattern(r, 6).to(at::kInt);
  at::Tensor ga = at::empty({6 * d}, at::kInt), gb = ga.clone();
  view->all_gather(ga, in);
  sub->all_gather(gb, in);
  wrong["all_gather"] += at::ne(ga, gb).sum().item<int64_t>();
  at::Tensor ra = at::empty({3}, at::kInt), rb = ra.clone();
  const at::Tensor big = pattern(r, 3 * d).to(at::kInt);
  view->reduce_scatter(ra, big);
  sub->reduce_scatter(rb, big);
  wrong["reduce_scatter"] += at::ne(ra, rb).sum().item<int64_t>();
  at::Tensor aa = at::empty({2 * d}, at::kLong), ab = aa.clone();
  const at::Tensor src = pattern(r, 2 * d).to(at::kLong);
  view->all_to_all(aa, src);
  sub->all_to_all(ab, src);
  wrong["all_to_all"] += at::ne(aa, ab).sum().item<int64_t>();
  at::Tensor ba = pattern(r, 5), bb = ba.clone();
  view->broadcast(ba, {d - 1});
  sub->broadcast(bb, {d - 1});
  wrong["broadcast"] += at::ne(ba, bb).sum().item<int64_t>();
  // Around the ring: send to the next member, receive from the previous one, asynchronously.
  at::Tensor got = at::empty({4}, at::kDouble);
  auto work = view->batch_isend_irecv(
      {loom::comm::P2POp::send(at::full({4}, double(r), at::kDouble), (me + 1) % d, 3),
       loom::comm::P2POp::recv(got, (me + d - 1) % d, 3)});
  work->wait();
  wrong["ring"] += at::ne(got, at::full({4}, double(members[static_cast<size_t>((me + d - 1) % d)]),
                                        at::kDouble))
                       .sum()
                       .item<int64_t>();
  view->barrier();
  for (const char* op :
       {"all_reduce", "all_gather", "reduce_scatter", "all_to_all", "broadcast", "ring"})
    EXPECT_EQ(world_sum(wrong[op]), 0) << op;
  EXPECT_NE(view->name().find(".group["), std::string::npos) << view->name();
}

TEST(GroupView, RefusesBadMembers) {
  auto w = world();
  const int n = w->size(), r = w->rank();
  auto refused = [&](const std::vector<int>& ranks, const std::string& needle) {
    try {
      (void)loom::comm::make_group_view(w, ranks);
      ADD_FAILURE() << "expected a refusal containing '" << needle << "'";
    } catch (const loom::Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  refused({r, n}, "outside");
  refused({r, r}, "twice");
  if (n > 1) refused({(r + 1) % n}, "not a member");
  auto view = loom::comm::make_group_view(w, {r});
  try {
    (void)view->split(0, 0);
    ADD_FAILURE() << "a view split";
  } catch (const loom::Error& e) {
    EXPECT_NE(std::string(e.what()).find("cannot be split"), std::string::npos) << e.what();
  }
}

TEST(Stats, CountsCallsAndBytes) {
  auto w = world();
  auto sub = w->split(0, w->rank());  // fresh counters: a communicator of its own
  auto before = sub->stats().get(loom::comm::OpKind::kAllReduce);
  at::Tensor t = at::ones({1024}, at::kFloat);
  sub->all_reduce(t);
  sub->all_reduce(t);
  auto after = sub->stats().get(loom::comm::OpKind::kAllReduce);
  EXPECT_EQ(after.calls - before.calls, 2);
  EXPECT_EQ(after.bytes - before.bytes, 2 * 4096);
  EXPECT_GE(after.seconds, before.seconds);
  at::Tensor g = at::empty({1024 * w->size()}, at::kFloat);
  auto ag = sub->stats().get(loom::comm::OpKind::kAllGather).bytes;
  sub->all_gather(g, t);
  EXPECT_EQ(sub->stats().get(loom::comm::OpKind::kAllGather).bytes - ag, 4096 * w->size());
}

TEST(BadInput, RefusedBeforeAnyCommunication) {
  auto w = world();
  auto expect_error = [](auto fn, const std::string& needle) {
    try {
      fn();
      ADD_FAILURE() << "no error; expected one mentioning '" << needle << "'";
    } catch (const loom::Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  at::Tensor a = at::ones({4, 4}, at::kFloat);
  at::Tensor nc = a.t();
  expect_error([&] { w->all_reduce(nc); }, "must be contiguous");
  at::Tensor ints = at::ones({4}, at::kInt);
  expect_error([&] { w->all_reduce(ints, {ReduceOp::kAvg}); }, "avg is not defined");
  at::Tensor small = at::empty({1}, at::kFloat);
  at::Tensor in = at::ones({4}, at::kFloat);
  expect_error([&] { w->all_gather(small, in); }, "output has 1 elements");
  at::Tensor cf = at::ones({2}, at::kComplexFloat);
  expect_error([&] { w->broadcast(cf); }, "does not support dtype");
  expect_error([&] { w->send(in, w->size() + 3); }, "outside [0,");
  AllGatherOptions bad;
  bad.output_split_sizes = {1};
  at::Tensor out = at::empty({4}, at::kFloat);
  if (w->size() > 1) expect_error([&] { w->all_gather(out, in, bad); }, "split sizes");
  ReduceScatterOptions rs;
  rs.input_split_sizes.assign(w->size(), 1);
  rs.input_split_sizes[0] = 2;  // sums to size+1 rows, input has size rows
  at::Tensor rin = at::ones({w->size(), 2}, at::kFloat);
  at::Tensor rout = at::empty({1, 2}, at::kFloat);
  expect_error([&] { w->reduce_scatter(rout, rin, rs); }, "input split sizes sum to");
  AllToAllOptions a2a;
  a2a.input_split_sizes.assign(w->size(), 1);
  a2a.output_split_sizes.assign(w->size(), -1);
  at::Tensor ain = at::ones({w->size()}, at::kFloat);
  expect_error([&] { w->all_to_all(ain, ain, a2a); }, "output split sizes sum to");
  at::Tensor flags = at::ones({4}, at::kBool);
  expect_error([&] { w->all_reduce(flags); }, "does not reduce bool");
  at::Tensor d64 = at::ones({4}, at::kDouble);
  expect_error([&] { w->all_gather(out, d64); }, "input dtype Double != output dtype Float");
  // All ranks are still in step: a collective after the refusals works.
  EXPECT_EQ(world_sum(1), w->size());
}
