// `spear serve` as a process: a .spear artifact chats with its source model's chat
// template and sampling defaults (tokenizer_config.json and generation_config.json
// travel inside it), --chat-template overrides the template, and the API key and the
// other flags come from a file or the environment (SPEAR_<FLAG>).
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <condition_variable>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <thread>

#include <nlohmann/json.hpp>

#include "compensate/quantize_model.h"
#include "model/spear_artifact.h"
#include "server/http_client.h"
#include "test_paths.h"
#include "tokenizer/tokenizer.h"

using namespace spear;
using namespace spear::test;
using nlohmann::json;
namespace fs = std::filesystem;

namespace {

fs::path scratch() {
  static const fs::path dir = [] {
    fs::path d = fs::temp_directory_path() / ("spear_test_serve_cmd_" + std::to_string(::getpid()));
    fs::create_directories(d);
    std::atexit([] {
      std::error_code ec;
      fs::remove_all(fs::temp_directory_path() / ("spear_test_serve_cmd_" + std::to_string(::getpid())), ec);
    });
    return d;
  }();
  return dir;
}

void spit(const fs::path& p, const std::string& s) {
  std::ofstream f(p, std::ios::binary);
  f << s;
}

// `spear serve ARGS` with ENV added to the environment (every other SPEAR_ variable of
// a serve flag removed), on a free port; waits until it is ready (its log has the line
// `wait_for`: "spear: listening" is before the model is loaded) or has exited.
class ServeProcess {
 public:
  ServeProcess(std::vector<std::string> args, std::map<std::string, std::string> env = {},
               const std::string& wait_for = "spear: ready") {
    int out[2];
    if (pipe(out) != 0) return;
    pid_ = fork();
    if (pid_ == 0) {
      dup2(out[1], 2);
      close(out[0]);
      for (const char* v : {"SPEAR_API_KEY", "SPEAR_API_KEY_FILE", "SPEAR_PORT", "SPEAR_MODEL",
                            "SPEAR_SERVED_MODEL_NAME", "SPEAR_MAX_MODEL_LEN", "SPEAR_CHAT_TEMPLATE"})
        unsetenv(v);
      for (const auto& [k, v] : env) setenv(k.c_str(), v.c_str(), 1);
      std::vector<std::string> argv = {"spear", "serve", "--no-profile", "--max-batch", "4"};
      if (!env.count("SPEAR_PORT")) argv.insert(argv.end(), {"--port", "0"});
      argv.insert(argv.end(), args.begin(), args.end());
      std::vector<char*> c;
      for (std::string& a : argv) c.push_back(a.data());
      c.push_back(nullptr);
      execv(cli_path().c_str(), c.data());
      _exit(127);
    }
    close(out[1]);
    fd_ = out[0];
    char buf[512];
    while (log_.find(wait_for) == std::string::npos) {
      ssize_t n = read(fd_, buf, sizeof buf);
      if (n <= 0) break;
      log_.append(buf, static_cast<size_t>(n));
    }
    size_t p = log_.find("127.0.0.1:");
    if (p != std::string::npos) url_.port = std::atoi(log_.c_str() + p + 10);
    ready_ = log_.find(wait_for) != std::string::npos;
  }
  ~ServeProcess() { exit_code(); }

  bool ready() const { return ready_; }
  pid_t pid() const { return pid_; }
  const std::string& log() const { return log_; }
  const server::Url& url() const { return url_; }

  // Stops the server (SIGTERM) if it runs and returns its exit code (-1: killed by a
  // signal); reads the rest of its log.
  int exit_code() {
    if (pid_ <= 0) return code_;
    if (ready_) kill(pid_, SIGTERM);
    char buf[512];
    ssize_t n;
    while ((n = read(fd_, buf, sizeof buf)) > 0) log_.append(buf, static_cast<size_t>(n));
    int status = 0;
    waitpid(pid_, &status, 0);
    close(fd_);
    pid_ = -1;
    code_ = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
    if (WIFSIGNALED(status)) log_ += "[killed by signal " + std::to_string(WTERMSIG(status)) + "]\n";
    return code_;
  }

