// The HTTP server end to end on loopback with the tiny model: completions and chat,
// JSON and SSE; batching does not change greedy results; prompt logprobs as
// lm-evaluation-harness reads them; a disconnecting client frees its KV blocks;
// /health while loading; /metrics; the `spear serve` command itself.
#include <gtest/gtest.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <map>
#include <set>
#include <thread>

#include "engine/generate.h"
#include "server/load_generator.h"
#include "test_server_fixture.h"

using namespace spear;
using namespace spear::test;
using nlohmann::json;

namespace {

json parse(const std::string& s) { return json::parse(s); }

// Generated ids through /v1/completions with token-id prompts and logprobs (the ids
// are recovered exactly from the top-1 entries: greedy picks the top token).
std::string completion_text(const TestServer& s, const std::vector<int32_t>& prompt, int max_tokens) {
  server::HttpResult r = s.post("/v1/completions", {{"prompt", prompt}, {"max_tokens", max_tokens},
                                                    {"temperature", 0}, {"ignore_eos", true}});
  EXPECT_EQ(r.status, 200) << r.body;
  return parse(r.body)["choices"][0]["text"].get<std::string>();
}

}  // namespace

TEST(ServerHttp, CompletionMatchesDirectGeneration) {
  TestServer s;
  std::vector<int32_t> prompt = s.tok->encode("Once upon a time", true);
  GenerateOptions g;
  g.max_new_tokens = 20;
  g.stop_at_eos = false;
  GenerateResult ref = generate(*s.model, prompt, g);
  EXPECT_EQ(completion_text(s, prompt, 20), s.tok->decode(ref.ids));
  // The same through a text prompt.
  server::HttpResult r = s.post("/v1/completions", {{"prompt", "Once upon a time"}, {"max_tokens", 20}, {"ignore_eos", true}, {"temperature", 0}});
  ASSERT_EQ(r.status, 200) << r.body;
  json j = parse(r.body);
  EXPECT_EQ(j["choices"][0]["text"], s.tok->decode(ref.ids));
  EXPECT_EQ(j["object"], "text_completion");
  EXPECT_EQ(j["usage"]["prompt_tokens"], prompt.size());
  EXPECT_EQ(j["usage"]["completion_tokens"], 20);
  EXPECT_EQ(j["choices"][0]["finish_reason"], "length");
}

TEST(ServerHttp, BatchingDoesNotChangeGreedyResults) {
  TestServer s;
  const char* texts[] = {"Once upon a time", "The little dog", "Lily and Tom went to the park",
                         "One day, a big bear", "She was happy because", "The sun was",
                         "There was a boy named Tim. He liked to", "A cat"};
  std::vector<std::vector<int32_t>> prompts;
  for (int i = 0; i < 24; ++i) {
    std::vector<int32_t> p = s.tok->encode(texts[i % 8], true);
    for (int r = 0; r < i / 8; ++r) {
      auto more = s.tok->encode(texts[(i + 3 * r + 1) % 8], false);
      p.insert(p.end(), more.begin(), more.end());
    }
    prompts.push_back(p);
  }
  // One at a time: batch size 1.
  std::vector<std::string> alone;
  for (const auto& p : prompts) alone.push_back(completion_text(s, p, 32));
  // All at once: continuous batching with mixed prefill/decode steps.
  std::vector<std::string> together(prompts.size());
  std::vector<std::thread> th;
  for (size_t i = 0; i < prompts.size(); ++i)
    th.emplace_back([&, i] { together[i] = completion_text(s, prompts[i], 32); });
  for (auto& t : th) t.join();
  for (size_t i = 0; i < prompts.size(); ++i) EXPECT_EQ(together[i], alone[i]) << "prompt " << i;
  EXPECT_TRUE(s.wait_idle());
}

