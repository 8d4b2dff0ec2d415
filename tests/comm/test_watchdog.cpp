// A collective in which one rank never arrives must end the job with a report naming the rank, the
// communicator and the operation, not hang. Disabled in the normal run (it aborts the job); CTest
// runs it alone and matches the report (see tests/CMakeLists.txt).
#include <fmt/format.h>
#include <gtest/gtest.h>

#include <thread>

#include "loom/comm/desync.h"
#include "test_world.h"

TEST(Watchdog, DISABLED_HungCollectiveAbortsTheJobWithAReport) {
  auto w = loom::testing::world();
  ASSERT_GE(w->size(), 2);
  auto tp = w->split(0, w->rank());
  tp->set_name("tp");
  tp->set_timeout_s(2.0);
  if (w->rank() == 1) {
    // Rank 1 "hangs" (never joins the all-reduce); the watchdog on rank 0 must end the job.
    std::this_thread::sleep_for(std::chrono::seconds(60));
  } else {
    at::Tensor t = at::ones({16}, at::kFloat);
    tp->all_reduce(t);
  }
  ADD_FAILURE() << "the hung all_reduce returned";
}

// ---- desync report (Note: desync report) ----------------------------------------------------

namespace {

using loom::comm::OpKind;
using loom::comm::PeerProgress;

PeerProgress reached(int64_t seq, OpKind kind, bool done, std::string in_flight = "") {
  PeerProgress p;
  p.knows_comm = true;
  p.last_seq = seq;
  p.last_kind = kind;
  p.last_done = done;
  p.since_last_s = 3.25;
  p.in_flight = std::move(in_flight);
  p.idle_s = p.in_flight.empty() ? 3.0 : -1;
  return p;
}

loom::comm::StuckOp stuck(std::vector<int> members) {
  loom::comm::StuckOp op;
  op.comm = "dp";
  op.members = std::move(members);
  op.seq = 12;
  op.kind = OpKind::kAllReduce;
  return op;
}

}  // namespace

TEST(DesyncReport, EncodesAndDecodes) {
  PeerProgress p = reached(41, OpKind::kReduceScatter, false, "all_gather seq=3 on 'tp' for 1.5 s");
  auto q = PeerProgress::decode(p.encode());
  ASSERT_TRUE(q.has_value());
  EXPECT_EQ(q->last_seq, 41);
  EXPECT_EQ(q->last_kind, OpKind::kReduceScatter);
  EXPECT_FALSE(q->last_done);
  EXPECT_EQ(q->in_flight, p.in_flight);
  EXPECT_DOUBLE_EQ(q->since_last_s, 3.25);
  // Anything else (another version, a truncated message) is no answer, not a wrong one.
  EXPECT_FALSE(PeerProgress::decode("").has_value());
  EXPECT_FALSE(PeerProgress::decode(p.encode().substr(0, 20)).has_value());
  std::string bad_kind = p.encode();
  bad_kind.replace(bad_kind.find("\t41\t") + 4, 1, "99");
  EXPECT_FALSE(PeerProgress::decode(bad_kind).has_value());
}

TEST(DesyncReport, RankRanges) {
  EXPECT_EQ(loom::comm::rank_ranges({7, 0, 1, 2, 3, 9, 8, 5}), "0-3,5,7-9");
  EXPECT_EQ(loom::comm::rank_ranges({4}), "4");
  EXPECT_EQ(loom::comm::rank_ranges({}), "(none)");
}

