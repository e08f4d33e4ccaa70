// Soak: hundreds of concurrent clients for a bounded time, a quarter of them hanging
// up at random moments (mid-stream, or while waiting for a JSON answer). Afterwards:
// every client that stayed got a complete answer, the engine holds no request and no
// KV block, descriptors are back, and the server still answers.
#include <gtest/gtest.h>
#include <dirent.h>

#include <atomic>
#include <random>
#include <thread>

#include "test_server_fixture.h"

using namespace spear;
using namespace spear::test;
using nlohmann::json;

namespace {
int open_fds() {
  int n = 0;
  if (DIR* d = opendir("/proc/self/fd")) {
    while (readdir(d)) ++n;
    closedir(d);
  }
  return n;
}
}  // namespace

TEST(ServerSoak, HundredsOfClientsWithRandomDisconnects) {
  EngineConfig ec = TestServer::small_engine();
  ec.sched.max_batch = 32;
  ec.kv_blocks = 64;  // 1024 positions for 32 sequences: tight, so preemptions happen too
  ec.max_waiting = 1024;
  server::ServerOptions so = TestServer::loopback();
  so.http_threads = 320;
  TestServer s(ec, so);
  const int fds_before = open_fds();
  const int kClients = 200;
  const double kSeconds = 8;
  std::atomic<int> completed{0}, disconnected{0}, lost{0};
  std::mutex mu;
  std::string first_loss;
  auto t_end = std::chrono::steady_clock::now() + std::chrono::duration<double>(kSeconds);
  std::vector<std::thread> clients;
  for (int c = 0; c < kClients; ++c)
    clients.emplace_back([&, c] {
      std::mt19937 rng(1000 + c);
      while (std::chrono::steady_clock::now() < t_end) {
        const bool stream = rng() % 2, chat = rng() % 3 == 0, hang_up = rng() % 4 == 0;
        const int max_tokens = 1 + static_cast<int>(rng() % 48);
        json body{{"max_tokens", max_tokens}, {"stream", stream}, {"ignore_eos", rng() % 2 == 0}};
        if (chat) body["messages"] = {{{"role", "user"}, {"content", "Tell me a story " + std::to_string(rng() % 100)}}};
        else body["prompt"] = "Once upon a time " + std::string(rng() % 40, 'a');
        server::PostOptions opt;
        opt.timeout_s = 60;
        const int cut_after = 1 + static_cast<int>(rng() % 4);
        int events = 0;
        if (hang_up) {
          if (stream) opt.on_event = [&](const std::string&, double) { return ++events < cut_after; };
          else opt.timeout_s = 0.001 * (1 + rng() % 30);
        }
        server::HttpResult r = s.post(chat ? "/v1/chat/completions" : "/v1/completions", body, opt);
        if (hang_up) {
          disconnected++;
          continue;
        }
        bool ok = r.status == 200;
        if (ok && stream) {
          ok = !r.events.empty() && r.events.back() == "[DONE]";
          bool finish = false;
          for (size_t i = 0; ok && i + 1 < r.events.size(); ++i) {
            json j = json::parse(r.events[i], nullptr, false);
            if (j.is_discarded() || j.contains("error")) ok = false;
            else if (!j["choices"].empty() && !j["choices"][0]["finish_reason"].is_null()) finish = true;
          }
          ok = ok && finish;
        } else if (ok) {
          json j = json::parse(r.body, nullptr, false);
          ok = !j.is_discarded() && j.contains("choices") && !j["choices"][0]["finish_reason"].is_null() &&
               j["usage"]["completion_tokens"].get<int>() <= max_tokens;
        }
        if (ok) completed++;
        else {
          lost++;
          std::lock_guard<std::mutex> lk(mu);
          if (first_loss.empty()) first_loss = std::to_string(r.status) + " " + r.error + " " + r.body.substr(0, 200);
        }
      }
    });
  for (auto& t : clients) t.join();
  EXPECT_EQ(lost.load(), 0) << first_loss;
  EXPECT_GT(completed.load(), kClients);
  EXPECT_GT(disconnected.load(), 10);
  EXPECT_TRUE(s.wait_idle(20)) << "running " << s.engine->stats().running << " waiting " << s.engine->stats().waiting
                               << " KV " << s.engine->stats().kv_blocks_used;
  EXPECT_EQ(s.get("/health").status, 200);
  EXPECT_EQ(s.post("/v1/completions", {{"prompt", "Once"}, {"max_tokens", 3}}).status, 200);
  // Connections are closed again (the server side may take a moment to notice).
  int fds_after = open_fds();
  for (int i = 0; i < 200 && fds_after > fds_before + 4; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    fds_after = open_fds();
  }
  EXPECT_LE(fds_after, fds_before + 4);
  std::printf("soak: %d completed, %d disconnected, %lld preemptions\n", completed.load(), disconnected.load(),
              static_cast<long long>(s.engine->stats().preemptions));
}