TEST(ServerHttp, StreamingCompletionAndChat) {
  TestServer s;
  std::vector<int32_t> prompt = s.tok->encode("Once upon a time", true);
  std::string whole = completion_text(s, prompt, 24);
  server::HttpResult r = s.post("/v1/completions", {{"prompt", prompt}, {"max_tokens", 24}, {"ignore_eos", true},
                                                    {"temperature", 0}, {"stream", true}, {"stream_options", {{"include_usage", true}}}});
  ASSERT_EQ(r.status, 200);
  ASSERT_GE(r.events.size(), 3u);
  EXPECT_EQ(r.events.back(), "[DONE]");
  std::string text;
  bool saw_finish = false, saw_usage = false;
  for (size_t i = 0; i + 1 < r.events.size(); ++i) {
    json j = parse(r.events[i]);
    if (j.contains("usage")) {
      saw_usage = true;
      EXPECT_EQ(j["usage"]["completion_tokens"], 24);
      continue;
    }
    text += j["choices"][0]["text"].get<std::string>();
    if (!j["choices"][0]["finish_reason"].is_null()) {
      saw_finish = true;
      EXPECT_EQ(j["choices"][0]["finish_reason"], "length");
    }
  }
  EXPECT_TRUE(saw_finish);
  EXPECT_TRUE(saw_usage);
  EXPECT_EQ(text, whole);

  server::HttpResult c = s.post("/v1/chat/completions", {{"messages", {{{"role", "user"}, {"content", "Hi"}}}},
                                                         {"max_tokens", 8}, {"stream", true}});
  ASSERT_EQ(c.status, 200);
  EXPECT_EQ(c.events.back(), "[DONE]");
  json first = parse(c.events[0]);
  EXPECT_EQ(first["object"], "chat.completion.chunk");
  EXPECT_EQ(first["choices"][0]["delta"]["role"], "assistant");
  json last = parse(c.events[c.events.size() - 2]);
  EXPECT_FALSE(last["choices"][0]["finish_reason"].is_null());

  server::HttpResult n = s.post("/v1/chat/completions", {{"messages", {{{"role", "user"}, {"content", "Hi"}}}}, {"max_tokens", 8}});
  ASSERT_EQ(n.status, 200);
  json nj = parse(n.body);
  EXPECT_EQ(nj["object"], "chat.completion");
  EXPECT_EQ(nj["choices"][0]["message"]["role"], "assistant");
  EXPECT_TRUE(nj["choices"][0]["message"]["content"].is_string());
}

TEST(ServerHttp, StopStringsCutTheText) {
  TestServer s;
  std::vector<int32_t> prompt = s.tok->encode("Once upon a time", true);
  std::string whole = completion_text(s, prompt, 30);
  ASSERT_GT(whole.size(), 12u);
  const std::string stop = whole.substr(8, 3);
  for (bool stream : {false, true}) {
    json body{{"prompt", prompt}, {"max_tokens", 30}, {"stop", stop}, {"stream", stream}, {"temperature", 0}};
    server::HttpResult r = s.post("/v1/completions", body);
    ASSERT_EQ(r.status, 200);
    std::string text, reason;
    if (stream) {
      for (const std::string& e : r.events) {
        if (e == "[DONE]") continue;
        json j = parse(e);
        text += j["choices"][0]["text"].get<std::string>();
        if (!j["choices"][0]["finish_reason"].is_null()) reason = j["choices"][0]["finish_reason"];
      }
    } else {
      json j = parse(r.body);
      text = j["choices"][0]["text"];
      reason = j["choices"][0]["finish_reason"];
    }
    EXPECT_EQ(text, whole.substr(0, whole.find(stop))) << "stream=" << stream;
    EXPECT_EQ(reason, "stop");
  }
  EXPECT_TRUE(s.wait_idle());
}

TEST(ServerHttp, EchoLogprobsAsLmEvalReadsThem) {
  TestServer s;
  std::vector<int32_t> prompt = s.tok->encode("Once upon a time there was a little girl", true);
  // What lm-evaluation-harness' local-completions sends for loglikelihood.
  json body{{"model", "tiny"}, {"prompt", json::array({prompt})}, {"max_tokens", 1},
            {"temperature", 0}, {"logprobs", 1}, {"echo", true}, {"seed", 1234}};
  server::HttpResult r = s.post("/v1/completions", body);
  ASSERT_EQ(r.status, 200) << r.body;
  json lp = parse(r.body)["choices"][0]["logprobs"];
  ASSERT_EQ(lp["token_logprobs"].size(), prompt.size() + 1);  // prompt + the generated token
  EXPECT_TRUE(lp["token_logprobs"][0].is_null());
  EXPECT_TRUE(lp["top_logprobs"][0].is_null());
  // Reference: log-softmax of the model's logits at every prompt position.
  ContiguousKVCache kv(s.model->config().num_layers, 64, s.model->config().kv_dim());
  std::vector<float> logits = s.model->forward(prompt.data(), static_cast<int64_t>(prompt.size()), kv, 0, true);
  const int64_t V = s.model->vocab_size();
  for (size_t i = 1; i < prompt.size(); ++i) {
    const float* row = &logits[(i - 1) * V];
    double mx = *std::max_element(row, row + V), sum = 0;
    for (int64_t k = 0; k < V; ++k) sum += std::exp(row[k] - mx);
    double want = row[prompt[i]] - mx - std::log(sum);
    EXPECT_NEAR(lp["token_logprobs"][i].get<double>(), want, 1e-3) << i;
    ASSERT_EQ(lp["top_logprobs"][i].size(), 1u);
  }
  // max_tokens 0 scores the prompt only.
  body["max_tokens"] = 0;
  r = s.post("/v1/completions", body);
  ASSERT_EQ(r.status, 200) << r.body;
  EXPECT_EQ(parse(r.body)["choices"][0]["logprobs"]["token_logprobs"].size(), prompt.size());
  EXPECT_EQ(parse(r.body)["usage"]["completion_tokens"], 0);
}

