// Bootstrap: starts the process's communication runtime and hands out the world communicator.
//
// Under mpirun (or any MPI launcher) it initialises MPI; a single process started with no launcher
// runs as a world of one (MPI singleton when MPI is built, else a LocalCommunicator). It also sets
// the rank used in error messages and logs, installs MPI_Abort as the watchdog's abort action, and
// finalises MPI when it is destroyed. One per process; create it first thing in main().
#pragma once

#include <memory>
#include <string>

#include "loom/comm/communicator.h"
#include "loom/config.pb.h"

namespace loom::comm {

struct BootstrapOptions {
  double timeout_s = 600;  // default timeout of every communicator (CommConfig.timeout_s)
  bool watchdog = true;    // start the FlightRecorder watchdog

  static BootstrapOptions from_config(const config::CommConfig& c) {
    BootstrapOptions o;
    o.timeout_s = c.timeout_s();
    o.watchdog = c.watchdog();
    return o;
  }
};

class Bootstrap {
 public:
  explicit Bootstrap(const BootstrapOptions& options = {}, int* argc = nullptr, char*** argv = nullptr);
  ~Bootstrap();
  Bootstrap(const Bootstrap&) = delete;
  Bootstrap& operator=(const Bootstrap&) = delete;

  int rank() const { return rank_; }
  int size() const { return size_; }
  // Rank and count of the processes on this node (the same shared-memory domain).
  int local_rank() const { return local_rank_; }
  int local_size() const { return local_size_; }
  // "mpi" or "none" (a world of one without MPI).
  const std::string& launcher() const { return launcher_; }

  // The CPU world communicator (MPI, or local).
  CommunicatorPtr world() const { return world_; }

  // Ends the whole job: logs `why`, then MPI_Abort (every rank) or std::abort (no MPI).
  [[noreturn]] void abort(int code, const std::string& why);

 private:
  int rank_ = 0;
  int size_ = 1;
  int local_rank_ = 0;
  int local_size_ = 1;
  std::string launcher_ = "none";
  bool initialized_mpi_ = false;
  CommunicatorPtr world_;
};

}  // namespace loom::comm
