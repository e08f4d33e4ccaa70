#pragma once
// An in-process spear server on an ephemeral loopback port with the shipped tiny
// model, for the server tests: real HTTP, real engine, real tokenizer.
#include <chrono>
#include <memory>
#include <string>
#include <thread>

#include <nlohmann/json.hpp>

#include "engine/engine_loop.h"
#include "model/llama.h"
#include "server/chat_template.h"
#include "server/http_client.h"
#include "server/http_server.h"
#include "test_paths.h"
#include "tokenizer/tokenizer.h"

namespace spear::test {

struct TestServer {
  std::unique_ptr<LlamaModel> model;
  std::unique_ptr<Tokenizer> tok;
  std::unique_ptr<Engine> engine;
  std::unique_ptr<server::HttpServer> http;
  server::Url url;

  // ready=false: the server listens but the model is "still loading".
  // start_engine=false: requests queue but never run (deterministic 429s).
  explicit TestServer(EngineConfig ec = small_engine(), server::ServerOptions so = loopback(),
                      bool ready = true, bool start_engine = true) {
    model = LlamaModel::load(tiny_model_dir());
    tok = std::make_unique<Tokenizer>(Tokenizer::from_file(tiny_model_dir() + "/tokenizer.json"));
    http = std::make_unique<server::HttpServer>(so);
    http->start();
    url.host = "127.0.0.1";
    url.port = http->port();
    engine = std::make_unique<Engine>(*model, ec, &http->metrics());
    if (start_engine) engine->start();
    if (ready) {
      server::ServeState st;
      st.tok = tok.get();
      st.engine = engine.get();
      st.model_name = "tiny";
      st.limits.max_model_len = engine->max_model_len();
      st.limits.vocab_size = model->vocab_size();
      http->set_ready(st);
    }
  }
  ~TestServer() {
    http->stop();
    engine->stop();
  }

  static EngineConfig small_engine() {
    EngineConfig ec;
    ec.sched.max_batch = 16;
    ec.kv_blocks = 512;  // 8192 positions
    ec.profile = false;  // the tiny model's steps are microseconds; no need
    return ec;
  }
  static server::ServerOptions loopback() {
    server::ServerOptions so;
    so.port = 0;
    so.http_threads = 64;
    return so;
  }

  server::HttpResult post(const std::string& path, const nlohmann::json& body,
                          server::PostOptions opt = {}) const {
    return server::http_post(url, path, body.dump(), opt);
  }
  server::HttpResult post_raw(const std::string& path, const std::string& body,
                              server::PostOptions opt = {}) const {
    return server::http_post(url, path, body, opt);
  }
  server::HttpResult get(const std::string& path) const { return server::http_get(url, path); }

  // Waits until the engine holds no request and no KV block (or the timeout).
  bool wait_idle(double timeout_s = 10) const {
    auto t0 = std::chrono::steady_clock::now();
    while (std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() < timeout_s) {
      EngineStats s = engine->stats();
      if (s.running == 0 && s.waiting == 0 && s.kv_blocks_used == 0) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    return false;
  }
};

}  // namespace spear::test