  server::HttpResult post(const std::string& path, const json& body, const std::string& key = "") const {
    server::PostOptions o;
    if (!key.empty()) o.headers.push_back({"Authorization", "Bearer " + key});
    return server::http_post(url_, path, body.dump(), o);
  }
  server::HttpResult get(const std::string& path, const std::string& key = "") const {
    std::vector<std::pair<std::string, std::string>> h;
    if (!key.empty()) h.push_back({"Authorization", "Bearer " + key});
    return server::http_get(url_, path, 30, h);
  }

 private:
  pid_t pid_ = -1;
  int fd_ = -1, code_ = -1;
  bool ready_ = false;
  std::string log_;
  server::Url url_;
};

const char* kTemplate =
    "{% for m in messages %}{{ bos_token + '[' + m['role'] + '] ' + m['content'] + eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '[assistant]' }}{% endif %}";

// The tiny model with a chat template and sampling defaults: greedy, 5 new tokens.
fs::path chat_model_dir() {
  static const fs::path dir = [] {
    fs::path d = scratch() / "tiny-chat";
    fs::create_directories(d);
    for (const char* f : {"config.json", "model.safetensors", "tokenizer.json"})
      fs::copy_file(fs::path(tiny_model_dir()) / f, d / f, fs::copy_options::overwrite_existing);
    spit(d / "tokenizer_config.json",
         json{{"bos_token", "<s>"}, {"eos_token", "</s>"}, {"chat_template", kTemplate}}.dump());
    spit(d / "generation_config.json", R"({"bos_token_id": 1, "eos_token_id": 2, "temperature": 0.0,
      "max_new_tokens": 5, "top_p": 0.9, "do_sample": false})");
    return d;
  }();
  return dir;
}

fs::path chat_artifact() {
  static const fs::path path = [] {
    QuantizeOptions q;
    q.verbose = false;
    SpearArtifact a = quantize_model(chat_model_dir().string(), q);
    fs::path p = scratch() / "tiny-chat.spear";
    write_spear(p.string(), a);
    return p;
  }();
  return path;
}

const json kMessages = json::array({{{"role", "system"}, {"content", "Be brief."}}, {{"role", "user"}, {"content", "Hi"}}});

// A process's resident set, in bytes (0 if unknown).
long long rss_bytes(pid_t pid) {
  std::ifstream f("/proc/" + std::to_string(pid) + "/status");
  for (std::string line; std::getline(f, line);)
    if (line.rfind("VmRSS:", 0) == 0) return std::atoll(line.c_str() + 6) * 1024;
  return 0;
}

std::vector<int32_t> ids_of(const server::HttpResult& r) { return json::parse(r.body)["tokens"].get<std::vector<int32_t>>(); }

}  // namespace

TEST(ServeCommand, ArtifactChatsWithTheSourceModelsTemplateAndDefaults) {
  const Tokenizer tok = Tokenizer::from_file(tiny_model_dir() + "/tokenizer.json");
  const std::vector<int32_t> want =
      tok.encode("<s>[system] Be brief.</s><s>[user] Hi</s>[assistant]", /*add_special=*/false);
  std::map<std::string, std::string> answers;
  for (const fs::path& model : {chat_model_dir(), chat_artifact()}) {
    ServeProcess s({"--model", model.string()});
    ASSERT_TRUE(s.ready()) << s.log();
    EXPECT_NE(s.log().find("chat template: jinja"), std::string::npos) << s.log();
    EXPECT_NE(s.log().find("generation defaults: temperature=0 top_p=0.9 max_new_tokens=5"), std::string::npos)
        << s.log();
    // The rendered prompt, as chat encodes it.
    server::HttpResult t = s.post("/tokenize", {{"messages", kMessages}});
    ASSERT_EQ(t.status, 200) << t.body;
    EXPECT_EQ(ids_of(t), want) << model;
    // A chat that omits temperature and max_tokens gets generation_config.json's: greedy
    // (two requests without a seed agree) and 5 tokens.
    json body{{"messages", kMessages}, {"ignore_eos", true}};
    server::HttpResult c1 = s.post("/v1/chat/completions", body), c2 = s.post("/v1/chat/completions", body);
    ASSERT_EQ(c1.status, 200) << c1.body;
    json j1 = json::parse(c1.body), j2 = json::parse(c2.body);
    EXPECT_EQ(j1["usage"]["prompt_tokens"], want.size());
    EXPECT_EQ(j1["usage"]["completion_tokens"], 5);
    EXPECT_EQ(j1["choices"][0]["message"]["content"], j2["choices"][0]["message"]["content"]);
    answers[model.string()] = j1["choices"][0]["message"]["content"];
    // A request's own fields win over the defaults.
    server::HttpResult c3 = s.post("/v1/chat/completions", {{"messages", kMessages}, {"max_tokens", 2}, {"ignore_eos", true}});
    EXPECT_EQ(json::parse(c3.body)["usage"]["completion_tokens"], 2) << c3.body;
    EXPECT_EQ(s.exit_code(), 0) << s.log();
  }
  EXPECT_EQ(answers.size(), 2u);
}

