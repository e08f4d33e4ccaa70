#include "server/socket_front.h"

#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <fcntl.h>

#include <cerrno>
#include <chrono>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "server/api_error.h"

namespace spear::server {

namespace {

int64_t now_ms() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

constexpr int kLingerMs = 2000;  // reading and dropping after an answer given here

const char* reason(int status) {
  switch (status) {
    case 400: return "Bad Request";
    case 408: return "Request Timeout";
    case 413: return "Payload Too Large";
    case 414: return "URI Too Long";
    case 415: return "Unsupported Media Type";
    case 417: return "Expectation Failed";
    case 429: return "Too Many Requests";
    case 431: return "Request Header Fields Too Large";
    case 501: return "Not Implemented";
    case 503: return "Service Unavailable";
    case 505: return "HTTP Version Not Supported";
    default: return "Error";
  }
}

}  // namespace

struct SocketFront::Conn {
  enum class Mode { Idle, Receiving, Serving, Lingering };
  Conn(int f, std::string a, const FramingLimits& lim) : fd(f), ip(std::move(a)), framer(lim) {}
  int fd;
  std::string ip;  // empty: not counted per address
  std::string in;  // received, not yet framed (a pipelined next request)
  RequestFramer framer;
  Mode mode = Mode::Idle;
  int64_t deadline_ms = 0;
  bool body_clock = false;  // the body deadline is running
  int served = 0;
};

SocketFront::SocketFront(int listen_fd, FrontOptions opt, Serve serve, Refused refused)
    : listen_fd_(listen_fd), opt_(opt), serve_(std::move(serve)), refused_(std::move(refused)) {
  SPEAR_CHECK(opt_.workers >= 1, "the server needs at least one worker thread");
}

SocketFront::~SocketFront() { stop(); }

void SocketFront::start() {
  epoll_fd_ = epoll_create1(EPOLL_CLOEXEC);
  wake_fd_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  SPEAR_CHECK(epoll_fd_ >= 0 && wake_fd_ >= 0, "cannot create the server's event loop");
  fcntl(listen_fd_, F_SETFL, fcntl(listen_fd_, F_GETFL) | O_NONBLOCK);
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.fd = listen_fd_;
  epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, listen_fd_, &ev);
  ev.data.fd = wake_fd_;
  epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, wake_fd_, &ev);
  for (int i = 0; i < opt_.workers; ++i) workers_.emplace_back([this] { worker(); });
  loop_thread_ = std::thread([this] { loop(); });
}

void SocketFront::wake() {
  uint64_t one = 1;
  ssize_t r = ::write(wake_fd_, &one, sizeof one);
  (void)r;
}

void SocketFront::stop_accepting() {
  stop_accepting_.store(true);
  if (wake_fd_ >= 0) wake();
}

void SocketFront::stop() {
  stop_accepting_.store(true);
  quit_.store(true);
  if (loop_thread_.joinable()) {
    wake();
    loop_thread_.join();
  }
  // A worker still writing to a client that does not read would wait out the write
  // timeout; cut such connections so that the join below is prompt.
  for (auto& [fd, c] : conns_)
    if (c->mode == Conn::Mode::Serving) ::shutdown(fd, SHUT_RDWR);
  {
    std::lock_guard<std::mutex> lk(mu_);
    workers_quit_ = true;
  }
  cv_.notify_all();
  for (auto& t : workers_) t.join();
  workers_.clear();
  for (auto& [fd, c] : conns_) ::close(fd);
  returned_.clear();  // those connections were in conns_ too
  conns_.clear();
  per_ip_.clear();
  if (listening_ && listen_fd_ >= 0) ::close(listen_fd_);
  listening_ = false;
  if (epoll_fd_ >= 0) ::close(epoll_fd_);
  if (wake_fd_ >= 0) ::close(wake_fd_);
  epoll_fd_ = wake_fd_ = -1;
}

bool SocketFront::write_all(int fd, const char* data, size_t n, int timeout_ms) {
  while (n > 0) {
    ssize_t w = ::send(fd, data, n, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (w > 0) {
      data += w;
      n -= static_cast<size_t>(w);
      continue;
    }
    if (w < 0 && errno == EINTR) continue;
    if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      pollfd p{fd, POLLOUT, 0};
      int r = ::poll(&p, 1, timeout_ms);
      if (r < 0 && errno == EINTR) continue;
      if (r <= 0 || (p.revents & (POLLERR | POLLHUP))) return false;
      continue;
    }
    return false;
  }
  return true;
}

