#include "loom/train/signals.h"

#include <atomic>
#include <csignal>
#include <cstdint>
#include <ctime>

namespace loom::train {

namespace {
std::atomic<int> g_signal{0};
std::atomic<int64_t> g_first_ns{0};
struct sigaction g_old_term, g_old_usr1;

int64_t now_ns() {  // clock_gettime is async-signal-safe
  timespec ts{};
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<int64_t>(ts.tv_sec) * 1000000000 + ts.tv_nsec;
}

void on_signal(int sig) {
  int expected = 0;
  if (g_signal.compare_exchange_strong(expected, sig)) {
    g_first_ns = now_ns();
    return;
  }
  // Launchers repeat a pre-emption signal (Slurm signals every process and mpirun forwards it):
  // repeats within the window count as the same request; a later one ends the process at once.
  if (now_ns() - g_first_ns.load() < kRepeatWindowNs) return;
  std::signal(sig, SIG_DFL);
  std::raise(sig);
}
}  // namespace

StopSignals::StopSignals() {
  g_signal = 0;
  struct sigaction sa {};
  sa.sa_handler = on_signal;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESTART;
  sigaction(SIGTERM, &sa, &g_old_term);
  sigaction(SIGUSR1, &sa, &g_old_usr1);
}

StopSignals::~StopSignals() {
  sigaction(SIGTERM, &g_old_term, nullptr);
  sigaction(SIGUSR1, &g_old_usr1, nullptr);
}

int StopSignals::received() { return g_signal.load(); }
void StopSignals::raise_for_test(int signal) { g_signal = signal; }
void StopSignals::reset() { g_signal = 0; }

}  // namespace loom::train