TEST(ServeCommand, ChatTemplateFlagOverridesTheModels) {
  const Tokenizer tok = Tokenizer::from_file(tiny_model_dir() + "/tokenizer.json");
  const fs::path jinja = scratch() / "override.jinja";
  spit(jinja, "{% for m in messages %}{{ '<<' + m['role'] + '>>' + m['content'] }}{% endfor %}"
              "{% if add_generation_prompt %}{{ '<<assistant>>' + eos_token }}{% endif %}");
  const fs::path cfg = scratch() / "override_tokenizer_config.json";
  spit(cfg, json{{"eos_token", "<END>"}, {"chat_template", "{{ messages[-1]['content'] + eos_token }}"}}.dump());
  struct Case {
    fs::path file;
    std::string text;  // what the messages render to
  } cases[] = {
      // A Jinja file takes bos/eos from the model's tokenizer_config.json (kept in the artifact).
      {jinja, "<<system>>Be brief.<<user>>Hi<<assistant>></s>"},
      // A tokenizer_config.json brings its own.
      {cfg, "Hi<END>"},
  };
  for (const Case& c : cases) {
    ServeProcess s({"--model", chat_artifact().string(), "--chat-template", c.file.string()});
    ASSERT_TRUE(s.ready()) << s.log();
    server::HttpResult t = s.post("/tokenize", {{"messages", kMessages}});
    ASSERT_EQ(t.status, 200) << t.body;
    EXPECT_EQ(ids_of(t), tok.encode(c.text, false)) << c.file;
    server::HttpResult r = s.post("/v1/chat/completions", {{"messages", kMessages}, {"max_tokens", 2}, {"ignore_eos", true}});
    EXPECT_EQ(json::parse(r.body)["usage"]["prompt_tokens"], tok.encode(c.text, false).size()) << r.body;
  }
  // An unusable template is an error at start, not a silent fallback.
  const fs::path bad = scratch() / "bad.jinja";
  spit(bad, "{% for m in messages %}{{ m['content'] }");
  ServeProcess b({"--model", chat_artifact().string(), "--chat-template", bad.string()});
  EXPECT_FALSE(b.ready());
  EXPECT_NE(b.exit_code(), 0);
  EXPECT_NE(b.log().find("--chat-template"), std::string::npos) << b.log();
  ServeProcess missing({"--model", chat_artifact().string(), "--chat-template", (scratch() / "nope.jinja").string()});
  EXPECT_NE(missing.exit_code(), 0);
}

