// Every error the server can answer, table-driven: each row is a request and the
// status, error type and code it must get. Afterwards the server must still be
// healthy and hold no request and no KV block.
#include <gtest/gtest.h>

#include "server/httplib_config.h"
#include "test_server_fixture.h"

using namespace spear;
using namespace spear::test;
using nlohmann::json;

namespace {

struct Case {
  const char* name;
  const char* method;  // "GET" or "POST"
  std::string path;
  std::string body;
  int status;
  const char* code;  // error.code expected ("" = do not check)
  std::vector<std::pair<std::string, std::string>> headers = {};
};

std::string deep(int n) { return "{\"prompt\":" + std::string(n, '[') + std::string(n, ']') + "}"; }

std::vector<Case> cases() {
  const std::string long_prompt = json{{"prompt", std::vector<int>(600, 5)}, {"max_tokens", 1}}.dump();
  const std::string fits_but_no_room = json{{"prompt", std::vector<int>(500, 5)}, {"max_tokens", 100}}.dump();
  return {
      {"unknown path", "GET", "/v1/nothing", "", 404, "not_found"},
      {"unknown path POST", "POST", "/v2/completions", "{}", 404, "not_found"},
      {"wrong method", "GET", "/v1/completions", "", 405, "method_not_allowed"},
      {"not json", "POST", "/v1/completions", "{not json", 400, "invalid_json"},
      {"empty body", "POST", "/v1/completions", "", 400, "invalid_json"},
      {"top level array", "POST", "/v1/completions", "[1,2]", 400, "invalid_json"},
      {"deep nesting", "POST", "/v1/completions", deep(100000), 400, "invalid_json"},
      {"missing prompt", "POST", "/v1/completions", R"({"max_tokens":3})", 400, "missing_required_parameter"},
      {"prompt wrong type", "POST", "/v1/completions", R"({"prompt":5})", 400, "invalid_value"},
      {"prompt empty list", "POST", "/v1/completions", R"({"prompt":[]})", 400, "invalid_value"},
      {"prompt token out of vocab", "POST", "/v1/completions", R"({"prompt":[1,512]})", 400, "invalid_value"},
      {"prompt negative token", "POST", "/v1/completions", R"({"prompt":[1,-1]})", 400, "invalid_value"},
      {"prompt huge token", "POST", "/v1/completions", R"({"prompt":[1,18446744073709551615]})", 400, "invalid_value"},
      {"prompt fractional token", "POST", "/v1/completions", R"({"prompt":[1,2.5]})", 400, "invalid_value"},
      {"prompt mixed list", "POST", "/v1/completions", R"({"prompt":["a",[1,2],3]})", 400, "invalid_value"},
      {"prompt invalid utf8", "POST", "/v1/completions", "{\"prompt\":\"\\ud800\"}", 400, ""},
      {"prompt longer than context", "POST", "/v1/completions", long_prompt, 400, "context_length_exceeded"},
      {"prompt + max_tokens over context", "POST", "/v1/completions", fits_but_no_room, 400, "context_length_exceeded"},
      {"max_tokens negative", "POST", "/v1/completions", R"({"prompt":"a","max_tokens":-1})", 400, "invalid_value"},
      {"max_tokens string", "POST", "/v1/completions", R"({"prompt":"a","max_tokens":"5"})", 400, "invalid_value"},
      {"max_tokens huge", "POST", "/v1/completions", R"({"prompt":"a","max_tokens":1e300})", 400, "invalid_value"},
      {"max_tokens 0 without echo", "POST", "/v1/completions", R"({"prompt":"a","max_tokens":0})", 400, "invalid_value"},
      {"temperature negative", "POST", "/v1/completions", R"({"prompt":"a","temperature":-0.5})", 400, "invalid_value"},
      {"temperature NaN-ish", "POST", "/v1/completions", R"({"prompt":"a","temperature":"hot"})", 400, "invalid_value"},
      {"top_p zero", "POST", "/v1/completions", R"({"prompt":"a","top_p":0})", 400, "invalid_value"},
      {"top_p above one", "POST", "/v1/completions", R"({"prompt":"a","top_p":1.5})", 400, "invalid_value"},
      {"top_k negative", "POST", "/v1/completions", R"({"prompt":"a","top_k":-5})", 400, "invalid_value"},
      {"n zero", "POST", "/v1/completions", R"({"prompt":"a","n":0})", 400, "invalid_value"},
      {"n too large", "POST", "/v1/completions", R"({"prompt":"a","n":129})", 400, "invalid_value"},
      {"prompts x n too many", "POST", "/v1/completions", R"({"prompt":["a","b","c"],"n":100})", 400, "invalid_value"},
      {"best_of below n", "POST", "/v1/completions", R"({"prompt":"a","n":3,"best_of":2})", 400, "invalid_value"},
      {"best_of above n", "POST", "/v1/completions", R"({"prompt":"a","n":2,"best_of":4})", 400, "unsupported_parameter"},
      {"presence_penalty range", "POST", "/v1/completions", R"({"prompt":"a","presence_penalty":2.5})", 400, "invalid_value"},
      {"frequency_penalty type", "POST", "/v1/chat/completions", R"({"messages":[{"role":"user","content":"x"}],"frequency_penalty":"x"})", 400, "invalid_value"},
      {"repetition_penalty zero", "POST", "/v1/completions", R"({"prompt":"a","repetition_penalty":0})", 400, "invalid_value"},
      {"repetition_penalty range", "POST", "/v1/chat/completions", R"({"messages":[{"role":"user","content":"x"}],"repetition_penalty":11})", 400, "invalid_value"},
      {"min_p range", "POST", "/v1/completions", R"({"prompt":"a","min_p":1.5})", 400, "invalid_value"},
      {"stop_token_ids not a list", "POST", "/v1/completions", R"({"prompt":"a","stop_token_ids":5})", 400, "invalid_value"},
      {"stop_token_ids out of vocab", "POST", "/v1/chat/completions", R"({"messages":[{"role":"user","content":"x"}],"stop_token_ids":[512]})", 400, "invalid_value"},
      {"tokenize without prompt", "POST", "/tokenize", R"({})", 400, "missing_required_parameter"},
      {"tokenize prompt not a string", "POST", "/tokenize", R"({"prompt":[1,2]})", 400, "invalid_value"},
      {"tokenize unknown field", "POST", "/tokenize", R"({"prompt":"a","foo":1})", 400, "unknown_parameter"},
      {"tokenize both prompt and messages", "POST", "/tokenize", R"({"prompt":"a","messages":[{"role":"user","content":"x"}]})", 400, "invalid_value"},
      {"tokenize bad message", "POST", "/tokenize", R"({"messages":[{"role":"wizard","content":"x"}]})", 400, "invalid_value"},
      {"tokenize unknown model", "POST", "/tokenize", R"({"prompt":"a","model":"gpt-9"})", 404, "model_not_found"},
      {"tokenize GET", "GET", "/tokenize", "", 405, "method_not_allowed"},
      {"detokenize without tokens", "POST", "/detokenize", R"({})", 400, "missing_required_parameter"},
      {"detokenize out of vocab", "POST", "/detokenize", R"({"tokens":[1,512]})", 400, "invalid_value"},
      {"detokenize not a list", "POST", "/detokenize", R"({"tokens":"abc"})", 400, "invalid_value"},
      {"detokenize text/plain", "POST", "/detokenize", R"({"tokens":[1]})", 415, "unsupported_media_type", {{"Content-Type", "text/plain"}}},
      {"logprobs too many", "POST", "/v1/completions", R"({"prompt":"a","logprobs":21})", 400, "invalid_value"},
      {"logprobs negative", "POST", "/v1/completions", R"({"prompt":"a","logprobs":-1})", 400, "invalid_value"},
      {"stop too many", "POST", "/v1/completions", R"({"prompt":"a","stop":["1","2","3","4","5","6","7","8","9","10","11","12","13","14","15","16","17"]})", 400, "invalid_value"},
      {"stop wrong type", "POST", "/v1/completions", R"({"prompt":"a","stop":[1]})", 400, "invalid_value"},
      {"stop empty string", "POST", "/v1/completions", R"({"prompt":"a","stop":""})", 400, "invalid_value"},
      {"stream not bool", "POST", "/v1/completions", R"({"prompt":"a","stream":"yes"})", 400, "invalid_value"},
      {"stream_options without stream", "POST", "/v1/completions", R"({"prompt":"a","stream_options":{"include_usage":true}})", 400, "invalid_value"},
      {"logit_bias unsupported", "POST", "/v1/completions", R"({"prompt":"a","logit_bias":{"5":10}})", 400, "unsupported_parameter"},
      {"suffix unsupported", "POST", "/v1/completions", R"({"prompt":"a","suffix":"b"})", 400, "unsupported_parameter"},
      {"seed wrong type", "POST", "/v1/completions", R"({"prompt":"a","seed":"x"})", 400, "invalid_value"},
      {"unknown model", "POST", "/v1/completions", R"({"prompt":"a","model":"gpt-9"})", 404, "model_not_found"},
      {"model not a string", "POST", "/v1/completions", R"({"prompt":"a","model":7})", 400, "invalid_value"},
      {"chat missing messages", "POST", "/v1/chat/completions", R"({})", 400, "missing_required_parameter"},
      {"chat messages empty", "POST", "/v1/chat/completions", R"({"messages":[]})", 400, "invalid_value"},
      {"chat message not object", "POST", "/v1/chat/completions", R"({"messages":["hi"]})", 400, "invalid_value"},
      {"chat bad role", "POST", "/v1/chat/completions", R"({"messages":[{"role":"wizard","content":"x"}]})", 400, "invalid_value"},
      {"chat missing content", "POST", "/v1/chat/completions", R"({"messages":[{"role":"user"}]})", 400, "invalid_value"},
      {"chat content wrong type", "POST", "/v1/chat/completions", R"({"messages":[{"role":"user","content":5}]})", 400, "invalid_value"},
      {"chat image part", "POST", "/v1/chat/completions", R"({"messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"x"}}]}]})", 400, "unsupported_parameter"},
      {"chat tools", "POST", "/v1/chat/completions", R"({"messages":[{"role":"user","content":"x"}],"tools":[{"type":"function"}]})", 400, "unsupported_parameter"},
      {"chat json mode", "POST", "/v1/chat/completions", R"({"messages":[{"role":"user","content":"x"}],"response_format":{"type":"json_object"}})", 400, "unsupported_parameter"},
      {"chat top_logprobs without logprobs", "POST", "/v1/chat/completions", R"({"messages":[{"role":"user","content":"x"}],"top_logprobs":2})", 400, "invalid_value"},
      {"chat max_tokens zero", "POST", "/v1/chat/completions", R"({"messages":[{"role":"user","content":"x"}],"max_tokens":0})", 400, "invalid_value"},
      {"body too large", "POST", "/v1/completions", "{\"prompt\":\"" + std::string(2u << 20, 'a') + "\"}", 413, "payload_too_large"},
      // One policy for unknown fields on both endpoints (issue 14).
      {"unknown field", "POST", "/v1/completions", R"({"prompt":"a","foo":1})", 400, "unknown_parameter"},
      {"unknown field chat", "POST", "/v1/chat/completions", R"({"messages":[{"role":"user","content":"x"}],"foo":1})", 400, "unknown_parameter"},
      {"guided_json", "POST", "/v1/completions", R"({"prompt":"a","guided_json":{"type":"object"}})", 400, "unsupported_parameter"},
      {"tools on completions", "POST", "/v1/completions", R"({"prompt":"a","tools":[{"type":"function"}]})", 400, "unsupported_parameter"},
      {"json mode on completions", "POST", "/v1/completions", R"({"prompt":"a","response_format":{"type":"json_object"}})", 400, "unsupported_parameter"},
      {"tool_choice required", "POST", "/v1/chat/completions", R"({"messages":[{"role":"user","content":"x"}],"tool_choice":"required"})", 400, "unsupported_parameter"},
      // Trailing garbage and NUL bytes after valid JSON.
      {"trailing garbage", "POST", "/v1/completions", R"({"prompt":"a"} xyz)", 400, "invalid_json"},
      {"NUL then garbage", "POST", "/v1/completions", std::string("{\"prompt\":\"a\"}\0garbage", 23), 400, "invalid_json"},
      {"NUL alone after", "POST", "/v1/completions", std::string("{\"prompt\":\"a\"}\0", 15), 400, "invalid_json"},
      // Content-Type must be JSON on POST.
      {"text/plain", "POST", "/v1/completions", R"({"prompt":"a","max_tokens":1})", 415, "unsupported_media_type", {{"Content-Type", "text/plain"}}},
      {"form", "POST", "/v1/chat/completions", R"({"messages":[{"role":"user","content":"x"}]})", 415, "unsupported_media_type", {{"Content-Type", "application/x-www-form-urlencoded"}}},
      {"json with charset", "POST", "/v1/completions", R"({"prompt":"a","max_tokens":0})", 400, "invalid_value", {{"Content-Type", "Application/JSON; charset=utf-8"}}},
  };
}

}  // namespace

