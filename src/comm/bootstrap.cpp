#include "loom/comm/bootstrap.h"

#include <cstdlib>

#include "loom/comm/desync.h"
#include "loom/comm/flight_recorder.h"
#include "loom/comm/local_communicator.h"
#include "loom/core/error.h"
#include "loom/core/logging.h"

#ifdef LOOM_HAVE_MPI
#include <mpi.h>

#include "loom/comm/mpi_communicator.h"
#endif

namespace loom::comm {

Bootstrap::Bootstrap(const BootstrapOptions& options, int* argc, char*** argv) {
#ifdef LOOM_HAVE_MPI
  int initialized = 0;
  MPI_Initialized(&initialized);
  if (!initialized) {
    int provided = 0;
    // THREAD_MULTIPLE: the watchdog thread may call MPI_Abort while the main thread is inside a
    // blocking collective.
    LOOM_CHECK_MPI(MPI_Init_thread(argc, argv, MPI_THREAD_MULTIPLE, &provided));
    initialized_mpi_ = true;
  }
  launcher_ = "mpi";
  auto world = MpiCommunicator::world(options.timeout_s);
  rank_ = world->rank();
  size_ = world->size();
  MPI_Comm node;
  LOOM_CHECK_MPI(
      MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, rank_, MPI_INFO_NULL, &node));
  MPI_Comm_rank(node, &local_rank_);
  MPI_Comm_size(node, &local_size_);
  MPI_Comm_free(&node);
  world_ = world;
  // The desync report's side channel (Note: desync report) is served by the watchdog thread while
  // the main thread is inside MPI: only with MPI_THREAD_MULTIPLE (and a watchdog).
  int level = 0;
  MPI_Query_thread(&level);
  if (level == MPI_THREAD_MULTIPLE && options.watchdog) {
    set_desync_channel(make_mpi_desync_channel());
  } else if (rank_ == 0 && options.watchdog) {
    LOOM_LOG_WARN(
        "MPI provides thread level {} (not MPI_THREAD_MULTIPLE): a timed-out collective "
        "will not name the ranks that did not reach it",
        level);
  }
  FlightRecorder::instance().set_abort_handler([](const std::string& report) {
    LOOM_LOG_ERROR("{}", report);
    log::logger().flush();
    std::fflush(stderr);
    MPI_Abort(MPI_COMM_WORLD, 3);
  });
#else
  world_ = std::make_shared<LocalCommunicator>(at::kCPU, options.timeout_s);
#endif
  set_process_rank(rank_);
  log::set_rank(rank_);
  if (options.watchdog) FlightRecorder::instance().ensure_watchdog();
}

Bootstrap::~Bootstrap() {
  world_.reset();
  if (auto channel = desync_channel()) {
    channel->close();
    set_desync_channel(nullptr);
  }
#ifdef LOOM_HAVE_MPI
  if (initialized_mpi_) {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (!finalized) MPI_Finalize();
  }
#endif
}

void Bootstrap::abort(int code, const std::string& why) {
  LOOM_LOG_ERROR("aborting the job (code {}): {}", code, why);
  log::logger().flush();
  std::fflush(stderr);
#ifdef LOOM_HAVE_MPI
  MPI_Abort(MPI_COMM_WORLD, code);
#endif
  std::abort();
}

}  // namespace loom::comm
