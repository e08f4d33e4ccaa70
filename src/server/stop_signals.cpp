#include "server/stop_signals.h"

#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <unistd.h>

#include <cerrno>

#include "core/error.h"

namespace spear::server {

namespace {

// The pipe's write end, for the handler. Set before the handler is installed, never
// closed.
volatile sig_atomic_t g_write_fd = -1;

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
  SPEAR_CHECK(::pipe2(fds, O_CLOEXEC) == 0, "cannot create the signal pipe");
  ::fcntl(fds[1], F_SETFL, ::fcntl(fds[1], F_GETFL) | O_NONBLOCK);
  read_fd_ = fds[0];
  g_write_fd = fds[1];
  struct sigaction sa{};
  sa.sa_handler = on_stop_signal;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESTART;
  SPEAR_CHECK(::sigaction(SIGINT, &sa, nullptr) == 0 && ::sigaction(SIGTERM, &sa, nullptr) == 0,
              "cannot install the SIGINT/SIGTERM handler");
}

StopSignals& StopSignals::install() {
  // Never destroyed: the handler may run until the process is gone.
  static StopSignals* const s = new StopSignals();
  const sigset_t set = stop_set();
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
  return *s;
}

int StopSignals::wait() {
  // Take the signals in this thread while waiting: one already pending (blocked in
  // every thread of spear's) is delivered here as soon as it is unblocked.
  const sigset_t set = stop_set();
  sigset_t old;
  pthread_sigmask(SIG_UNBLOCK, &set, &old);
  unsigned char b = 0;
  ssize_t n;
  do {
    n = ::read(read_fd_, &b, 1);
  } while (n < 0 && errno == EINTR);
  pthread_sigmask(SIG_SETMASK, &old, nullptr);
  return n == 1 ? b : 0;
}

void StopSignals::wake() {
  const unsigned char zero = 0;
  const ssize_t r = ::write(g_write_fd, &zero, 1);
  (void)r;
}

}  // namespace spear::server