TEST(ServerHttp, SeveralPromptsInOneCall) {
  TestServer s;
  auto a = s.tok->encode("The little dog", true), b = s.tok->encode("A cat", true);
  server::HttpResult r = s.post("/v1/completions", {{"prompt", {a, b}}, {"max_tokens", 6}, {"ignore_eos", true}, {"temperature", 0}});
  ASSERT_EQ(r.status, 200) << r.body;
  json j = parse(r.body);
  ASSERT_EQ(j["choices"].size(), 2u);
  EXPECT_EQ(j["choices"][0]["text"], completion_text(s, a, 6));
  EXPECT_EQ(j["choices"][1]["text"], completion_text(s, b, 6));
  EXPECT_EQ(j["choices"][1]["index"], 1);
}

namespace {
std::string metric_line(const TestServer& s, const std::string& prefix) {
  std::string m = s.get("/metrics").body;
  size_t p = m.find(prefix);
  return p == std::string::npos ? "" : m.substr(p, m.find('\n', p) - p);
}
}  // namespace

TEST(ServerHttp, StreamingDisconnectCancelsAndFreesKvBlocks) {
  TestServer s;
  std::vector<int32_t> prompt = s.tok->encode("Once upon a time", true);
  // Hang up after the third event of a long generation.
  server::PostOptions opt;
  int seen = 0;
  opt.on_event = [&](const std::string&, double) { return ++seen < 3; };
  server::HttpResult r = s.post("/v1/completions", {{"prompt", prompt}, {"max_tokens", 480}, {"ignore_eos", true}, {"stream", true}}, opt);
  EXPECT_LT(r.events.size(), 10u);
  EXPECT_TRUE(s.wait_idle()) << "running " << s.engine->stats().running << ", KV blocks " << s.engine->stats().kv_blocks_used;
  EXPECT_EQ(metric_line(s, "spear:request_success_total{model_name=\"tiny\",finished_reason=\"abort\"}"),
            "spear:request_success_total{model_name=\"tiny\",finished_reason=\"abort\"} 1");
  EXPECT_LT(s.engine->stats().generated_tokens, 480);
}

