#pragma once
// The OpenAI-compatible HTTP front end (cpp-httplib):
//   POST /v1/completions, POST /v1/chat/completions   (JSON or SSE streaming)
//   GET  /v1/models, GET /health (503 while loading), GET /metrics (Prometheus)
// It listens before the model is loaded, so that /health can say 503 "loading";
// set_ready() hands it the loaded model. Every request is validated before it
// reaches the engine; every failure is an OpenAI-style JSON error; no request can
// take the process down (handlers catch everything; SIGPIPE is ignored).
#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <thread>

#include "server/generation.h"
#include "server/metrics.h"

namespace spear::server {

struct ServerOptions {
  std::string host = "127.0.0.1";
  int port = 8080;                     // 0: an ephemeral port (see HttpServer::port())
  std::string api_key;                 // empty: no authentication
  size_t max_body_bytes = 8u << 20;    // 413 beyond
  int http_threads = 128;              // connections served at once
  int listen_backlog = 1024;
  int read_timeout_s = 10, write_timeout_s = 30;
  int retry_after_s = 1;               // Retry-After of a 429
};

class HttpServer {
 public:
  explicit HttpServer(ServerOptions opt);
  ~HttpServer();
  HttpServer(const HttpServer&) = delete;
  HttpServer& operator=(const HttpServer&) = delete;

  // Binds and starts serving on a background thread (health says "loading").
  // Throws spear::Error when the address cannot be bound.
  void start();
  int port() const { return port_; }
  // The model is loaded and its engine runs: serve requests. `state` must stay
  // valid until stop().
  void set_ready(ServeState state);
  bool ready() const { return ready_.load(); }
  // Stops accepting, ends streams, joins the listener thread.
  void stop();

  Metrics& metrics() { return metrics_; }

 private:
  class Impl;
  std::unique_ptr<Impl> impl_;
  ServerOptions opt_;
  Metrics metrics_;
  std::atomic<bool> ready_{false}, stopping_{false};
  std::unique_ptr<ServeState> state_;
  std::thread thread_;
  int port_ = -1;
};

}  // namespace spear::server