void SocketFront::worker() {
  while (true) {
    Job job;
    {
      std::unique_lock<std::mutex> lk(mu_);
      cv_.wait(lk, [&] { return workers_quit_ || !jobs_.empty(); });
      if (jobs_.empty()) return;  // quitting, nothing left
      job = std::move(jobs_.front());
      jobs_.pop_front();
    }
    bool keep = false;
    try {
      keep = serve_(job.conn->fd, job.request, job.close);
    } catch (...) {
      keep = false;
    }
    {
      std::lock_guard<std::mutex> lk(mu_);
      returned_.emplace_back(job.conn, keep && !job.close);
    }
    in_flight_.fetch_sub(1);
    wake();
  }
}

void SocketFront::loop() {
  std::vector<epoll_event> evs(256);
  while (!quit_.load()) {
    // Sleep until the nearest deadline (at most 100 ms: new deadlines appear).
    int64_t now = now_ms(), next = now + 100;
    for (auto& [fd, c] : conns_)
      if (c->mode != Conn::Mode::Serving) next = std::min(next, c->deadline_ms);
    if (listen_paused_until_ms_ > 0) next = std::min(next, listen_paused_until_ms_);
    const int n = epoll_wait(epoll_fd_, evs.data(), static_cast<int>(evs.size()),
                             static_cast<int>(std::max<int64_t>(0, next - now)));
    if (quit_.load()) break;
    if (stop_accepting_.load() && listening_) begin_stop_accepting();
    for (int i = 0; i < n; ++i) {
      const int fd = evs[i].data.fd;
      if (fd == wake_fd_) {
        uint64_t v;
        while (::read(wake_fd_, &v, sizeof v) > 0) {
        }
        std::vector<std::pair<Conn*, bool>> back;
        {
          std::lock_guard<std::mutex> lk(mu_);
          back.swap(returned_);
        }
        for (auto [c, keep] : back) {
          if (!keep || stop_accepting_.load()) {
            close_conn(c);
            continue;
          }
          c->mode = Conn::Mode::Idle;
          c->deadline_ms = now_ms() + opt_.keep_alive_timeout_ms;
          epoll_event ev{};
          ev.events = EPOLLIN;
          ev.data.fd = c->fd;
          epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, c->fd, &ev);
          if (!c->in.empty()) advance(c);  // a pipelined request already here
        }
      } else if (fd == listen_fd_ && listening_) {
        accept_all();
      } else {
        auto it = conns_.find(fd);
        if (it != conns_.end() && it->second->mode != Conn::Mode::Serving) on_readable(it->second.get());
      }
    }
    expire();
  }
}

void SocketFront::accept_all() {
  while (true) {
    sockaddr_storage addr{};
    socklen_t len = sizeof addr;
    int fd = ::accept4(listen_fd_, reinterpret_cast<sockaddr*>(&addr), &len, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) {
      if (errno == EINTR || errno == ECONNABORTED) continue;
      if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
        // Out of descriptors: stop polling the listener for a moment rather than spin.
        epoll_ctl(epoll_fd_, EPOLL_CTL_DEL, listen_fd_, nullptr);
        listen_paused_until_ms_ = now_ms() + 50;
      }
      return;
    }
    char host[NI_MAXHOST] = "";
    getnameinfo(reinterpret_cast<sockaddr*>(&addr), len, host, sizeof host, nullptr, 0, NI_NUMERICHOST);
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);  // SSE tokens are small writes
    auto c = std::make_unique<Conn>(fd, host, opt_.framing);
    Conn* cp = c.get();
    conns_[fd] = std::move(c);
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.fd = fd;
    epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, fd, &ev);
    cp->mode = Conn::Mode::Receiving;  // the head deadline runs from the accept
    cp->deadline_ms = now_ms() + opt_.header_timeout_ms;
    if (static_cast<int>(conns_.size()) > opt_.max_connections) {
      cp->ip.clear();
      answer(cp, 503, "too_many_connections",
             "the server has " + std::to_string(opt_.max_connections) + " connections open; retry later");
    } else if (per_ip_[cp->ip] >= opt_.max_connections_per_ip) {
      cp->ip.clear();
      answer(cp, 429, "too_many_connections",
             "this client already has " + std::to_string(opt_.max_connections_per_ip) +
                 " connections open; reuse or close one");
    } else {
      per_ip_[cp->ip]++;
    }
  }
}