TEST(ServerHttp, NonStreamingDisconnectIsNoticedBeforeAnyOutput) {
  // The engine is not started: the request waits in the queue for as long as the
  // test likes, and only the connection watch can end it.
  TestServer s(TestServer::small_engine(), TestServer::loopback(), true, /*start_engine=*/false);
  std::vector<int32_t> prompt = s.tok->encode("Once upon a time", true);
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(s.url.port));
  inet_pton(AF_INET, "127.0.0.1", &addr.sin_addr);
  ASSERT_EQ(connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
  std::string body = json{{"prompt", prompt}, {"max_tokens", 40}}.dump();
  std::string req = "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: " +
                    std::to_string(body.size()) + "\r\n\r\n" + body;
  ASSERT_EQ(send(fd, req.data(), req.size(), 0), static_cast<ssize_t>(req.size()));
  for (int i = 0; i < 1000 && s.engine->stats().waiting < 1; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(2));
  ASSERT_EQ(s.engine->stats().waiting, 1);
  close(fd);
  const std::string key = "spear:http_responses_total{model_name=\"tiny\",endpoint=\"/v1/completions\",status=\"499\"}";
  const std::string gone = key + " 1";
  for (int i = 0; i < 500 && metric_line(s, key) != gone; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  EXPECT_EQ(metric_line(s, key), gone);
  s.engine->start();  // the engine retires the cancelled request without running it
  EXPECT_TRUE(s.wait_idle());
  EXPECT_EQ(s.engine->stats().generated_tokens, 0);
  EXPECT_EQ(metric_line(s, "spear:request_success_total{model_name=\"tiny\",finished_reason=\"abort\"}"),
            "spear:request_success_total{model_name=\"tiny\",finished_reason=\"abort\"} 1");
}

TEST(ServerHttp, HealthWhileLoadingAndMetrics) {
  {
    TestServer loading(TestServer::small_engine(), TestServer::loopback(), /*ready=*/false);
    server::HttpResult h = loading.get("/health");
    EXPECT_EQ(h.status, 503);
    EXPECT_EQ(parse(h.body)["status"], "loading");
    server::HttpResult c = loading.post("/v1/completions", {{"prompt", "x"}});
    EXPECT_EQ(c.status, 503);
    EXPECT_EQ(parse(c.body)["error"]["code"], "model_loading");
    EXPECT_EQ(loading.get("/metrics").status, 200);
  }
  TestServer s;
  EXPECT_EQ(s.get("/health").status, 200);
  completion_text(s, s.tok->encode("Hi", true), 4);
  // The response can reach the client before the engine thread retires the sequence (its
  // blocks and the running gauge): read the gauges once the engine is idle.
  ASSERT_TRUE(s.wait_idle());
  server::HttpResult m = s.get("/metrics");
  ASSERT_EQ(m.status, 200);
  // vLLM's metric names with the spear: prefix, each labelled with the model name.
  const std::string prompt_tokens = std::to_string(s.tok->encode("Hi", true).size());
  for (const std::string& name : std::vector<std::string>{"spear:num_requests_running{model_name=\"tiny\"} 0", "spear:num_requests_waiting{model_name=\"tiny\"} 0",
        "spear:kv_cache_usage_perc{model_name=\"tiny\"} 0",
        "spear:prompt_tokens_total{model_name=\"tiny\"} " + prompt_tokens,
        "spear:generation_tokens_total{model_name=\"tiny\"} 4", "spear:num_preemptions_total{model_name=\"tiny\"} 0",
        "spear:request_success_total{model_name=\"tiny\",finished_reason=\"length\"} 1",
        "spear:request_success_total{model_name=\"tiny\",finished_reason=\"stop\"} 0",
        "spear:time_to_first_token_seconds_bucket{model_name=\"tiny\",le=\"+Inf\"} 1",
        "spear:time_to_first_token_seconds_count{model_name=\"tiny\"} 1",
        "spear:time_per_output_token_seconds_count{model_name=\"tiny\"} 1",
        "spear:e2e_request_latency_seconds_count{model_name=\"tiny\"} 1",
        "spear:request_prompt_tokens_sum{model_name=\"tiny\"} " + prompt_tokens,
        "spear:request_generation_tokens_sum{model_name=\"tiny\"} 4",
        "spear:request_generation_tokens_bucket{model_name=\"tiny\",le=\"5\"} 1",
        "spear:iteration_tokens_total_count{model_name=\"tiny\"} 4",
        "spear:kv_cache_blocks_used{model_name=\"tiny\"} 0",
        "spear:engine_steps_total{model_name=\"tiny\",kind=\"decode\"} 3",
        "spear:engine_steps_total{model_name=\"tiny\",kind=\"prefill\"} 1",
        "spear:http_responses_total{model_name=\"tiny\",endpoint=\"/v1/completions\",status=\"200\"} 1",
        "# TYPE spear:time_to_first_token_seconds histogram", "# TYPE spear:num_requests_running gauge"})
    EXPECT_NE(m.body.find(name + "\n"), std::string::npos) << name;
  // Every sample line carries the label (no unlabelled series left from the old names).
  size_t pos = 0;
  while (pos < m.body.size()) {
    const size_t end = m.body.find('\n', pos);
    const std::string line = m.body.substr(pos, end - pos);
    pos = end == std::string::npos ? m.body.size() : end + 1;
    if (line.empty() || line[0] == '#') continue;
    EXPECT_EQ(line.rfind("spear:", 0), 0u) << line;
    EXPECT_NE(line.find("{model_name=\"tiny\""), std::string::npos) << line;
  }
  json models = parse(s.get("/v1/models").body);
  EXPECT_EQ(models["data"][0]["id"], "tiny");
}

TEST(ServerHttp, ServeCommandStartsAndStops) {
  // `spear serve --port 0` prints its port, answers, and exits cleanly on SIGTERM.
  int out[2];
  ASSERT_EQ(pipe(out), 0);
  pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    dup2(out[1], 2);
    close(out[0]);
    std::string model = tiny_model_dir();
    execl(cli_path().c_str(), "spear", "serve", "--model", model.c_str(), "--port", "0", "--no-profile",
          "--max-batch", "4", static_cast<char*>(nullptr));
    _exit(127);
  }
  close(out[1]);
  std::string log;
  int port = -1;
  char buf[512];
  while (log.find("spear: ready") == std::string::npos) {
    ssize_t n = read(out[0], buf, sizeof buf);
    if (n <= 0) break;
    log.append(buf, n);
  }
  size_t p = log.find("127.0.0.1:");
  if (p != std::string::npos) port = std::atoi(log.c_str() + p + 10);
  ASSERT_GT(port, 0) << log;
  server::Url u;
  u.port = port;
  server::HttpResult h = server::http_get(u, "/health");
  EXPECT_EQ(h.status, 200) << log;
  server::HttpResult r = server::http_post(u, "/v1/completions", R"({"prompt":"Once upon","max_tokens":3})");
  EXPECT_EQ(r.status, 200) << r.body;
  kill(pid, SIGTERM);
  int status = 0;
  waitpid(pid, &status, 0);
  close(out[0]);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << log;
}

