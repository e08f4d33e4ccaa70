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
// StopSignals gives the signals a handler, so no thread's default action applies, and
// wait() hears of a signal wherever it went:
//   * on a thread that does not block it (a library's), the handler runs there and
//     (async-signal-safe: one write()) puts the signal's number in a pipe;
//   * with every thread blocking it (all of spear's threads do), it stays pending and
//     a signalfd hands it over.
// wait() polls both. No spear thread ever unblocks the signals, so their system calls
// are never interrupted, and no handler runs in a thread that waits (a handler that a
// sanitizer defers while a read() restarts would never run).
namespace spear::server {

class StopSignals {
 public:
  // Blocks SIGINT and SIGTERM in the calling thread, so that the threads it starts
  // afterwards inherit the block, and installs the handler and the signalfd (once per
  // process: later calls block and return the same object). Call it before starting
  // threads. A signal that arrives before wait() is kept, not lost. The handler stays
  // installed until the process exits: a signal after the last wait() is ignored.
  static StopSignals& install();

  // Blocks until a stop signal arrives (or one is already kept) and returns its number,
  // or 0 when woken by wake(). Call it from a thread that blocks the signals.
  int wait();
  // Makes one wait() (now or later) return 0.
  void wake();

 private:
  StopSignals();
  int read_fd_ = -1;    // the handler's pipe
  int signal_fd_ = -1;  // signals pending with every thread blocking them
};

}  // namespace spear::server
