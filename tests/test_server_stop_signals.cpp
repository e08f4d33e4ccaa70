// StopSignals (server/stop_signals.h): SIGTERM/SIGINT reach `spear serve`'s drain
// whichever thread the kernel delivers them to. Each case runs in a child process, as
// the handler is the whole process's.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <thread>

#include "server/stop_signals.h"

using spear::server::StopSignals;

namespace {

// Runs fn in a child process and returns its exit code (-1: killed by a signal).
template <typename Fn>
int in_child(Fn fn) {
  pid_t pid = fork();
  if (pid == 0) _exit(fn());
  int status = 0;
  waitpid(pid, &status, 0);
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

// A thread started before the handler is installed, blocking no signal: what OpenBLAS
// starts in its library constructor, before main().
class ForeignThread {
 public:
  ForeignThread() {
    sigset_t none;
    sigemptyset(&none);
    sigset_t old;
    pthread_sigmask(SIG_SETMASK, &none, &old);
    t_ = std::thread([this] {
      std::unique_lock<std::mutex> lk(mu_);
      cv_.wait(lk, [this] { return done_; });
    });
    pthread_sigmask(SIG_SETMASK, &old, nullptr);
  }
  ~ForeignThread() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      done_ = true;
    }
    cv_.notify_all();
    t_.join();
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool done_ = false;
  std::thread t_;
};

}  // namespace

// The main thread blocks the signals and is not waiting: the kernel must deliver the
// SIGTERM to the foreign thread. With the signals only blocked and taken by sigwait()
// (spear serve before), its default action killed the process.
TEST(StopSignals, ASignalOnAThreadThatBlocksNothingReachesWait) {
  EXPECT_EQ(in_child([] {
              ForeignThread foreign;
              StopSignals& s = StopSignals::install();
              kill(getpid(), SIGTERM);  // process-directed, as `kill PID` and systemd send it
              kill(getpid(), SIGINT);
              const int a = s.wait(), b = s.wait();  // in either order (both may be pending at once)
              return a + b == SIGTERM + SIGINT && (a == SIGTERM || b == SIGTERM) ? 0 : 1;
            }),
            0);
}

// A signal sent before wait(), with every thread blocking it, is kept (the signalfd);
// wake() ends a wait without a signal; a signal after the last wait() is ignored (the
// process goes on and exits normally).
TEST(StopSignals, KeptUntilWaitWakeAndLateSignals) {
  EXPECT_EQ(in_child([] {
              StopSignals& s = StopSignals::install();
              kill(getpid(), SIGTERM);  // pending: every thread blocks it
              if (s.wait() != SIGTERM) return 1;
              std::atomic<int> got{-1};
              std::thread waiter([&] { got = s.wait(); });
              s.wake();
              waiter.join();
              if (got.load() != 0) return 2;
              sigset_t set;
              sigemptyset(&set);
              sigaddset(&set, SIGTERM);
              pthread_sigmask(SIG_UNBLOCK, &set, nullptr);
              kill(getpid(), SIGTERM);  // handled here, not fatal
              return 0;
            }),
            0);
}

// A signal sent while wait() runs, with every thread blocking it, wakes it.
TEST(StopSignals, ASignalEveryThreadBlocksReachesWait) {
  EXPECT_EQ(in_child([] {
              StopSignals& s = StopSignals::install();
              std::thread killer([] {
                // Most likely while wait() polls; sent before, it is kept and the result is the same.
                std::this_thread::sleep_for(std::chrono::milliseconds(20));
                kill(getpid(), SIGINT);
              });
              const int sig = s.wait();
              killer.join();
              return sig == SIGINT ? 0 : 1;
            }),
            0);
}
