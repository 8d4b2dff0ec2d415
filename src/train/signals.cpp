#include "loom/train/signals.h"

#include <atomic>
#include <csignal>

namespace loom::train {

namespace {
std::atomic<int> g_signal{0};
struct sigaction g_old_term, g_old_usr1;

void on_signal(int sig) {
  int expected = 0;
  if (!g_signal.compare_exchange_strong(expected, sig)) {
    std::signal(sig, SIG_DFL);  // the second one: the default action (end now)
    std::raise(sig);
  }
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