// ---- OpenAI / vLLM fidelity: n, penalties, min_p, stop_token_ids, tokenizer endpoints

namespace {
std::string text_of(const server::HttpResult& r, size_t i = 0) {
  EXPECT_EQ(r.status, 200) << r.body;
  json j = json::parse(r.body, nullptr, false);
  if (j.is_discarded() || !j.contains("choices") || j["choices"].size() <= i) return "<no choice>";
  const json& c = j["choices"][i];
  return c.contains("message") ? c["message"]["content"].get<std::string>() : c["text"].get<std::string>();
}
}  // namespace

TEST(ServerHttp, NChoicesEachWithItsOwnSeedStream) {
  TestServer s;
  const json base{{"prompt", "Once upon a time"}, {"max_tokens", 8}, {"ignore_eos", true}, {"temperature", 1.0}};
  json req = base;
  req["n"] = 3;
  req["seed"] = 42;
  server::HttpResult r = s.post("/v1/completions", req);
  ASSERT_EQ(r.status, 200) << r.body;
  json j = parse(r.body);
  const json first = j;
  ASSERT_EQ(j["choices"].size(), 3u);
  const size_t prompt_len = s.tok->encode("Once upon a time", true).size();
  EXPECT_EQ(j["usage"]["prompt_tokens"], prompt_len);  // the prompt counted once, as OpenAI does
  EXPECT_EQ(j["usage"]["completion_tokens"], 24);
  std::set<std::string> distinct;
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(j["choices"][i]["index"], i);
    // Choice i samples as a single request with seed 42 + i (vLLM's n).
    json one = base;
    one["seed"] = 42 + i;
    EXPECT_EQ(j["choices"][i]["text"], text_of(s.post("/v1/completions", one))) << i;
    distinct.insert(j["choices"][i]["text"].get<std::string>());
  }
  EXPECT_GE(distinct.size(), 2u) << "n choices with different seeds should differ";
  // Several prompts: choice index = prompt * n + j, and j's seed is seed + j for each prompt.
  json multi = base;
  multi["prompt"] = {"Once upon a time", "The dog"};
  multi["n"] = 2;
  multi["seed"] = 7;
  j = parse(s.post("/v1/completions", multi).body);
  ASSERT_EQ(j["choices"].size(), 4u);
  json one = base;
  one["prompt"] = "The dog";
  one["seed"] = 8;
  EXPECT_EQ(j["choices"][3]["text"], text_of(s.post("/v1/completions", one)));
  EXPECT_EQ(j["choices"][3]["index"], 3);
  EXPECT_EQ(j["usage"]["prompt_tokens"], prompt_len + s.tok->encode("The dog", true).size());
  // Streaming: every choice's chunks carry its index and end with its finish_reason.
  json st = req;
  st["stream"] = true;
  server::HttpResult sr = s.post("/v1/completions", st);
  ASSERT_EQ(sr.status, 200);
  std::map<int, std::string> texts;
  std::map<int, std::string> finish;
  for (const std::string& e : sr.events) {
    if (e == "[DONE]") continue;
    json c = parse(e)["choices"][0];
    texts[c["index"].get<int>()] += c["text"].get<std::string>();
    if (!c["finish_reason"].is_null()) finish[c["index"].get<int>()] = c["finish_reason"];
  }
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(texts[i], first["choices"][i]["text"].get<std::string>()) << i;
    EXPECT_EQ(finish[i], "length") << i;
  }
  // Chat too; without a seed each choice draws its own.
  server::HttpResult c = s.post("/v1/chat/completions", {{"messages", {{{"role", "user"}, {"content", "Hi"}}}},
                                                         {"n", 4}, {"max_tokens", 12}, {"ignore_eos", true}});
  ASSERT_EQ(c.status, 200) << c.body;
  std::set<std::string> chats;
  for (int i = 0; i < 4; ++i) chats.insert(text_of(c, i));
  EXPECT_GE(chats.size(), 2u);
  // best_of equal to n is n.
  json bo = base;
  bo["n"] = 2;
  bo["best_of"] = 2;
  EXPECT_EQ(parse(s.post("/v1/completions", bo).body)["choices"].size(), 2u);
  EXPECT_TRUE(s.wait_idle());
}