TEST(ServeCommand, ApiKeyFromAFileOrTheEnvironment) {
  {
    ServeProcess s({"--model", tiny_model_dir()}, {{"SPEAR_API_KEY", "env-secret"}});
    ASSERT_TRUE(s.ready()) << s.log();
    EXPECT_EQ(s.get("/v1/models").status, 401);
    EXPECT_EQ(s.get("/v1/models", "wrong").status, 401);
    EXPECT_EQ(s.get("/v1/models", "env-secret").status, 200);
    EXPECT_EQ(s.post("/tokenize", {{"prompt", "Hi"}}).status, 401);
    EXPECT_EQ(s.post("/tokenize", {{"prompt", "Hi"}}, "env-secret").status, 200);
    EXPECT_EQ(s.post("/detokenize", {{"tokens", {1}}}).status, 401);
    // Health, version and metrics stay open (load balancers, scrapers).
    EXPECT_EQ(s.get("/version").status, 200);
    EXPECT_EQ(s.get("/health").status, 200);
    EXPECT_EQ(s.exit_code(), 0) << s.log();
  }
  const fs::path key = scratch() / "key.txt";
  spit(key, "  file-secret\n");
  {
    ServeProcess s({"--model", tiny_model_dir(), "--api-key-file", key.string()});
    ASSERT_TRUE(s.ready()) << s.log();
    EXPECT_EQ(s.get("/v1/models").status, 401);
    EXPECT_EQ(s.get("/v1/models", "file-secret").status, 200);
    EXPECT_EQ(s.log().find("file-secret"), std::string::npos) << "the key is never logged";
  }
  {  // The key file can come from the environment too.
    ServeProcess s({"--model", tiny_model_dir()}, {{"SPEAR_API_KEY_FILE", key.string()}});
    ASSERT_TRUE(s.ready()) << s.log();
    EXPECT_EQ(s.get("/v1/models", "file-secret").status, 200);
  }
  {  // Two keys are a mistake, not a guess.
    ServeProcess s({"--model", tiny_model_dir(), "--api-key-file", key.string()}, {{"SPEAR_API_KEY", "env-secret"}});
    EXPECT_NE(s.exit_code(), 0);
    EXPECT_NE(s.log().find("give the API key once"), std::string::npos) << s.log();
  }
  {
    const fs::path empty = scratch() / "empty-key.txt";
    spit(empty, "\n");
    ServeProcess s({"--model", tiny_model_dir(), "--api-key-file", empty.string()});
    EXPECT_NE(s.exit_code(), 0);
    EXPECT_NE(s.log().find("holds no key"), std::string::npos) << s.log();
  }
}

// SIGTERM always drains and exits 0, whichever thread the kernel gives it to. OpenBLAS
// starts a thread before main() that blocks no signal; `spear serve` only blocked the
// signals in its own threads and took them with sigwait(), so whenever the main thread
// was not in sigwait() (loading the model, or the moment after printing "ready") the
// SIGTERM went to that thread and its default action killed the process (about 1 run in
// 10 of ApiKeyFromAFileOrTheEnvironment; about 1 in 2 signalled while loading). Each
// cycle: the signal while loading, as soon as ready, or with streams in flight (cut at
// once, --shutdown-timeout 0: each ends with a final event and [DONE]).
TEST(ServeCommand, SigtermAlwaysDrainsAndExitsZero) {
  const json body{{"prompt", "Once upon a time"}, {"max_tokens", 400}, {"ignore_eos", true}, {"stream", true}};
  for (int cycle = 0; cycle < 12; ++cycle) {
    SCOPED_TRACE("cycle " + std::to_string(cycle));
    const int mode = cycle % 3;  // 0: loading, 1: just ready, 2: streams in flight
    ServeProcess s({"--model", tiny_model_dir(), "--shutdown-timeout", "0"}, {},
                   mode == 0 ? "spear: listening" : "spear: ready");
    ASSERT_TRUE(s.ready()) << s.log();
    constexpr int kStreams = 2;
    std::vector<server::HttpResult> streams(mode == 2 ? kStreams : 0);
    std::vector<std::thread> clients;
    std::mutex mu;
    std::condition_variable cv;
    int streaming = 0;
    for (size_t k = 0; k < streams.size(); ++k)
      clients.emplace_back([&, k] {
        bool first = true;
        server::PostOptions o;
        o.on_event = [&](const std::string&, double) {
          if (first) {
            first = false;
            std::lock_guard<std::mutex> lk(mu);
            ++streaming;
            cv.notify_all();
          }
          return true;
        };
        streams[k] = server::http_post(s.url(), "/v1/completions", body.dump(), o);
        if (first) {  // no event at all: do not keep the main thread waiting
          std::lock_guard<std::mutex> lk(mu);
          ++streaming;
          cv.notify_all();
        }
      });
    {
      std::unique_lock<std::mutex> lk(mu);
      cv.wait(lk, [&] { return streaming == static_cast<int>(streams.size()); });
    }
    EXPECT_EQ(s.exit_code(), 0) << s.log();  // SIGTERM
    EXPECT_NE(s.log().find("spear: stopping (signal 15)"), std::string::npos) << s.log();
    EXPECT_NE(s.log().find("spear: stopped"), std::string::npos) << s.log();
    for (std::thread& t : clients) t.join();
    for (const server::HttpResult& r : streams) {
      ASSERT_EQ(r.status, 200) << r.error << r.body;
      ASSERT_GE(r.events.size(), 2u) << r.body;
      EXPECT_EQ(r.events.back(), "[DONE]");
      // Cut by the drain (the usual case) or, on a fast machine, finished first.
      const json last = json::parse(r.events[r.events.size() - 2]);
      const bool cut = last.contains("error") && last["error"]["code"] == "server_shutdown";
      const bool finished = last.contains("choices") && last["choices"][0]["finish_reason"] == "length";
      EXPECT_TRUE(cut || finished) << last.dump();
    }
  }
}

