#include "server/http_server.h"

#include <netdb.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>

#include <algorithm>
#include <charconv>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <thread>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "engine/engine_loop.h"
#include "server/api_error.h"
#include "server/connection.h"
#include "server/httplib_config.h"
#include "server/json_fields.h"
#include "server/protocol.h"
#include "server/socket_front.h"
#include "server/tokenize_api.h"
#include "tokenizer/tokenizer.h"

namespace spear::server {

using nlohmann::json;

namespace {

// httplib::Server with access to its listening socket (bound by the library, then
// served by SocketFront) and to its request processing (routing, handlers, response
// writing) for one request that SocketFront has received in full.
class Listener : public httplib::Server {
 public:
  int socket_fd() const { return static_cast<int>(svr_sock_.load()); }
  // SocketFront closed the socket; the library must not use the number again.
  void forget_socket() { svr_sock_ = INVALID_SOCKET; }
  bool serve(httplib::Stream& strm, bool close_connection, bool& connection_closed) {
    return process_request(strm, close_connection, connection_closed, nullptr);
  }
};

void endpoint_of(int fd, bool peer, std::string& ip, int& port) {
  sockaddr_storage a{};
  socklen_t len = sizeof a;
  int r = peer ? getpeername(fd, reinterpret_cast<sockaddr*>(&a), &len)
               : getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
  char host[NI_MAXHOST], serv[NI_MAXSERV];
  if (r != 0 || getnameinfo(reinterpret_cast<sockaddr*>(&a), len, host, sizeof host, serv, sizeof serv,
                            NI_NUMERICHOST | NI_NUMERICSERV) != 0)
    return;
  ip = host;
  port = std::atoi(serv);
}

// One framed request (in memory) in, the response out to the socket. Once cpp-httplib
// has read the last byte (the end of the body, copied into Request::body), the buffer
// is freed: a request near the body limit is then held twice at its peak (the body and
// its parsed JSON), not three times.
class FramedStream : public httplib::Stream {
 public:
  FramedStream(int fd, std::string& request, int write_timeout_ms)
      : fd_(fd), req_(request), write_timeout_ms_(write_timeout_ms) {}
  bool is_readable() const override { return pos_ < req_.size(); }
  bool is_writable() const override {
    if (failed_) return false;
    pollfd p{fd_, POLLOUT, 0};
    return ::poll(&p, 1, write_timeout_ms_) > 0 && !(p.revents & (POLLERR | POLLHUP));
  }
  ssize_t read(char* ptr, size_t size) override {
    const size_t n = std::min(size, req_.size() - pos_);
    std::memcpy(ptr, req_.data() + pos_, n);
    pos_ += n;
    if (pos_ == req_.size() && pos_ > (64u << 10)) {
      std::string().swap(req_);
      pos_ = 0;
    }
    return static_cast<ssize_t>(n);
  }
  ssize_t write(const char* ptr, size_t size) override {
    if (failed_ || !SocketFront::write_all(fd_, ptr, size, write_timeout_ms_)) {
      failed_ = true;
      return -1;
    }
    return static_cast<ssize_t>(size);
  }
  void get_remote_ip_and_port(std::string& ip, int& port) const override { endpoint_of(fd_, true, ip, port); }
  void get_local_ip_and_port(std::string& ip, int& port) const override { endpoint_of(fd_, false, ip, port); }
  socket_t socket() const override { return fd_; }
  bool failed() const { return failed_; }