TEST(ServerHttp, PenaltiesAndMinPMatchTheReferenceSampler) {
  TestServer s;
  const std::vector<int32_t> prompt = s.tok->encode("Once upon a time", true);
  auto reference = [&](const SamplingParams& sp) {
    GenerateOptions g;
    g.max_new_tokens = 40;
    g.stop_at_eos = false;
    g.sampling = sp;
    return s.tok->decode(generate(*s.model, prompt, g).ids);
  };
  const json base{{"prompt", prompt}, {"max_tokens", 40}, {"ignore_eos", true}, {"temperature", 0}};
  const std::string plain = text_of(s.post("/v1/completions", base));
  EXPECT_EQ(plain, reference({}));
  struct Case {
    const char* field;
    double value;
  } cases[] = {{"frequency_penalty", 1.5}, {"presence_penalty", 2.0}, {"repetition_penalty", 1.5}};
  for (const Case& c : cases) {
    SamplingParams sp;
    if (std::string(c.field) == "frequency_penalty") sp.frequency_penalty = static_cast<float>(c.value);
    if (std::string(c.field) == "presence_penalty") sp.presence_penalty = static_cast<float>(c.value);
    if (std::string(c.field) == "repetition_penalty") sp.repetition_penalty = static_cast<float>(c.value);
    json req = base;
    req[c.field] = c.value;
    const std::string got = text_of(s.post("/v1/completions", req));
    EXPECT_EQ(got, reference(sp)) << c.field;
    EXPECT_NE(got, plain) << c.field << " changed nothing over 40 greedy tokens";
    // The chat endpoint takes the same fields.
    server::HttpResult ch = s.post("/v1/chat/completions", {{"messages", {{{"role", "user"}, {"content", "Hi"}}}},
                                                            {"max_tokens", 4}, {c.field, c.value}});
    EXPECT_EQ(ch.status, 200) << c.field << ": " << ch.body;
  }
  // min_p 1 keeps only the most likely token: sampling at temperature 1 is greedy.
  json mp = base;
  mp["temperature"] = 1.0;
  mp["min_p"] = 1.0;
  mp["seed"] = 3;
  EXPECT_EQ(text_of(s.post("/v1/completions", mp)), plain);
  mp["min_p"] = 0.0;
  EXPECT_NE(text_of(s.post("/v1/completions", mp)), plain) << "sampling at temperature 1 should leave greedy";
  EXPECT_TRUE(s.wait_idle());
}