TEST(DesyncReport, NamesTheRankThatDidNotReachTheCollective) {
  // World ranks 0, 2, 4, 6 form 'dp'; rank 0 timed out in all_reduce seq 12. Rank 4 finished seq
  // 11 and is computing; rank 6 is stuck in another communicator's collective.
  std::vector<std::optional<PeerProgress>> a(4);
  a[1] = reached(12, OpKind::kAllReduce, false);
  a[2] = reached(11, OpKind::kAllReduce, true);
  a[3] = reached(11, OpKind::kAllReduce, true, "all_gather seq=3 on 'tp' for 9.0 s");
  std::string r = loom::comm::desync_report(stuck({0, 2, 4, 6}), 0, a, 2.0);
  EXPECT_EQ(r.substr(0, r.find('\n')),
            "desync report for all_reduce seq=12 on 'dp' (world ranks 0,2,4,6): world ranks 4,6 "
            "did not reach it");
  EXPECT_NE(r.find("world rank 4 has not reached it: its last operation on 'dp' is all_reduce "
                   "seq=11, finished 3.2 s ago; it has had no operation in flight for 3.0 s"),
            std::string::npos)
      << r;
  EXPECT_NE(r.find("world rank 6 has not reached it: its last operation on 'dp' is all_reduce "
                   "seq=11, finished 3.2 s ago; it is now in all_gather seq=3 on 'tp' for 9.0 s"),
            std::string::npos)
      << r;
  EXPECT_NE(r.find("waiting in it: world ranks 0,2"), std::string::npos) << r;
}

TEST(DesyncReport, NamesMismatchedAndSilentRanksAndBlamesTheTransportWhenAllArrived) {
  std::vector<std::optional<PeerProgress>> a(3);
  a[1] = reached(12, OpKind::kBroadcast, false);
  std::string r = loom::comm::desync_report(stuck({0, 1, 2}), 0, a, 2.0);
  EXPECT_NE(r.find("world rank 1 called a different operation; world rank 2 did not answer within "
                   "2.0 s"),
            std::string::npos)
      << r;
  EXPECT_NE(r.find("world rank 1 called broadcast as seq=12 on 'dp' where world rank 0 called "
                   "all_reduce"),
            std::string::npos)
      << r;

  // Never used the communicator: also behind.
  std::vector<std::optional<PeerProgress>> b(2);
  b[1] = PeerProgress{};
  r = loom::comm::desync_report(stuck({0, 1}), 0, b, 2.0);
  EXPECT_NE(r.find("world rank 1 has not reached it: it has not used 'dp' yet"), std::string::npos)
      << r;

  std::vector<std::optional<PeerProgress>> c(3);
  c[0] = reached(12, OpKind::kAllReduce, false);
  c[2] = reached(12, OpKind::kAllReduce, false);
  r = loom::comm::desync_report(stuck({3, 1, 2}), 1, c, 2.0);
  EXPECT_NE(r.find("every member reached it and none finished it"), std::string::npos) << r;
  EXPECT_NE(r.find("waiting in it: world ranks 1-3"), std::string::npos) << r;
}

// The live channel: rank 0 starts a collective the others join only after a world barrier, and
// asks them, while they are still before it, for their progress (answered by their watchdog
// threads while their main threads are elsewhere).
TEST(DesyncReport, AsksThePeersOverTheSideChannel) {
  auto w = loom::testing::world();
  if (w->size() < 2 || !loom::comm::desync_channel()) GTEST_SKIP() << "needs MPI and 2+ ranks";
  auto x = w->split(0, w->rank());
  x->set_name("x");
  at::Tensor t = at::ones({4}, at::kFloat);
  if (w->rank() == 0) {
    auto work = x->iall_reduce(t);
    std::string r = loom::comm::desync_report_for(work->info().recorder_id, 20.0);
    std::string culprits =
        w->size() == 2 ? "world rank 1" : fmt::format("world ranks 1-{}", w->size() - 1);
    EXPECT_NE(
        r.find(fmt::format("desync report for all_reduce seq={} on 'x' (world ranks 0-{}): {} "
                           "did not reach it",
                           work->info().seq, w->size() - 1, culprits)),
        std::string::npos)
        << r;
    EXPECT_NE(r.find("world rank 1 has not reached it: "), std::string::npos) << r;
    w->barrier();
    work->wait();
  } else {
    w->barrier();
    x->iall_reduce(t)->wait();  // (MPI matches a non-blocking collective only with another)
  }
  EXPECT_FLOAT_EQ(t[0].item<float>(), static_cast<float>(w->size()));
}