void SocketFront::on_readable(Conn* c) {
  char buf[65536];
  while (true) {
    ssize_t n = ::recv(c->fd, buf, sizeof buf, 0);
    if (n > 0) {
      if (c->mode == Conn::Mode::Lingering) continue;  // dropped
      if (c->mode == Conn::Mode::Idle) {
        c->mode = Conn::Mode::Receiving;
        c->deadline_ms = now_ms() + opt_.header_timeout_ms;
      }
      c->in.append(buf, static_cast<size_t>(n));
      advance(c);  // never closes c
      if (c->mode == Conn::Mode::Serving) return;  // the rest stays in the socket for later
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
    close_conn(c);  // end of stream or an error: a partial request is dropped
    return;
  }
}

void SocketFront::advance(Conn* c) {
  if (c->mode == Conn::Mode::Idle) {
    c->mode = Conn::Mode::Receiving;
    c->deadline_ms = now_ms() + opt_.header_timeout_ms;
  }
  RequestFramer::State s = c->framer.feed(c->in);
  if (s == RequestFramer::State::Error) {
    answer(c, c->framer.status(), c->framer.code(), c->framer.message());
    return;
  }
  if (c->framer.head_done() && !c->body_clock) {
    c->body_clock = true;
    c->deadline_ms = now_ms() + opt_.body_timeout_ms;
  }
  if (c->framer.take_continue()) {
    static const char k100[] = "HTTP/1.1 100 Continue\r\n\r\n";
    ssize_t w = ::send(c->fd, k100, sizeof k100 - 1, MSG_NOSIGNAL | MSG_DONTWAIT);
    (void)w;
  }
  if (s == RequestFramer::State::Complete) dispatch(c);
}

void SocketFront::dispatch(Conn* c) {
  epoll_ctl(epoll_fd_, EPOLL_CTL_DEL, c->fd, nullptr);
  c->mode = Conn::Mode::Serving;
  c->body_clock = false;
  c->served++;
  Job job{c, c->framer.take_request(), stop_accepting_.load() || c->served >= opt_.max_requests_per_connection};
  c->framer.reset();
  in_flight_.fetch_add(1);
  {
    std::lock_guard<std::mutex> lk(mu_);
    jobs_.push_back(std::move(job));
  }
  cv_.notify_one();
}

void SocketFront::answer(Conn* c, int status, const std::string& code, const std::string& message) {
  const std::string type = status == 429 ? "rate_limit_error" : status >= 500 ? "server_error" : "invalid_request_error";
  const std::string body = error_json(message, type, code).dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  std::string r = "HTTP/1.1 " + std::to_string(status) + " " + reason(status) +
                  "\r\nContent-Type: application/json\r\nContent-Length: " + std::to_string(body.size()) +
                  "\r\nConnection: close\r\n";
  if (status == 429 || status == 503) r += "Retry-After: 1\r\n";
  r += "\r\n" + body;
  ssize_t w = ::send(c->fd, r.data(), r.size(), MSG_NOSIGNAL | MSG_DONTWAIT);  // small: fits the buffer
  (void)w;
  ::shutdown(c->fd, SHUT_WR);
  c->mode = Conn::Mode::Lingering;
  c->deadline_ms = now_ms() + kLingerMs;
  c->in.clear();
  c->framer.reset();
  if (refused_) refused_(status);
}

void SocketFront::close_conn(Conn* c) {
  const int fd = c->fd;
  epoll_ctl(epoll_fd_, EPOLL_CTL_DEL, fd, nullptr);
  ::close(fd);
  if (!c->ip.empty()) {
    auto it = per_ip_.find(c->ip);
    if (it != per_ip_.end() && --it->second <= 0) per_ip_.erase(it);
  }
  conns_.erase(fd);
}

void SocketFront::expire() {
  const int64_t now = now_ms();
  if (listen_paused_until_ms_ > 0 && now >= listen_paused_until_ms_) {
    listen_paused_until_ms_ = 0;
    if (listening_) {
      epoll_event ev{};
      ev.events = EPOLLIN;
      ev.data.fd = listen_fd_;
      epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, listen_fd_, &ev);
    }
  }
  std::vector<Conn*> due;
  for (auto& [fd, c] : conns_)
    if (c->mode != Conn::Mode::Serving && now >= c->deadline_ms) due.push_back(c.get());
  for (Conn* c : due) {
    if (c->mode == Conn::Mode::Receiving && (c->framer.started() || !c->in.empty())) {
      answer(c, 408, "request_timeout",
             c->body_clock ? "the request body did not arrive within " + std::to_string(opt_.body_timeout_ms / 1000) + " s"
                           : "the request head did not arrive within " + std::to_string(opt_.header_timeout_ms / 1000) + " s");
    } else {
      close_conn(c);  // idle (or done lingering)
    }
  }
}

void SocketFront::begin_stop_accepting() {
  listening_ = false;
  epoll_ctl(epoll_fd_, EPOLL_CTL_DEL, listen_fd_, nullptr);
  ::close(listen_fd_);
  std::vector<Conn*> idle, partial;
  for (auto& [fd, c] : conns_) {
    if (c->mode == Conn::Mode::Idle) idle.push_back(c.get());
    else if (c->mode == Conn::Mode::Receiving) partial.push_back(c.get());
  }
  for (Conn* c : idle) close_conn(c);
  for (Conn* c : partial) answer(c, 503, "unavailable", "the server is shutting down");
}

}  // namespace spear::server