TEST(ServerHttp, StopTokenIdsEndTheChoiceWithoutTheirText) {
  TestServer s;
  const std::vector<int32_t> prompt = s.tok->encode("Once upon a time", true);
  GenerateOptions g;
  g.max_new_tokens = 20;
  g.stop_at_eos = false;
  const std::vector<int32_t> ids = generate(*s.model, prompt, g).ids;
  // Stop at the 6th generated token (at its first occurrence).
  const int32_t stop = ids[5];
  const size_t at = std::find(ids.begin(), ids.end(), stop) - ids.begin();
  server::HttpResult r = s.post("/v1/completions", {{"prompt", prompt}, {"max_tokens", 20}, {"temperature", 0},
                                                    {"stop_token_ids", {stop}}});
  ASSERT_EQ(r.status, 200) << r.body;
  json j = parse(r.body);
  EXPECT_EQ(j["choices"][0]["finish_reason"], "stop");
  EXPECT_EQ(j["usage"]["completion_tokens"], at + 1);  // the stop token is generated
  EXPECT_EQ(j["choices"][0]["text"], s.tok->decode(std::vector<int32_t>(ids.begin(), ids.begin() + at)));
  // Streamed, and on chat.
  server::HttpResult st = s.post("/v1/completions", {{"prompt", prompt}, {"max_tokens", 20}, {"temperature", 0},
                                                     {"stop_token_ids", {stop}}, {"stream", true}});
  std::string streamed;
  for (const std::string& e : st.events)
    if (e != "[DONE]") streamed += parse(e)["choices"][0]["text"].get<std::string>();
  EXPECT_EQ(streamed, j["choices"][0]["text"].get<std::string>());
  server::HttpResult c = s.post("/v1/chat/completions", {{"messages", {{{"role", "user"}, {"content", "Hi"}}}},
                                                         {"max_tokens", 30}, {"temperature", 0}, {"ignore_eos", true},
                                                         {"stop_token_ids", json::array()}});
  EXPECT_EQ(c.status, 200) << c.body;
}

TEST(ServerHttp, TokenizeDetokenizeAndVersion) {
  TestServer s;
  const std::string text = "Once upon a time";
  const std::vector<int32_t> ids = s.tok->encode(text, true);
  server::HttpResult r = s.post("/tokenize", {{"prompt", text}});
  ASSERT_EQ(r.status, 200) << r.body;
  json j = parse(r.body);
  EXPECT_EQ(j["tokens"].get<std::vector<int32_t>>(), ids);
  EXPECT_EQ(j["count"], ids.size());
  EXPECT_EQ(j["max_model_len"], s.engine->max_model_len());
  EXPECT_TRUE(j["token_strs"].is_null());
  // add_special_tokens false drops the BOS; return_token_strs gives the vocabulary pieces.
  j = parse(s.post("/tokenize", {{"prompt", text}, {"add_special_tokens", false}, {"return_token_strs", true},
                                 {"model", "tiny"}}).body);
  const std::vector<int32_t> bare = s.tok->encode(text, false);
  EXPECT_EQ(j["tokens"].get<std::vector<int32_t>>(), bare);
  ASSERT_EQ(j["token_strs"].size(), bare.size());
  for (size_t i = 0; i < bare.size(); ++i) EXPECT_EQ(j["token_strs"][i], s.tok->id_to_token(bare[i]));
  // The empty text is BOS alone, as on the CLI and in Hugging Face.
  j = parse(s.post("/tokenize", {{"prompt", ""}}).body);
  EXPECT_EQ(j["tokens"], json::array({s.tok->bos_id()}));
  // Messages render with the server's chat template and encode as chat does (plain
  // template here: its text with the BOS); usage of a chat request agrees.
  const json msgs = {{{"role", "system"}, {"content", "Be nice."}}, {{"role", "user"}, {"content", "Hi"}}};
  j = parse(s.post("/tokenize", {{"messages", msgs}}).body);
  EXPECT_EQ(j["tokens"].get<std::vector<int32_t>>(), s.tok->encode("system: Be nice.\nuser: Hi\nassistant:", true));
  server::HttpResult chat = s.post("/v1/chat/completions", {{"messages", msgs}, {"max_tokens", 1}});
  EXPECT_EQ(parse(chat.body)["usage"]["prompt_tokens"], j["count"]);
  j = parse(s.post("/tokenize", {{"messages", msgs}, {"add_generation_prompt", false}}).body);
  EXPECT_EQ(j["tokens"].get<std::vector<int32_t>>(), s.tok->encode("system: Be nice.\nuser: Hi\n", true));
  // /detokenize: the text of the ids, special tokens kept.
  r = s.post("/detokenize", {{"tokens", ids}});
  ASSERT_EQ(r.status, 200) << r.body;
  EXPECT_EQ(parse(r.body)["prompt"], s.tok->decode(ids, false));
  EXPECT_EQ(parse(s.post("/detokenize", {{"tokens", bare}}).body)["prompt"], text);
  EXPECT_EQ(parse(s.post("/detokenize", {{"tokens", json::array()}}).body)["prompt"], "");
  // /version
  r = s.get("/version");
  ASSERT_EQ(r.status, 200);
  EXPECT_EQ(parse(r.body)["version"], SPEAR_VERSION);
}