 private:
  int fd_;
  std::string& req_;
  size_t pos_ = 0;
  int write_timeout_ms_;
  bool failed_ = false;
};

// The longest string a valid request holds: a prompt (or the message contents
// together) of at most limits.max_prompt_bytes, or a shorter field (user: 4 KiB).
size_t max_string_bytes(const ProtocolLimits& lim) {
  return lim.max_prompt_bytes > 0 ? std::max<size_t>(static_cast<size_t>(lim.max_prompt_bytes), 64u << 10) : 0;
}

// The body of a POST: JSON only (a web page cannot send application/json across
// origins without a CORS preflight, which this server never grants).
// max_json_bytes: the most memory the parsed body may take (parse_body); the server
// allows its body limit plus 64 KiB of bookkeeping, so one string as large as the
// body limit still parses.
// max_string_bytes: the longest string literal any field takes (0 = no bound).
json request_json(const httplib::Request& req, size_t max_json_bytes, size_t max_string_bytes = 0) {
  const std::string ct = req.get_header_value("Content-Type");
  std::string media = ct.substr(0, ct.find(';'));
  media.erase(0, media.find_first_not_of(" \t"));
  media.erase(media.find_last_not_of(" \t") + 1);
  std::transform(media.begin(), media.end(), media.begin(), [](unsigned char c) { return std::tolower(c); });
  if (media != "application/json")
    throw ApiError(415,
                   ct.empty() ? "the request has no Content-Type; send 'Content-Type: application/json'"
                              : "Content-Type '" + ct + "' is not accepted; send 'Content-Type: application/json'",
                   "invalid_request_error", "unsupported_media_type");
  return parse_body(req.body, 64, max_json_bytes, max_string_bytes);
}

void send_json(httplib::Response& res, int status, const json& j) {
  res.status = status;
  res.set_content(j.dump(-1, ' ', false, json::error_handler_t::replace), "application/json");
}

void send_error(httplib::Response& res, const ApiError& e) { send_json(res, e.status(), e.to_json()); }

bool constant_time_equal(const std::string& a, const std::string& b) {
  if (a.size() != b.size()) return false;  // the length is no secret worth hiding
  unsigned char diff = 0;
  for (size_t i = 0; i < a.size(); ++i) diff |= static_cast<unsigned char>(a[i] ^ b[i]);
  return diff == 0;
}

}  // namespace

class HttpServer::Impl {
 public:
  Listener svr;
};

HttpServer::HttpServer(ServerOptions opt) : impl_(std::make_unique<Impl>()), opt_(std::move(opt)) {
  SPEAR_CHECK(opt_.http_threads >= 1 && opt_.http_threads <= 4096, "--http-threads must be in [1, 4096]");
  SPEAR_CHECK(opt_.port >= 0 && opt_.port <= 65535, "--port must be in [0, 65535]");
  SPEAR_CHECK(opt_.header_timeout_s >= 1 && opt_.body_timeout_s >= 1 && opt_.keep_alive_timeout_s >= 1 &&
                  opt_.write_timeout_s >= 1,
              "HTTP timeouts must be at least 1 s");
  SPEAR_CHECK(opt_.max_connections >= 1 && opt_.max_connections_per_ip >= 1,
              "connection caps must be at least 1");
}

HttpServer::~HttpServer() { stop(); }

void HttpServer::set_ready(ServeState state) {
  state_ = std::make_unique<ServeState>(std::move(state));
  state_->retry_after_s = opt_.retry_after_s;
  state_->limits.allow_unknown_fields = opt_.allow_unknown_fields;
  metrics_.set_model_name(state_->model_name);
  if (state_->limits.max_prompt_bytes == 0 && state_->tok)
    state_->limits.max_prompt_bytes = prompt_byte_bound(*state_->tok, state_->limits.max_model_len);
  ready_.store(true);
}

void HttpServer::start() {
  // A client that vanishes mid-write must be an error code, never a signal.
  signal(SIGPIPE, SIG_IGN);
  Listener& svr = impl_->svr;
  svr.set_payload_max_length(opt_.max_body_bytes);  // SocketFront enforces it first
  svr.set_write_timeout(opt_.write_timeout_s, 0);
  // cpp-httplib appends a body to Request::body 4 KiB at a time, so the string doubles
  // its way up, freeing each smaller buffer. Once glibc's mmap threshold has been
  // raised (it follows the largest block freed, e.g. a framer buffer or an earlier
  // request's body), those steps are carved from the malloc arena and stay resident
  // after the free: ~1x the body more at the peak (8 MB on the 8 MiB limit,
  // docs/BENCHMARKS.md). The pre-routing handler runs after the head is parsed and
  // before the body is read (Server::routing), so the body's final size is reserved
  // here. Every request it sees comes from the framer with an exact Content-Length
  // within the limit. The handler is handed a const Request; the object is the
  // library's own non-const local, so writing its body's capacity is well defined.
  svr.set_pre_routing_handler([this](const httplib::Request& req, httplib::Response&) {
    const std::string cl = req.get_header_value("Content-Length");
    uint64_t n = 0;
    const auto [end, ec] = std::from_chars(cl.data(), cl.data() + cl.size(), n);
    if (ec == std::errc() && end == cl.data() + cl.size() && n > 0 && n <= opt_.max_body_bytes)
      const_cast<httplib::Request&>(req).body.reserve(static_cast<size_t>(n));
    return httplib::Server::HandlerResponse::Unhandled;
  });

  auto authorized = [this](const httplib::Request& req, httplib::Response& res) {
    if (opt_.api_key.empty()) return true;
    std::string h = req.get_header_value("Authorization");
    const std::string prefix = "Bearer ";
    if (h.size() > prefix.size() && h.compare(0, prefix.size(), prefix) == 0 &&
        constant_time_equal(h.substr(prefix.size()), opt_.api_key))
      return true;
    send_error(res, ApiError(401, h.empty() ? "missing API key (send 'Authorization: Bearer KEY')"
                                            : "incorrect API key",
                             "invalid_request_error", "invalid_api_key"));
    return false;
  };
  auto require_ready = [this]() {
    if (!ready_.load())
      throw ApiError(503, "the model is still loading", "server_error", "model_loading");
    if (stopping_.load()) throw ApiError(503, "the server is shutting down", "server_error", "unavailable");
  };
  // Wraps a handler: auth, readiness, every exception to a JSON error, metrics.
  auto guarded = [this, authorized, require_ready](const char* endpoint, bool needs_model, auto fn) {
    return [this, authorized, require_ready, endpoint, needs_model, fn](const httplib::Request& req,
                                                                       httplib::Response& res) {
      try {
        if (!authorized(req, res)) {
          metrics_.count_response(endpoint, res.status);
          return;
        }
        if (needs_model) require_ready();
        fn(req, res);
      } catch (const ApiError& e) {
        send_error(res, e);
        if (e.status() == 429) res.set_header("Retry-After", std::to_string(opt_.retry_after_s));
      } catch (const Error& e) {
        send_error(res, ApiError(400, e.what()));
      } catch (const std::bad_alloc&) {
        send_error(res, ApiError(503, "out of memory", "server_error", "out_of_memory"));
      } catch (const std::exception& e) {
        send_error(res, ApiError(500, std::string("internal error: ") + e.what(), "server_error", "internal_error"));
      }
      metrics_.count_response(endpoint, res.status < 0 ? 200 : res.status);
    };
  };

  svr.Get("/health", [this](const httplib::Request&, httplib::Response& res) {
    if (ready_.load() && !stopping_.load()) send_json(res, 200, {{"status", "ok"}});
    else send_json(res, 503, {{"status", stopping_.load() ? "stopping" : "loading"}});
  });
  svr.Get("/metrics", [this](const httplib::Request&, httplib::Response& res) {
    const bool ok = ready_.load();
    res.set_content(metrics_.render(ok ? state_->engine : nullptr, ok),
                    "text/plain; version=0.0.4; charset=utf-8");
  });
  svr.Get("/v1/models", guarded("/v1/models", true, [this](const httplib::Request&, httplib::Response& res) {
    const ServeState& st = *state_;
    send_json(res, 200,
              {{"object", "list"},
               {"data", json::array({{{"id", st.model_name},
                                      {"object", "model"},
                                      {"created", 0},
                                      {"owned_by", "spear"},
                                      {"max_model_len", st.limits.max_model_len},
                                      {"vocab_size", st.limits.vocab_size}}})}});
  }));
  auto check_model_name = [this](const std::string& model) {
    if (!model.empty() && model != state_->model_name)
      throw ApiError(404, "the model '" + model + "' does not exist; this server serves '" +
                              state_->model_name + "'",
                     "invalid_request_error", "model_not_found", "model");
  };
  auto check_model = [check_model_name](const GenSpec& g) { check_model_name(g.model); };
  // vLLM's tokenizer endpoints (no /v1 prefix, as in vLLM); authenticated like /v1/*.
  svr.Post("/tokenize", guarded("/tokenize", true, [this, check_model_name](const httplib::Request& req, httplib::Response& res) {
    const ServeState& st = *state_;
    std::string model;
    json out = tokenize_response(request_json(req, opt_.max_body_bytes + (64u << 10), max_string_bytes(st.limits)), *st.tok, st.tmpl, st.limits, &model);
    check_model_name(model);
    send_json(res, 200, out);
  }));
  svr.Post("/detokenize", guarded("/detokenize", true, [this, check_model_name](const httplib::Request& req, httplib::Response& res) {
    const ServeState& st = *state_;
    std::string model;
    json out = detokenize_response(request_json(req, opt_.max_body_bytes + (64u << 10), max_string_bytes(st.limits)), *st.tok, st.limits, &model);
    check_model_name(model);
    send_json(res, 200, out);
  }));
  svr.Get("/version", [](const httplib::Request&, httplib::Response& res) {
    send_json(res, 200, {{"version", SPEAR_VERSION}});
  });
  svr.Post("/v1/completions", guarded("/v1/completions", true, [this, check_model](const httplib::Request& req, httplib::Response& res) {
    const ServeState& st = *state_;
    GenSpec g = parse_completion_request(request_json(req, opt_.max_body_bytes + (64u << 10), max_string_bytes(st.limits)), *st.tok, st.limits, st.defaults);
    check_model(g);
    run_generation(st, std::move(g), req, res, cancel_);
  }));
  svr.Post("/v1/chat/completions", guarded("/v1/chat/completions", true, [this, check_model](const httplib::Request& req, httplib::Response& res) {
    const ServeState& st = *state_;
    GenSpec g = parse_chat_request(request_json(req, opt_.max_body_bytes + (64u << 10), max_string_bytes(st.limits)), *st.tok, st.tmpl, st.limits, st.defaults);
    check_model(g);
    run_generation(st, std::move(g), req, res, cancel_);
  }));
  // The right path with the wrong method: 405, not 404.
  for (const char* p : {"/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"})
    svr.Get(p, [p](const httplib::Request&, httplib::Response& res) {
      send_error(res, ApiError(405, std::string("use POST for ") + p, "invalid_request_error", "method_not_allowed"));
    });
  for (const char* p : {"/v1/models", "/health", "/metrics", "/version"})
    svr.Post(p, [p](const httplib::Request&, httplib::Response& res) {
      send_error(res, ApiError(405, std::string("use GET for ") + p, "invalid_request_error", "method_not_allowed"));
    });

  // Whatever httplib itself rejects (unknown path, body too large, malformed
  // request) still gets an OpenAI-style body.
  svr.set_error_handler([](const httplib::Request& req, httplib::Response& res) {
    if (!res.body.empty()) return;
    std::string msg, code;
    switch (res.status) {
      case 404: msg = "no route for " + req.method + " " + req.path; code = "not_found"; break;
      case 413: msg = "the request body is too large"; code = "payload_too_large"; break;
      case 414: msg = "the request URI is too long"; code = "uri_too_long"; break;
      case 405: msg = "method not allowed"; code = "method_not_allowed"; break;
      default: msg = "bad request"; code = "bad_request"; break;
    }
    send_json(res, res.status, error_json(msg, "invalid_request_error", code));
  });
  svr.set_exception_handler([](const httplib::Request&, httplib::Response& res, std::exception_ptr) {
    send_json(res, 500, error_json("internal error", "server_error", "internal_error"));
  });

  if (opt_.port == 0) {
    port_ = svr.bind_to_any_port(opt_.host);
    SPEAR_CHECK(port_ > 0, "cannot bind " + opt_.host + " to an ephemeral port");
  } else {
    SPEAR_CHECK(svr.bind_to_port(opt_.host, opt_.port),
                "cannot bind " + opt_.host + ":" + std::to_string(opt_.port) +
                    " (in use, or not an address of this machine?)");
    port_ = opt_.port;
  }
  // The library listens with a backlog of 5; hundreds of clients connecting at once
  // would see dropped SYNs and second-long retries. listen() again raises it.
  if (svr.socket_fd() >= 0) ::listen(svr.socket_fd(), opt_.listen_backlog);

  FrontOptions fo;
  fo.framing.max_body_bytes = opt_.max_body_bytes;
  fo.workers = opt_.http_threads;
  fo.header_timeout_ms = opt_.header_timeout_s * 1000;
  fo.body_timeout_ms = opt_.body_timeout_s * 1000;
  fo.keep_alive_timeout_ms = opt_.keep_alive_timeout_s * 1000;
  fo.write_timeout_ms = opt_.write_timeout_s * 1000;
  fo.max_connections = opt_.max_connections;
  fo.max_connections_per_ip = opt_.max_connections_per_ip;
  const int write_ms = fo.write_timeout_ms;
  front_ = std::make_unique<SocketFront>(
      svr.socket_fd(), fo,
      [this, write_ms](int fd, std::string& request, bool close) {
        FramedStream strm(fd, request, write_ms);
        ServingSocket named(fd);  // ConnectionWatch finds the socket without a scan of every descriptor
        bool closed = false;
        const bool ok = impl_->svr.serve(strm, close || stopping_.load(), closed);
        return ok && !closed && !strm.failed();
      },
      [this](int status) { metrics_.count_response("(connection)", status); });
  front_->start();
}

void HttpServer::drain(double timeout_s) {
  using clk = std::chrono::steady_clock;
  stopping_.store(true);
  if (!front_) return;
  front_->stop_accepting();
  const auto until = clk::now() + std::chrono::duration<double>(std::max(0.0, timeout_s));
  while (front_->in_flight() > 0 && clk::now() < until) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  cancel_.store(true);  // what is left ends now, each with a final event or a 503
  const auto hard = clk::now() + std::chrono::seconds(5);
  while (front_->in_flight() > 0 && clk::now() < hard) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  front_->stop();
  front_.reset();
  impl_->svr.forget_socket();
}

void HttpServer::stop() { drain(0); }

}  // namespace spear::server
