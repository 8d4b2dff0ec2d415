// The MPI side channel of the desync report (Note: desync report): a duplicate of MPI_COMM_WORLD
// on which the watchdog thread of every process answers its peers' questions. Questions and
// answers are short strings; sends are non-blocking and completed later, so neither serve() nor
// ask() can block on a peer that stopped.
#include <mpi.h>

#include <chrono>
#include <list>
#include <mutex>
#include <thread>

#include "loom/comm/desync.h"
#include "loom/comm/flight_recorder.h"
#include "loom/comm/mpi_communicator.h"
#include "loom/core/error.h"

namespace loom::comm {
namespace {

constexpr int kQuestionTag = 1;
constexpr int kAnswerTag = 2;

class MpiDesyncChannel final : public DesyncChannel {
 public:
  MpiDesyncChannel() { LOOM_CHECK_MPI(MPI_Comm_dup(MPI_COMM_WORLD, &comm_)); }
  ~MpiDesyncChannel() override { close(); }

  void serve() override {
    std::lock_guard<std::mutex> lock(mu_);
    if (closed_) return;
    reap();
    for (int n = 0; n < 64; ++n) {  // bounded: a flood of questions cannot hold the watchdog
      int pending = 0;
      MPI_Status status;
      if (MPI_Iprobe(MPI_ANY_SOURCE, kQuestionTag, comm_, &pending, &status) != MPI_SUCCESS ||
          !pending)
        return;
      std::string key = receive(status);
      send(status.MPI_SOURCE, kAnswerTag, FlightRecorder::instance().progress(key).encode());
    }
  }

  std::vector<std::optional<std::string>> ask(const std::vector<int>& peers, const std::string& key,
                                              double wait_s) override {
    std::vector<std::optional<std::string>> out(peers.size());
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (closed_) return out;
      for (int p : peers) send(p, kQuestionTag, key);
    }
    size_t answered = 0;
    auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(wait_s);
    while (answered < peers.size() && std::chrono::steady_clock::now() < deadline) {
      serve();  // the peers may be asking this rank at the same time
      bool got = false;
      {
        std::lock_guard<std::mutex> lock(mu_);
        if (closed_) return out;
        int pending = 0;
        MPI_Status status;
        if (MPI_Iprobe(MPI_ANY_SOURCE, kAnswerTag, comm_, &pending, &status) == MPI_SUCCESS &&
            pending) {
          got = true;
          std::string answer = receive(status);
          for (size_t i = 0; i < peers.size(); ++i) {
            if (peers[i] == status.MPI_SOURCE && !out[i]) {
              out[i] = std::move(answer);
              ++answered;
              break;
            }
          }
        }
      }
      if (!got) std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    return out;
  }

  void close() override {
    std::lock_guard<std::mutex> lock(mu_);
    if (closed_) return;
    closed_ = true;
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (finalized) return;
    // Answers still on their way (to a slow or ending peer): a bounded wait, then their buffers are
    // kept until exit (MPI may still read them; freeing the request does not stop the send).
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(200);
    while (!sends_.empty() && std::chrono::steady_clock::now() < deadline) {
      reap();
      if (!sends_.empty()) std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    if (!sends_.empty()) {
      static auto* kept = new std::list<Send>();  // never destroyed
      for (auto& s : sends_) MPI_Request_free(&s.request);
      kept->splice(kept->end(), sends_);
    }
    MPI_Comm_free(&comm_);
  }

 private:
  struct Send {
    std::string text;
    MPI_Request request = MPI_REQUEST_NULL;
  };

  std::string receive(const MPI_Status& status) {
    int count = 0;
    MPI_Get_count(&status, MPI_CHAR, &count);
    std::string text(static_cast<size_t>(std::max(count, 0)), '\0');
    MPI_Recv(text.data(), count, MPI_CHAR, status.MPI_SOURCE, status.MPI_TAG, comm_,
             MPI_STATUS_IGNORE);
    return text;
  }

  void send(int peer, int tag, std::string text) {
    sends_.push_back(Send{std::move(text)});
    Send& s = sends_.back();  // std::list: the buffer stays where it is until the send completes
    MPI_Isend(s.text.data(), static_cast<int>(s.text.size()), MPI_CHAR, peer, tag, comm_,
              &s.request);
  }

  void reap() {
    for (auto it = sends_.begin(); it != sends_.end();) {
      int done = 0;
      MPI_Test(&it->request, &done, MPI_STATUS_IGNORE);
      it = done ? sends_.erase(it) : std::next(it);
    }
  }

  std::mutex mu_;
  MPI_Comm comm_ = MPI_COMM_NULL;
  std::list<Send> sends_;
  bool closed_ = false;
};

}  // namespace

std::shared_ptr<DesyncChannel> make_mpi_desync_channel() {
  return std::make_shared<MpiDesyncChannel>();
}

}  // namespace loom::comm
