#pragma once
// SIGTERM and SIGINT for `spear serve`'s graceful drain, whichever thread the kernel
// delivers them to.
//
// A signal sent to a process goes to one of its threads that does not block it. A
// signal mask is per thread, but what a signal does (its disposition) is per process.
// `spear serve` used to block SIGINT/SIGTERM in the main thread before it started any
// thread and take them with sigwait(), leaving their disposition at the default
// (terminate). Threads that a shared library starts before main() are out of reach of
// that mask: OpenBLAS (openblas-pthread) starts its worker threads in its constructor
// with no signal blocked. Whenever the main thread was not inside sigwait() (loading the
// model, or the moment between printing "ready" and calling sigwait), the kernel gave
// the SIGTERM to such a thread, and the default action ended the process: killed by
// SIGTERM, no drain, no final event (about 1 run in 10 of the serve tests under load).
//
// StopSignals gives the signals a handler, so no thread's default action applies: the
// handler (async-signal-safe: one write()) puts the signal's number in a pipe, and
// wait() reads it, wherever the signal landed.
namespace spear::server {

class StopSignals {
 public:
  // Installs the handler for SIGINT and SIGTERM (once per process: later calls return
  // the same object) and blocks both signals in the calling thread, so that the threads
  // it starts afterwards inherit the block (their system calls are not interrupted).
  // A signal that arrives before wait() is kept, not lost. The handler stays installed
  // until the process exits: a signal after the last wait() is ignored.
  static StopSignals& install();

  // Blocks until a stop signal arrives (or is already pending) and returns its number,
  // or 0 when woken by wake(). The calling thread takes the signals while it waits.
  int wait();
  // Makes one wait() (now or later) return 0.
  void wake();

 private:
  StopSignals();
  int read_fd_ = -1;
};

}  // namespace spear::server
