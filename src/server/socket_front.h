#pragma once
// The server's front door: accepts connections and receives requests on one epoll
// thread, and hands only complete requests to a pool of worker threads. cpp-httplib
// 0.11 gives every connection a thread from the moment it is accepted, so a client
// that trickles its headers holds a thread, and 24 of them starved a 16-thread
// server for 30 s. Here a slow client costs a buffer, not a thread:
//   * per connection: the head within header_timeout of its first byte (or of the
//     accept), the body within body_timeout of the head, else 408 and close; an idle
//     keep-alive connection closes after keep_alive_timeout;
//   * at most max_connections_per_ip open connections per client address (429) and
//     max_connections in all (503), both answered at once and closed;
//   * each request is cut by a RequestFramer (bounded lines, head and body; chunked
//     and compressed bodies counted), a framing error answered here and closed;
//   * pipelined requests wait in the connection's buffer and are served one after
//     the other, in order, on the same connection.
// An error answered here is sent, the write side shut, and what the client still
// sends read and dropped for a short while (so it reads the answer, not a reset).
#include <atomic>
#include <condition_variable>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "server/request_framer.h"

namespace spear::server {

struct FrontOptions {
  FramingLimits framing;
  int workers = 128;                      // requests served at once
  int header_timeout_ms = 10000;
  int body_timeout_ms = 30000;
  int keep_alive_timeout_ms = 5000;
  int write_timeout_ms = 30000;           // a response write that makes no progress this long fails
  int max_connections = 4096;
  int max_connections_per_ip = 256;
  int max_requests_per_connection = 100;
};

class SocketFront {
 public:
  // Serves one complete request (plain framing, see RequestFramer) on a worker
  // thread, writing the response to fd; `close` asks for "Connection: close".
  // Returns whether the connection may carry another request.
  // `request` may be emptied by the callee once read (the body's bytes then live on
  // only in what parsed them: one copy fewer at the request's peak).
  using Serve = std::function<bool(int fd, std::string& request, bool close)>;
  // Told of every answer the front gives itself (framing errors, caps, timeouts).
  using Refused = std::function<void(int status)>;

  // Takes a bound, listening socket; closes it in stop_accepting() or stop().
  SocketFront(int listen_fd, FrontOptions opt, Serve serve, Refused refused);
  ~SocketFront();
  SocketFront(const SocketFront&) = delete;
  SocketFront& operator=(const SocketFront&) = delete;

  void start();
  // Stops accepting (the listening socket is closed), closes idle connections,
  // answers half-received requests 503; requests being served finish, and their
  // connections close after the response.
  void stop_accepting();
  int in_flight() const { return in_flight_.load(); }
  // Joins every thread (a worker finishes the request it serves) and closes all.
  void stop();

  // A write with the front's timeout: false when the peer is gone or stalls.
  static bool write_all(int fd, const char* data, size_t n, int timeout_ms);

 private:
  struct Conn;
  struct Job {
    Conn* conn;
    std::string request;
    bool close;
  };

  void loop();
  void accept_all();
  void on_readable(Conn* c);
  void advance(Conn* c);
  void dispatch(Conn* c);
  void answer(Conn* c, int status, const std::string& code, const std::string& message);
  void close_conn(Conn* c);
  void expire();
  void begin_stop_accepting();
  void wake();
  void worker();

  int listen_fd_, epoll_fd_ = -1, wake_fd_ = -1;
  FrontOptions opt_;
  Serve serve_;
  Refused refused_;
  std::thread loop_thread_;
  std::vector<std::thread> workers_;

  // Loop thread only.
  std::unordered_map<int, std::unique_ptr<Conn>> conns_;
  std::unordered_map<std::string, int> per_ip_;
  bool listening_ = true;
  int64_t listen_paused_until_ms_ = 0;  // out of descriptors: accept again later

  std::atomic<bool> stop_accepting_{false}, quit_{false};
  std::atomic<int> in_flight_{0};

  std::mutex mu_;  // jobs_, returned_, workers_quit_
  std::condition_variable cv_;
  std::deque<Job> jobs_;
  std::vector<std::pair<Conn*, bool>> returned_;  // (connection, keep it open)
  bool workers_quit_ = false;
};

}  // namespace spear::server