TEST(ServerErrors, EveryBadRequestGetsAnOpenAIError) {
  server::ServerOptions so = TestServer::loopback();
  so.max_body_bytes = 1u << 20;
  TestServer s(TestServer::small_engine(), so);
  for (const Case& c : cases()) {
    server::HttpResult r;
    if (std::string(c.method) == "GET") r = server::http_get(s.url, c.path, 30, c.headers);
    else {
      server::PostOptions opt;
      opt.headers = c.headers;
      r = server::http_post(s.url, c.path, c.body, opt);
    }
    EXPECT_EQ(r.status, c.status) << c.name << ": " << r.body.substr(0, 300);
    json j = json::parse(r.body, nullptr, false);
    ASSERT_FALSE(j.is_discarded()) << c.name << ": not JSON: " << r.body.substr(0, 200);
    ASSERT_TRUE(j.contains("error") && j["error"].is_object()) << c.name << ": " << r.body.substr(0, 200);
    EXPECT_TRUE(j["error"]["message"].is_string() && !j["error"]["message"].get<std::string>().empty()) << c.name;
    EXPECT_TRUE(j["error"]["type"].is_string()) << c.name;
    EXPECT_TRUE(j["error"].contains("code")) << c.name;
    if (*c.code) {
      EXPECT_EQ(j["error"]["code"], c.code) << c.name << ": " << r.body.substr(0, 300);
    }
  }
  EXPECT_EQ(s.get("/health").status, 200);
  EXPECT_TRUE(s.wait_idle());
  // And a good request still works.
  EXPECT_EQ(s.post("/v1/completions", {{"prompt", "Once"}, {"max_tokens", 2}}).status, 200);
}

