#include "server/connection.h"

#include <dirent.h>
#include <netdb.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>

#include "server/httplib_config.h"

namespace spear::server {

namespace {
thread_local int serving_fd = -1;

int port_of(const sockaddr_storage& a) {
  if (a.ss_family == AF_INET) return ntohs(reinterpret_cast<const sockaddr_in&>(a).sin_port);
  if (a.ss_family == AF_INET6) return ntohs(reinterpret_cast<const sockaddr_in6&>(a).sin6_port);
  return -1;
}

bool endpoint(const sockaddr_storage& a, socklen_t len, std::string* ip, int* port) {
  char host[NI_MAXHOST], serv[NI_MAXSERV];
  if (getnameinfo(reinterpret_cast<const sockaddr*>(&a), len, host, sizeof host, serv, sizeof serv,
                  NI_NUMERICHOST | NI_NUMERICSERV) != 0)
    return false;
  *ip = host;
  *port = std::atoi(serv);
  return true;
}
}  // namespace

ServingSocket::ServingSocket(int fd) : prev_(serving_fd) { serving_fd = fd; }
ServingSocket::~ServingSocket() { serving_fd = prev_; }
int ServingSocket::current() { return serving_fd; }

ConnectionWatch::ConnectionWatch(const httplib::Request& req) {
  if (req.remote_port <= 0 || req.local_port <= 0) return;
  if (serving_fd >= 0) {
    // The front named this thread's socket; check that it is this request's peer.
    sockaddr_storage peer{};
    socklen_t pl = sizeof peer;
    if (getpeername(serving_fd, reinterpret_cast<sockaddr*>(&peer), &pl) == 0 && port_of(peer) == req.remote_port) {
      fd_ = serving_fd;
      return;
    }
  }
  DIR* d = opendir("/proc/self/fd");
  if (!d) return;
  while (dirent* e = readdir(d)) {
    char* end = nullptr;
    long fd = std::strtol(e->d_name, &end, 10);
    if (end == e->d_name || *end != '\0' || fd == dirfd(d)) continue;
    sockaddr_storage peer{}, self{};
    socklen_t pl = sizeof peer, sl = sizeof self;
    if (getpeername(static_cast<int>(fd), reinterpret_cast<sockaddr*>(&peer), &pl) != 0) continue;
    if (getsockname(static_cast<int>(fd), reinterpret_cast<sockaddr*>(&self), &sl) != 0) continue;
    std::string pip, sip;
    int pport = 0, sport = 0;
    if (!endpoint(peer, pl, &pip, &pport) || !endpoint(self, sl, &sip, &sport)) continue;
    if (pport == req.remote_port && sport == req.local_port && pip == req.remote_addr &&
        sip == req.local_addr) {
      fd_ = static_cast<int>(fd);
      break;
    }
  }
  closedir(d);
}

bool ConnectionWatch::peer_closed() const {
  if (fd_ < 0) return false;
  char c;
  ssize_t n = recv(fd_, &c, 1, MSG_PEEK | MSG_DONTWAIT);
  if (n == 0) return true;  // orderly shutdown by the peer
  if (n < 0) return errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR;
  return false;  // data waiting (a pipelined request): still there
}

}  // namespace spear::server