// bench-serve --profile: the engine loop's phases, read from /metrics before and after a run.
TEST(ServerHttp, BenchServeProfileReportsEnginePhases) {
  TestServer s;
  server::LoadConfig cfg;
  cfg.url = "http://127.0.0.1:" + std::to_string(s.url.port);
  cfg.requests = 4;
  cfg.input_len = 8;
  cfg.output_len = 4;
  cfg.rate = 0;  // all at once
  cfg.profile = true;
  const server::LoadReport rep = server::run_load(cfg);
  ASSERT_EQ(rep.completed, 4);
  ASSERT_EQ(rep.phases.size(), 7u);
  EXPECT_GT(rep.steps, 0);
  double busy = 0, forward_host = 0;
  for (const auto& [name, sec] : rep.phases) {
    EXPECT_GE(sec, 0) << name;
    busy += sec;
    if (name == "forward_host") forward_host = sec;
  }
  EXPECT_GT(forward_host, 0);  // the CPU engine: the whole forward is host work
  EXPECT_LE(busy, rep.duration_s * 1.05 + 0.05);  // one engine thread cannot be busy longer than the run
  EXPECT_NE(rep.table().find("Engine loop profile"), std::string::npos);
  EXPECT_TRUE(rep.to_json().contains("engine_profile"));
  // Every phase is exported with the model label.
  const std::string m = s.get("/metrics").body;
  for (const char* ph : {"schedule", "prepare", "forward_device", "forward_copy", "forward_host", "sample", "other"})
    EXPECT_NE(m.find(std::string("spear:engine_phase_seconds_total{model_name=\"tiny\",phase=\"") + ph + "\"}"),
              std::string::npos)
        << ph;
}

// bench-serve --shared-prefix-len: every prompt starts with the same tokens, and --profile
// reads the server's prefix cache counters (spear:prefix_cache_hits_total / _queries_total).
TEST(ServerHttp, BenchServeSharedPrefixHitsThePrefixCache) {
  TestServer s;
  server::LoadConfig cfg;
  cfg.url = "http://127.0.0.1:" + std::to_string(s.url.port);
  cfg.requests = 4;
  cfg.input_len = 48;
  cfg.shared_prefix_len = 40;  // two full blocks of 16
  cfg.output_len = 3;
  cfg.rate = 0;
  cfg.concurrency = 1;  // one after another: each later request finds the first one's blocks
  cfg.profile = true;
  const server::LoadReport rep = server::run_load(cfg);
  ASSERT_EQ(rep.completed, 4);
  EXPECT_EQ(rep.input_tokens, 4 * 48);
  EXPECT_EQ(rep.prefix_queries, 4 * 48);
  EXPECT_EQ(rep.prefix_hits, 3 * 32);
  EXPECT_NE(rep.table().find("prefix cache hit rate"), std::string::npos);
  EXPECT_DOUBLE_EQ(rep.to_json()["engine_profile"]["prefix_cache"]["hit_rate"].get<double>(), 0.5);
  EXPECT_EQ(metric_line(s, "spear:prefix_cache_hits_total{"), "spear:prefix_cache_hits_total{model_name=\"tiny\"} 96");
  EXPECT_EQ(metric_line(s, "spear:prefix_cache_queries_total{"),
            "spear:prefix_cache_queries_total{model_name=\"tiny\"} 192");
  EXPECT_EQ(metric_line(s, "spear:kv_cache_blocks_used{"), "spear:kv_cache_blocks_used{model_name=\"tiny\"} 0");
  EXPECT_NE(metric_line(s, "spear:kv_cache_blocks_cached{"), "spear:kv_cache_blocks_cached{model_name=\"tiny\"} 0");
}
