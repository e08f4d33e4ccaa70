#include "server/stop_signals.h"

#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <sys/signalfd.h>
#include <unistd.h>

#include <cerrno>

#include "core/error.h"

namespace spear::server {

namespace {

// The pipe's write end, for the handler. Set before the handler is installed, never
// closed.
volatile sig_atomic_t g_write_fd = -1;

// Runs only on a thread that does not block the signals: one a library started.
extern "C" void on_stop_signal(int sig) {
  const int saved = errno;
  const unsigned char b = static_cast<unsigned char>(sig);
  // Non-blocking: a full pipe (thousands of unread signals) drops this one.
  const ssize_t r = ::write(g_write_fd, &b, 1);
  (void)r;
  errno = saved;
}

sigset_t stop_set() {
  sigset_t s;
  sigemptyset(&s);
  sigaddset(&s, SIGINT);
  sigaddset(&s, SIGTERM);
  return s;
}

}  // namespace

StopSignals::StopSignals() {
  int fds[2];
  SPEAR_CHECK(::pipe2(fds, O_CLOEXEC | O_NONBLOCK) == 0, "cannot create the signal pipe");
  read_fd_ = fds[0];
  g_write_fd = fds[1];
  const sigset_t set = stop_set();
  signal_fd_ = ::signalfd(-1, &set, SFD_CLOEXEC | SFD_NONBLOCK);
  SPEAR_CHECK(signal_fd_ >= 0, "cannot create the signalfd for SIGINT/SIGTERM");
  struct sigaction sa{};
  sa.sa_handler = on_stop_signal;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESTART;  // the library thread it lands on carries on undisturbed
  SPEAR_CHECK(::sigaction(SIGINT, &sa, nullptr) == 0 && ::sigaction(SIGTERM, &sa, nullptr) == 0,
              "cannot install the SIGINT/SIGTERM handler");
}

StopSignals& StopSignals::install() {
  const sigset_t set = stop_set();
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
  // Never destroyed: the handler may run until the process is gone.
  static StopSignals* const s = new StopSignals();
  return *s;
}

int StopSignals::wait() {
  while (true) {
    pollfd p[2] = {{signal_fd_, POLLIN, 0}, {read_fd_, POLLIN, 0}};
    if (::poll(p, 2, -1) < 0) {
      if (errno == EINTR) continue;
      return 0;
    }
    signalfd_siginfo si;
    if ((p[0].revents & POLLIN) && ::read(signal_fd_, &si, sizeof si) == static_cast<ssize_t>(sizeof si))
      return static_cast<int>(si.ssi_signo);
    unsigned char b = 0;
    if ((p[1].revents & POLLIN) && ::read(read_fd_, &b, 1) == 1) return b;
    // Taken by another waiter (EAGAIN): wait again.
  }
}

void StopSignals::wake() {
  const unsigned char zero = 0;
  const ssize_t r = ::write(g_write_fd, &zero, 1);
  (void)r;
}

}  // namespace spear::server
