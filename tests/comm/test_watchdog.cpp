// A collective in which one rank never arrives must end the job with a report naming the rank, the
// communicator and the operation, not hang. Disabled in the normal run (it aborts the job); CTest
// runs it alone and matches the report (see tests/CMakeLists.txt).
#include <gtest/gtest.h>

#include <thread>

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
