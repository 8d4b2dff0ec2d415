// GoogleTest main for tests run under mpirun: bootstraps the communicator, keeps rank 0's output
// (other ranks print only their failures, prefixed with their rank), and makes the exit status
// agree across ranks so that mpirun reports a failure on any rank.
#include <ATen/Parallel.h>
#include <gtest/gtest.h>

#include <cstdio>

#include "loom/core/env.h"
#include "test_world.h"

namespace {
loom::comm::Bootstrap* g_bootstrap = nullptr;

class RankFailurePrinter : public ::testing::EmptyTestEventListener {
 public:
  explicit RankFailurePrinter(int rank) : rank_(rank) {}
  void OnTestPartResult(const ::testing::TestPartResult& r) override {
    if (!r.failed()) return;
    std::fprintf(stderr, "[rank %d] FAILURE %s:%d\n%s\n", rank_, r.file_name() ? r.file_name() : "?",
                 r.line_number(), r.summary());
  }

 private:
  int rank_;
};
}  // namespace

namespace loom::testing {
loom::comm::Bootstrap& bootstrap() { return *g_bootstrap; }
loom::comm::CommunicatorPtr world() { return g_bootstrap->world(); }
}  // namespace loom::testing

int main(int argc, char** argv) {
  at::set_num_threads(1);
  ::testing::InitGoogleTest(&argc, argv);
  loom::comm::BootstrapOptions options;
  // A hung collective in a test aborts the job with a report instead of waiting for CTest's timeout.
  options.timeout_s = loom::env::get_double("LOOM_TEST_TIMEOUT_S", 120);
  loom::comm::Bootstrap boot(options, &argc, &argv);
  g_bootstrap = &boot;
  if (boot.rank() != 0) {
    auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
    listeners.Append(new RankFailurePrinter(boot.rank()));
  }
  int rc = RUN_ALL_TESTS();
  at::Tensor flag = at::full({1}, rc, at::kInt);
  boot.world()->all_reduce(flag, {loom::comm::ReduceOp::kMax});
  return flag.item<int>();
}