TEST(ServerErrors, ApiKeyIsRequiredWhenSet) {
  server::ServerOptions so = TestServer::loopback();
  so.api_key = "sekret";
  TestServer s(TestServer::small_engine(), so);
  const std::string body = R"({"prompt":"Once","max_tokens":2})";
  struct Row {
    const char* name;
    std::vector<std::pair<std::string, std::string>> headers;
    int status;
  } rows[] = {
      {"no key", {}, 401},
      {"wrong key", {{"Authorization", "Bearer nope"}}, 401},
      {"not bearer", {{"Authorization", "sekret"}}, 401},
      {"longer key", {{"Authorization", "Bearer sekretX"}}, 401},
      {"right key", {{"Authorization", "Bearer sekret"}}, 200},
  };
  for (const Row& row : rows) {
    server::PostOptions opt;
    opt.headers = row.headers;
    server::HttpResult r = server::http_post(s.url, "/v1/completions", body, opt);
    EXPECT_EQ(r.status, row.status) << row.name;
    if (row.status == 401) {
      EXPECT_EQ(json::parse(r.body)["error"]["code"], "invalid_api_key") << row.name;
    }
  }
  EXPECT_EQ(server::http_get(s.url, "/v1/models").status, 401);
  EXPECT_EQ(server::http_get(s.url, "/v1/models", 30, {{"Authorization", "Bearer sekret"}}).status, 200);
  EXPECT_EQ(s.get("/health").status, 200);  // health and metrics stay open for probes
}

TEST(ServerErrors, QueueFullIs429WithRetryAfter) {
  EngineConfig ec = TestServer::small_engine();
  ec.max_waiting = 2;
  // Engine not started: queued requests stay queued, so the third is refused.
  TestServer s(ec, TestServer::loopback(), true, /*start_engine=*/false);
  std::vector<std::thread> waiting;
  for (int i = 0; i < 2; ++i)
    waiting.emplace_back([&] { s.post("/v1/completions", {{"prompt", "Once"}, {"max_tokens", 2}}); });
  for (int i = 0; i < 1000 && s.engine->stats().waiting < 2; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(2));
  ASSERT_EQ(s.engine->stats().waiting, 2);
  httplib::Client cli(s.url.host, s.url.port);
  auto r = cli.Post("/v1/completions", R"({"prompt":"Once","max_tokens":2})", "application/json");
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 429);
  EXPECT_EQ(r->get_header_value("Retry-After"), "1");
  EXPECT_EQ(json::parse(r->body)["error"]["code"], "queue_full");
  s.engine->start();  // drain the two that waited
  for (auto& t : waiting) t.join();
  EXPECT_TRUE(s.wait_idle());
}