// Memory a large request used is given back: with glibc's dynamic mmap threshold every
// 8 MB prompt left ~8 MB in a serving thread's malloc arena (+80 MB after 10;
// docs/BENCHMARKS.md). `spear serve` pins the threshold (cmd_serve.cpp).
TEST(ServeCommand, LargeRequestsDoNotAccumulateMemory) {
  ServeProcess s({"--model", tiny_model_dir(), "--max-body-mb", "8", "--http-threads", "4"},
                 {{"GLIBC_TUNABLES", ""}});
  ASSERT_TRUE(s.ready()) << s.log();
  ASSERT_EQ(s.post("/v1/completions", {{"prompt", "Once upon a time"}, {"max_tokens", 2}}).status, 200);
  const long long before = rss_bytes(s.pid());
  ASSERT_GT(before, 0);
  const json big{{"prompt", std::string((8u << 20) - 100, 'a')}};
  for (int i = 0; i < 10; ++i) {
    server::HttpResult r = s.post("/v1/completions", big);
    ASSERT_EQ(r.status, 400) << r.body.substr(0, 200);  // context_length_exceeded, after the body was read
  }
  const double grew_mb = static_cast<double>(rss_bytes(s.pid()) - before) / (1 << 20);
  EXPECT_LT(grew_mb, 16.0) << "RSS grew " << grew_mb << " MB over 10 requests of 8 MB";
  EXPECT_EQ(s.exit_code(), 0) << s.log();
}

TEST(ServeCommand, FlagsFromTheEnvironment) {
  {
    ServeProcess s({}, {{"SPEAR_MODEL", tiny_model_dir()}, {"SPEAR_SERVED_MODEL_NAME", "from-env"},
                        {"SPEAR_MAX_MODEL_LEN", "64"}});
    ASSERT_TRUE(s.ready()) << s.log();
    json m = json::parse(s.get("/v1/models").body);
    EXPECT_EQ(m["data"][0]["id"], "from-env");
    EXPECT_EQ(m["data"][0]["max_model_len"], 64);
    // The model_name label of the metrics is the served name.
    EXPECT_NE(s.get("/metrics").body.find("spear:num_requests_running{model_name=\"from-env\"} 0"), std::string::npos);
  }
  {  // A flag on the command line wins over the environment.
    ServeProcess s({"--served-model-name", "from-flag"}, {{"SPEAR_MODEL", tiny_model_dir()},
                                                           {"SPEAR_SERVED_MODEL_NAME", "from-env"}});
    ASSERT_TRUE(s.ready()) << s.log();
    EXPECT_EQ(json::parse(s.get("/v1/models").body)["data"][0]["id"], "from-flag");
  }
  {  // Only `spear serve` reads them: a stray variable does not break another command.
    const std::string cmd = "SPEAR_PORT=not-a-port SPEAR_MAX_BATCH=x " + cli_path() + " info " + tiny_model_dir() +
                            " --json >/dev/null 2>&1";
    EXPECT_EQ(std::system(cmd.c_str()), 0) << cmd;
  }
  {  // A bad value from the environment is refused like a bad flag.
    ServeProcess s({"--model", tiny_model_dir()}, {{"SPEAR_MAX_CONNECTIONS", "0"}});
    EXPECT_NE(s.exit_code(), 0);
    EXPECT_NE(s.log().find("max-connections"), std::string::npos) << s.log();
  }
}
