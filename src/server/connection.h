#pragma once
// Noticing that a client has gone away while its request is still being worked on.
// cpp-httplib (0.11) does not hand handlers their socket. SocketFront's worker
// names it for the thread that serves the request (ServingSocket); without that the
// socket is found by its address pair (the request knows both ends) among this
// process's open descriptors, which costs a getpeername/getsockname and two
// getnameinfo per open descriptor (every slow client's socket included). A peek
// that reads end-of-stream then means the peer closed. This catches a disconnect
// during queueing and prefill, before any byte is written; a failed write catches
// it later too.
#include <string>

namespace httplib {
struct Request;
}

namespace spear::server {

// The socket of the request this thread is serving, while it serves it.
class ServingSocket {
 public:
  explicit ServingSocket(int fd);
  ~ServingSocket();
  ServingSocket(const ServingSocket&) = delete;
  ServingSocket& operator=(const ServingSocket&) = delete;
  static int current();  // -1 when none

 private:
  int prev_;
};

class ConnectionWatch {
 public:
  // Finds the request's socket; watching is a no-op when it cannot be found.
  explicit ConnectionWatch(const httplib::Request& req);
  // True once the peer has closed or reset the connection.
  bool peer_closed() const;
  bool watching() const { return fd_ >= 0; }

 private:
  int fd_ = -1;
};

}  // namespace spear::server
