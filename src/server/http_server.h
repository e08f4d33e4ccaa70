#pragma once
// The OpenAI-compatible HTTP front end (cpp-httplib):
//   POST /v1/completions, POST /v1/chat/completions   (JSON or SSE streaming)
//   POST /tokenize, POST /detokenize (vLLM's shapes)  GET /version
//   GET  /v1/models, GET /health (503 while loading), GET /metrics (Prometheus)
// The API key, when set, guards /v1/*, /tokenize and /detokenize.
// It listens before the model is loaded, so that /health can say 503 "loading";
// set_ready() hands it the loaded model. Every request is validated before it
// reaches the engine; every failure is an OpenAI-style JSON error; no request can
// take the process down (handlers catch everything; SIGPIPE is ignored).
// Connections are accepted and requests received by a SocketFront (bounded heads
// and bodies, chunked and compressed bodies counted, deadlines, per-client caps,
// pipelining in order); cpp-httplib parses, routes and answers the complete
// requests it hands on. POST bodies must be Content-Type application/json (415).
#include <atomic>
#include <cstdint>
#include <memory>
#include <string>

#include "server/generation.h"
#include "server/metrics.h"

namespace spear::server {

class SocketFront;

struct ServerOptions {
  std::string host = "127.0.0.1";
  int port = 8080;                     // 0: an ephemeral port (see HttpServer::port())
  std::string api_key;                 // empty: no authentication
  size_t max_body_bytes = 8u << 20;    // 413 beyond (after de-chunking and decompressing)
  int http_threads = 128;              // requests served at once (slow senders take none)
  int listen_backlog = 1024;
  int header_timeout_s = 10;           // the request head must arrive within this (408)
  int body_timeout_s = 30;             // the body within this of the head (408)
  int keep_alive_timeout_s = 5;        // an idle connection is closed after this
  int write_timeout_s = 30;            // a response write stalled this long fails
  int max_connections = 4096;          // open connections in all (503 beyond)
  int max_connections_per_ip = 256;    // open connections per client address (429 beyond)
  int retry_after_s = 1;               // Retry-After of a 429
  bool allow_unknown_fields = false;   // ignore unknown request fields instead of a 400
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
  // Graceful stop: stops accepting (the listening socket closes), answers new
  // requests on open connections 503, lets requests in flight finish for up to
  // timeout_s, then cancels the rest (a stream ends with an error event and
  // [DONE], a JSON request gets a 503) and closes everything.
  void drain(double timeout_s);
  // drain(0): cancels what is in flight at once.
  void stop();
  // During drain(): cancel what is in flight now (a second SIGTERM).
  void cancel_in_flight() { cancel_.store(true); }

  Metrics& metrics() { return metrics_; }

 private:
  class Impl;
  std::unique_ptr<Impl> impl_;
  ServerOptions opt_;
  Metrics metrics_;
  std::atomic<bool> ready_{false}, stopping_{false}, cancel_{false};
  std::unique_ptr<ServeState> state_;
  std::unique_ptr<SocketFront> front_;
  int port_ = -1;
};

}  // namespace spear::server
