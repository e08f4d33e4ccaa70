// The reliability suite of issue 14: each test replays a case a hostile but fair
// client found against `spear serve` and fails if it comes back. Bodies beyond the
// limit however framed (chunked, gzip), unbounded request lines and headers, slow
// clients, per-client connection caps, pipelining, prompts bounded before
// tokenizing, graceful drain, echo text offsets, random seeds.
#include <gtest/gtest.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <set>
#include <thread>

#include "server/api_error.h"
#include "server/json_fields.h"
#include "server/protocol.h"
#include "test_server_fixture.h"

using namespace spear;
using namespace spear::test;
using nlohmann::json;
using clk = std::chrono::steady_clock;

namespace {

double since(clk::time_point t0) { return std::chrono::duration<double>(clk::now() - t0).count(); }

struct Response {
  int status = 0;  // 0: none (connection closed or timed out first)
  std::string head, body;
  json j() const { return json::parse(body, nullptr, false); }
};

// A raw client socket: the test decides every byte.
class Raw {
 public:
  explicit Raw(int port) {
    fd_ = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(static_cast<uint16_t>(port));
    inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
    ok_ = connect(fd_, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0;
  }
  ~Raw() { close(fd_); }
  bool ok() const { return ok_; }
  bool send(const std::string& s) {
    size_t off = 0;
    while (off < s.size()) {
      ssize_t n = ::send(fd_, s.data() + off, s.size() - off, MSG_NOSIGNAL);
      if (n <= 0) return false;
      off += static_cast<size_t>(n);
    }
    return true;
  }
  bool readable(int ms = 0) const {
    pollfd p{fd_, POLLIN, 0};
    return poll(&p, 1, ms) > 0;
  }
  // Reads one response (Content-Length framed, else until close).
  Response read(double timeout_s = 10) {
    Response r;
    auto t0 = clk::now();
    size_t end;
    while ((end = buf_.find("\r\n\r\n")) == std::string::npos) {
      if (!fill(t0, timeout_s)) return r;
    }
    r.head = buf_.substr(0, end);
    buf_.erase(0, end + 4);
    r.status = std::atoi(r.head.c_str() + 9);
    if (r.status == 100) return r;
    size_t cl = lower(r.head).find("content-length:");
    if (cl == std::string::npos) {
      while (fill(t0, timeout_s)) {
      }
      r.body = buf_;
      buf_.clear();
      return r;
    }
    size_t n = std::strtoull(r.head.c_str() + cl + 15, nullptr, 10);
    while (buf_.size() < n)
      if (!fill(t0, timeout_s)) break;
    r.body = buf_.substr(0, n);
    buf_.erase(0, std::min(n, buf_.size()));
    return r;
  }
  // True when the server closed the connection (EOF) within timeout_s.
  bool closed_by_peer(double timeout_s) {
    auto t0 = clk::now();
    while (fill(t0, timeout_s)) {
    }
    return eof_;
  }

 private:
  static std::string lower(std::string s) {
    for (char& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    return s;
  }
  bool fill(clk::time_point t0, double timeout_s) {
    const int left = static_cast<int>((timeout_s - since(t0)) * 1000);
    if (left <= 0 || !readable(left)) return false;
    char b[65536];
    ssize_t n = recv(fd_, b, sizeof b, 0);
    if (n <= 0) {
      eof_ = true;
      return false;
    }
    buf_.append(b, static_cast<size_t>(n));
    return true;
  }
  int fd_ = -1;
  bool ok_ = false, eof_ = false;
  std::string buf_;
};

std::string post_head(const std::string& path, const std::string& extra) {
  return "POST " + path + " HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + extra + "\r\n";
}

// window_bits 15 + 16: a gzip stream (Content-Encoding: gzip); 15: a zlib stream
// (Content-Encoding: deflate).
std::string gzip(const std::string& in, int window_bits = 15 + 16) {
  z_stream zs{};
  deflateInit2(&zs, 9, Z_DEFLATED, window_bits, 8, Z_DEFAULT_STRATEGY);
  std::string out(deflateBound(&zs, in.size()) + 64, '\0');
  zs.next_in = reinterpret_cast<Bytef*>(const_cast<char*>(in.data()));
  zs.avail_in = static_cast<uInt>(in.size());
  zs.next_out = reinterpret_cast<Bytef*>(out.data());
  zs.avail_out = static_cast<uInt>(out.size());
  deflate(&zs, Z_FINISH);
  out.resize(zs.total_out);
  deflateEnd(&zs);
  return out;
}

server::ServerOptions small_limits() {
  server::ServerOptions so = TestServer::loopback();
  so.max_body_bytes = 1u << 20;
  return so;
}

// Sends `chunk` repeatedly (up to `total` bytes) until the server answers; returns
// the bytes sent.
size_t send_until_answered(Raw& c, const std::string& chunk, size_t total) {
  size_t sent = 0;
  while (sent < total && !c.readable(0)) {
    if (!c.send(chunk)) break;
    sent += chunk.size();
  }
  return sent;
}

}  // namespace

TEST(ServerReliability, ChunkedBodyCannotBypassTheBodyLimit) {
  TestServer s(TestServer::small_engine(), small_limits());
  {  // 50 MB announced by nothing but chunks: refused once 1 MB is passed.
    Raw c(s.url.port);
    ASSERT_TRUE(c.send(post_head("/v1/completions", "Transfer-Encoding: chunked\r\n") + "b\r\n{\"prompt\":\"\r\n"));
    const std::string chunk = "10000\r\n" + std::string(0x10000, 'a') + "\r\n";
    const size_t sent = send_until_answered(c, chunk, 50u << 20);
    Response r = c.read();
    EXPECT_EQ(r.status, 413) << r.head;
    EXPECT_EQ(r.j()["error"]["code"], "payload_too_large") << r.body;
    EXPECT_LT(sent, 8u << 20) << "the server kept reading past the limit";
  }
  {  // A chunked body within the limit works (extensions, several chunks, a trailer).
    Raw c(s.url.port);
    const std::string body = R"({"prompt":"Once upon a time","max_tokens":3,"temperature":0})";
    std::string req = post_head("/v1/completions", "Transfer-Encoding: chunked\r\n");
    req += "5;ext=1\r\n" + body.substr(0, 5) + "\r\n";
    req += "A\r\n" + body.substr(5, 10) + "\r\n";
    char hex[16];
    std::snprintf(hex, sizeof hex, "%zx", body.size() - 15);
    req += std::string(hex) + "\r\n" + body.substr(15) + "\r\n0\r\nX-Trailer: 1\r\n\r\n";
    ASSERT_TRUE(c.send(req));
    Response r = c.read();
    EXPECT_EQ(r.status, 200) << r.body;
    EXPECT_EQ(r.j()["usage"]["completion_tokens"], 3);
  }
  {  // Malformed chunk sizes and smuggling-shaped framing are refused.
    Raw c(s.url.port);
    ASSERT_TRUE(c.send(post_head("/v1/completions", "Transfer-Encoding: chunked\r\n") + "zz\r\n"));
    EXPECT_EQ(c.read().status, 400);
    Raw d(s.url.port);
    ASSERT_TRUE(d.send(post_head("/v1/completions", "Transfer-Encoding: chunked\r\nContent-Length: 3\r\n") + "0\r\n\r\n"));
    EXPECT_EQ(d.read().status, 400);
    Raw e(s.url.port);
    ASSERT_TRUE(e.send(post_head("/v1/completions", "Transfer-Encoding: gzip, chunked\r\n")));
    EXPECT_EQ(e.read().status, 501);
  }
  EXPECT_EQ(s.get("/health").status, 200);
}

TEST(ServerReliability, CompressedBodiesAreCountedDecompressed) {
  TestServer s(TestServer::small_engine(), small_limits());
  {  // A gzip bomb: ~10 KB that inflates to 10 MB.
    const std::string bomb = gzip("{\"prompt\":\"" + std::string(10u << 20, 'a') + "\"}");
    ASSERT_LT(bomb.size(), 64u << 10);
    Raw c(s.url.port);
    ASSERT_TRUE(c.send(post_head("/v1/completions", "Content-Encoding: gzip\r\nContent-Length: " +
                                                         std::to_string(bomb.size()) + "\r\n") + bomb));
    Response r = c.read();
    EXPECT_EQ(r.status, 413) << r.body;
    EXPECT_NE(r.body.find("decompressed"), std::string::npos) << r.body;
  }
  {  // gzip within the limit is served.
    const std::string z = gzip(R"({"prompt":"Once upon a time","max_tokens":2})");
    Raw c(s.url.port);
    ASSERT_TRUE(c.send(post_head("/v1/completions", "Content-Encoding: gzip\r\nContent-Length: " +
                                                         std::to_string(z.size()) + "\r\n") + z));
    Response r = c.read();
    EXPECT_EQ(r.status, 200) << r.body;
  }
  for (const char* enc : {"br", "gzip, br", "zstd"}) {  // codings that are not counted: 415
    Raw c(s.url.port);
    ASSERT_TRUE(c.send(post_head("/v1/completions", std::string("Content-Encoding: ") + enc + "\r\nContent-Length: 2\r\n") + "{}"));
    Response r = c.read();
    EXPECT_EQ(r.status, 415) << enc;
    EXPECT_EQ(r.j()["error"]["code"], "unsupported_content_encoding") << enc;
  }
  {  // Corrupt gzip: 400.
    Raw c(s.url.port);
    ASSERT_TRUE(c.send(post_head("/v1/completions", "Content-Encoding: gzip\r\nContent-Length: 4\r\n") + "abcd"));
    EXPECT_EQ(c.read().status, 400);
  }
}

TEST(ServerReliability, RequestLineAndHeadersAreBounded) {
  TestServer s;
  {  // A request line without a newline: refused after 8 KiB, not buffered.
    Raw c(s.url.port);
    const size_t sent = send_until_answered(c, std::string(64 << 10, 'A'), 64u << 20);
    Response r = c.read();
    EXPECT_EQ(r.status, 414) << r.head;
    EXPECT_LT(sent, 16u << 20);
  }
  {  // One endless header line.
    Raw c(s.url.port);
    ASSERT_TRUE(c.send("GET /health HTTP/1.1\r\nX-Long: "));
    send_until_answered(c, std::string(64 << 10, 'b'), 64u << 20);
    EXPECT_EQ(c.read().status, 431);
  }
  {  // Endless short headers.
    Raw c(s.url.port);
    ASSERT_TRUE(c.send("GET /health HTTP/1.1\r\n"));
    std::string many;
    for (int i = 0; i < 1000; ++i) many += "X-H" + std::to_string(i) + ": v\r\n";
    send_until_answered(c, many, 64u << 20);
    EXPECT_EQ(c.read().status, 431);
  }
  EXPECT_EQ(s.get("/health").status, 200);
}

// Issue 14's target: 128 slow clients do not delay a normal request by more than
// 100 ms. The normal request's latency is measured alone, then beside 128 connections
// trickling header lines; the median delay is held to the target (the worst single
// request to 1 s: on a loaded CI machine one request can lose 100 ms to the scheduler
// alone). dev/measure_http_limits.py measures the same against `spear serve`.
TEST(ServerReliability, SlowClientsDoNotStarveANormalClient) {
  server::ServerOptions so = TestServer::loopback();
  so.http_threads = 4;  // far fewer threads than slow clients
  TestServer s(TestServer::small_engine(), so);
  auto normal = [&] {
    auto t0 = clk::now();
    server::HttpResult r = s.post("/v1/completions", {{"prompt", "Once"}, {"max_tokens", 2}});
    EXPECT_EQ(r.status, 200) << r.body;
    return since(t0);
  };
  auto median = [](std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
  };
  normal();  // warm up
  std::vector<double> alone, beside;
  for (int i = 0; i < 9; ++i) alone.push_back(normal());
  constexpr int kSlow = 128;
  std::vector<std::unique_ptr<Raw>> slow;
  for (int i = 0; i < kSlow; ++i) {
    slow.push_back(std::make_unique<Raw>(s.url.port));
    ASSERT_TRUE(slow.back()->ok());
    slow.back()->send("POST /v1/completions HTTP/1.1\r\nHost: x\r\n");
  }
  std::atomic<bool> done{false};
  std::thread trickle([&] {
    while (!done.load()) {
      for (auto& c : slow) c->send("X-Slow: 1\r\n");
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  for (int i = 0; i < 9; ++i) beside.push_back(normal());
  done.store(true);
  trickle.join();
  const double delay = median(beside) - median(alone);
  const double worst = *std::max_element(beside.begin(), beside.end());
  std::printf("normal request alone: median %.1f ms; beside %d slow clients: median %.1f ms, worst %.1f ms; "
              "median delay %+.1f ms (target 100)\n",
              median(alone) * 1e3, kSlow, median(beside) * 1e3, worst * 1e3, delay * 1e3);
  EXPECT_LT(delay, 0.100);
  EXPECT_LT(worst, 1.0);  // was 30 s with 24 slow clients and 16 threads
}

TEST(ServerReliability, HeaderAndBodyDeadlines) {
  server::ServerOptions so = TestServer::loopback();
  so.header_timeout_s = 1;
  so.body_timeout_s = 1;
  TestServer s(TestServer::small_engine(), so);
  Raw h(s.url.port), b(s.url.port), idle(s.url.port);
  auto t0 = clk::now();
  ASSERT_TRUE(h.send("POST /v1/completions HTTP/1.1\r\nHost: x\r\n"));  // the head never ends
  ASSERT_TRUE(b.send(post_head("/v1/completions", "Content-Length: 100\r\n") + "{\"prompt\""));  // the body never ends
  Response rh = h.read(5), rb = b.read(5);
  EXPECT_EQ(rh.status, 408) << rh.head;
  EXPECT_EQ(rb.status, 408) << rb.head;
  EXPECT_LT(since(t0), 3.5);
  EXPECT_TRUE(idle.closed_by_peer(5));  // a connection that sends nothing is closed too
  EXPECT_EQ(s.get("/health").status, 200);
}

TEST(ServerReliability, PerClientConnectionCap) {
  server::ServerOptions so = TestServer::loopback();
  so.max_connections_per_ip = 4;
  TestServer s(TestServer::small_engine(), so);
  std::vector<std::unique_ptr<Raw>> held;
  for (int i = 0; i < 4; ++i) held.push_back(std::make_unique<Raw>(s.url.port));
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  {
    Raw extra(s.url.port);
    ASSERT_TRUE(extra.send("GET /health HTTP/1.1\r\nHost: x\r\n\r\n"));
    Response r = extra.read();
    EXPECT_EQ(r.status, 429) << r.head;
    EXPECT_EQ(r.j()["error"]["code"], "too_many_connections");
  }
  held.pop_back();  // one closes: room for one more
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  Raw again(s.url.port);
  ASSERT_TRUE(again.send("GET /health HTTP/1.1\r\nHost: x\r\n\r\n"));
  EXPECT_EQ(again.read().status, 200);
}

TEST(ServerReliability, PipelinedRequestsAreAnsweredInOrder) {
  TestServer s;
  const std::string body = R"({"prompt":"Once upon a time","max_tokens":4,"temperature":0})";
  std::string reqs = post_head("/v1/completions", "Content-Length: " + std::to_string(body.size()) + "\r\n") + body;
  reqs += "GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n";
  reqs += "GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
  reqs += "GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n";  // after close: never answered
  Raw c(s.url.port);
  ASSERT_TRUE(c.send(reqs));  // one write: all four arrive together
  Response a = c.read(), b = c.read(), h = c.read();
  EXPECT_EQ(a.status, 200);
  EXPECT_EQ(a.j()["object"], "text_completion") << a.body;
  EXPECT_EQ(b.status, 200);
  EXPECT_EQ(b.j()["object"], "list") << b.body;
  EXPECT_EQ(h.status, 200);
  EXPECT_EQ(h.j()["status"], "ok") << h.body;
  EXPECT_TRUE(c.closed_by_peer(5));
}

TEST(ServerReliability, ExpectContinueIsAnswered) {
  TestServer s;
  const std::string body = R"({"prompt":"Once","max_tokens":2})";
  Raw c(s.url.port);
  ASSERT_TRUE(c.send(post_head("/v1/completions", "Expect: 100-continue\r\nContent-Length: " + std::to_string(body.size()) + "\r\n")));
  EXPECT_EQ(c.read(5).status, 100);
  ASSERT_TRUE(c.send(body));
  EXPECT_EQ(c.read(5).status, 200);
}

TEST(ServerReliability, PromptsAreBoundedBeforeTokenizing) {
  TestServer s;
  const int64_t bound = server::prompt_byte_bound(*s.tok, s.engine->max_model_len());
  ASSERT_GT(bound, 0);
  ASSERT_LT(bound, 4 << 20);
  const std::string big(static_cast<size_t>(bound) + 1, 'a');
  auto t0 = clk::now();
  server::HttpResult r = s.post("/v1/completions", {{"prompt", big}, {"max_tokens", 1}});
  EXPECT_EQ(r.status, 400);
  json j = json::parse(r.body);
  EXPECT_EQ(j["error"]["code"], "context_length_exceeded");
  EXPECT_NE(j["error"]["message"].get<std::string>().find("bytes"), std::string::npos) << r.body;
  EXPECT_LT(since(t0), 2.0);
  // Chat: the message contents together.
  server::HttpResult c = s.post("/v1/chat/completions", {{"messages", {{{"role", "user"}, {"content", big}}}}});
  EXPECT_EQ(c.status, 400);
  EXPECT_EQ(json::parse(c.body)["error"]["code"], "context_length_exceeded");
  // Under the byte bound but over the context in tokens: the exact check after tokenizing.
  std::string words;
  while (words.size() < 4000) words += "Once upon a time ";
  ASSERT_LT(static_cast<int64_t>(words.size()), bound);
  server::HttpResult t = s.post("/v1/completions", {{"prompt", words}, {"max_tokens", 1}});
  EXPECT_EQ(t.status, 400);
  EXPECT_NE(json::parse(t.body)["error"]["message"].get<std::string>().find("tokens"), std::string::npos);
}

namespace {
// This process's peak RSS, in bytes, since the last reset_peak_rss().
int64_t peak_rss() {
  std::ifstream f("/proc/self/status");
  std::string line;
  while (std::getline(f, line))
    if (line.rfind("VmHWM:", 0) == 0) return std::atoll(line.c_str() + 6) * 1024;
  return -1;
}
bool reset_peak_rss() { return static_cast<bool>(std::ofstream("/proc/self/clear_refs") << "5"); }
}  // namespace

// A body under the byte limit can parse into far more memory: "[]," is three bytes
// and a JSON value, a heap vector and its slack (~40x); 8 MB of "[[],[],...]" took
// ~300 MB. parse_body now sums what the DOM would take in a SAX pass first and refuses
// (413) what would pass the body limit; and the peak RSS of such a request, and of a
// text prompt near the limit however framed (Content-Length, chunked, gzip, chunked +
// deflate), stays within the same bound.
TEST(ServerReliability, ManySmallJsonValuesAreRefusedBeforeTheDom) {
  const size_t limit = 1u << 20;
  TestServer s(TestServer::small_engine(), small_limits());
  ASSERT_EQ(small_limits().max_body_bytes, limit);
  auto repeated = [&](const std::string& head, const std::string& item) {
    std::string b = head;
    while (b.size() + item.size() + 4 < limit - 64) b += item + ",";
    b += item + "]}";
    return b;
  };
  const std::string text = "{\"prompt\": \"" + std::string(limit - 200, 'a') + "\"}";
  struct Case {
    const char* what;
    std::string body;
    int status;
  };
  const std::vector<Case> cases = {
      {"empty lists", repeated("{\"prompt\": [", "[]"), 413},
      {"one-letter strings", repeated("{\"prompt\": [", "\"a\""), 413},
      {"token ids", repeated("{\"prompt\": [", "0"), 413},
      {"empty objects", repeated("{\"prompt\": \"x\", \"stop\": [", "{}"), 413},
      {"a text prompt", text, 400},  // within the budget; refused by its byte length
  };
  enum class Framing { Length, Chunked, Gzip, ChunkedDeflate };
  const char* framing_names[] = {"length", "chunked", "gzip", "chunked+deflate"};
  auto chunked = [](const std::string& head, const std::string& body) {
    std::string wire = head;
    wire.reserve(head.size() + body.size() + body.size() / 65536 * 16 + 64);
    for (size_t i = 0; i < body.size(); i += 65536) {
      const size_t n = std::min<size_t>(65536, body.size() - i);
      char hex[32];
      std::snprintf(hex, sizeof hex, "%zx\r\n", n);
      wire.append(hex).append(body, i, n).append("\r\n");
    }
    return wire.append("0\r\n\r\n");
  };
  auto request = [&](const std::string& body, Framing f) {
    switch (f) {
      case Framing::Length:
        return post_head("/v1/completions", "Content-Length: " + std::to_string(body.size()) + "\r\n") + body;
      case Framing::Chunked: return chunked(post_head("/v1/completions", "Transfer-Encoding: chunked\r\n"), body);
      case Framing::Gzip: {
        const std::string z = gzip(body);
        return post_head("/v1/completions",
                         "Content-Encoding: gzip\r\nContent-Length: " + std::to_string(z.size()) + "\r\n") + z;
      }
      case Framing::ChunkedDeflate:
        return chunked(post_head("/v1/completions", "Transfer-Encoding: chunked\r\nContent-Encoding: deflate\r\n"),
                       gzip(body, 15));
    }
    return std::string();
  };
  const bool can_measure = reset_peak_rss() && peak_rss() > 0;
  // Two passes, measured in the second: the first large request of a process pays
  // one-time costs (malloc arenas of the serving threads) that are not per request.
  for (int pass = 0; pass < 2; ++pass)
  for (const Case& c : cases) {
    ASSERT_LT(c.body.size(), limit) << c.what;
    for (Framing f : {Framing::Length, Framing::Chunked, Framing::Gzip, Framing::ChunkedDeflate}) {
      const char* framing = framing_names[static_cast<int>(f)];
      // The request is built before the measurement starts: the client shares the
      // process, and its own copies of the body are not the server's.
      const std::string wire = request(c.body, f);
      Raw r(s.url.port);
      reset_peak_rss();
      const int64_t before = peak_rss();
      r.send(wire);
      Response resp = r.read();
      const int64_t grew = peak_rss() - before;
      EXPECT_EQ(resp.status, c.status) << c.what << " " << framing << ": " << resp.body;
      if (c.status == 413) {
        EXPECT_EQ(resp.j()["error"]["code"], "payload_too_large") << c.what << " " << framing << ": " << resp.body;
      }
      if (pass == 0) continue;
      std::printf("%-20s %-16s peak RSS +%.2f MB (body limit %.0f MB)\n", c.what, framing, grew / 1048576.0,
                  limit / 1048576.0);
      // A regression bound, not the measurement: within this test process the heap that
      // earlier requests freed is reused, so the figure moves from run to run (0x-1.1x
      // here; with nothing to reuse it would be the 2x of a fresh server, plus
      // bookkeeping that is larger against a 1 MB limit). A body that parses in full
      // would take ~40x (estimated); a chunked or compressed body grown by appends took
      // ~1x more than a Content-Length one (2.6x-4.9x here). 3x holds every framing to
      // one bound with room for the bookkeeping. dev/measure_http_limits.py measures
      // each case in a fresh `spear serve` (docs/BENCHMARKS.md: 2.0x however framed).
      if (can_measure) {
        EXPECT_LE(grew, static_cast<int64_t>(3 * limit)) << c.what << " " << framing;
      }
    }
  }
  // The budget leaves real requests alone: 64 prompts of 2048 token ids is ~1 MB of
  // JSON and parses under the default 8 MB limit.
  std::string ids = "{\"prompt\": [";
  for (int p = 0; p < 64; ++p) {
    ids += p ? ",[" : "[";
    for (int i = 0; i < 2048; ++i) ids += (i ? ",4" : "1");
    ids += "]";
  }
  ids += "]}";
  EXPECT_NO_THROW(server::parse_body(ids, 64, (8u << 20) + (64u << 10)));
  EXPECT_THROW(server::parse_body(ids, 64, (1u << 20) + (64u << 10)), server::ApiError);
}

TEST(ServerReliability, EchoTextOffsetsSliceTheReturnedText) {
  TestServer s;
  for (int max_tokens : {0, 6}) {
    server::HttpResult r = s.post("/v1/completions", {{"prompt", "Once upon a time"}, {"max_tokens", max_tokens},
                                                      {"echo", true}, {"logprobs", 2}, {"temperature", 0}});
    ASSERT_EQ(r.status, 200) << r.body;
    json ch = json::parse(r.body)["choices"][0];
    const std::string text = ch["text"];
    const json& tokens = ch["logprobs"]["tokens"];
    const json& offs = ch["logprobs"]["text_offset"];
    ASSERT_EQ(tokens.size(), offs.size());
    ASSERT_EQ(tokens.size(), 5u + max_tokens);  // BOS + 4 prompt tokens + generated
    if (max_tokens == 0) {
      EXPECT_EQ(text, "Once upon a time");
    }
    for (size_t i = 0; i < tokens.size(); ++i) {
      const size_t a = offs[i].get<size_t>();
      const size_t b = i + 1 < offs.size() ? offs[i + 1].get<size_t>() : text.size();
      ASSERT_LE(a, b);
      ASSERT_LE(b, text.size());
      EXPECT_EQ(text.substr(a, b - a), tokens[i].get<std::string>()) << "token " << i << " of " << r.body;
    }
  }
}

TEST(ServerReliability, SeedIsRandomUnlessGiven) {
  TestServer s;
  json body{{"prompt", "Once upon a time"}, {"max_tokens", 24}, {"ignore_eos", true}};  // temperature: 1
  std::set<std::string> texts;
  for (int i = 0; i < 6; ++i) {
    server::HttpResult r = s.post("/v1/completions", body);
    ASSERT_EQ(r.status, 200);
    texts.insert(json::parse(r.body)["choices"][0]["text"].get<std::string>());
  }
  EXPECT_GT(texts.size(), 1u) << "identical sampled requests without a seed gave identical answers";
  body["seed"] = 7;
  std::string a = json::parse(s.post("/v1/completions", body).body)["choices"][0]["text"];
  std::string b = json::parse(s.post("/v1/completions", body).body)["choices"][0]["text"];
  EXPECT_EQ(a, b);
  body.erase("seed");
  body["temperature"] = 0;  // greedy: the same without a seed
  a = json::parse(s.post("/v1/completions", body).body)["choices"][0]["text"];
  b = json::parse(s.post("/v1/completions", body).body)["choices"][0]["text"];
  EXPECT_EQ(a, b);
}

TEST(ServerReliability, AllowUnknownFieldsIgnoresThem) {
  server::ServerOptions so = TestServer::loopback();
  so.allow_unknown_fields = true;
  TestServer s(TestServer::small_engine(), so);
  EXPECT_EQ(s.post("/v1/completions", {{"prompt", "Once"}, {"max_tokens", 1}, {"foo", 1}}).status, 200);
  EXPECT_EQ(s.post("/v1/chat/completions", {{"messages", {{{"role", "user"}, {"content", "x"}}}}, {"max_tokens", 1},
                                           {"metadata", {{"a", "b"}}}}).status, 200);
  // Fields that would change the result stay refused.
  server::HttpResult g = s.post("/v1/completions", {{"prompt", "Once"}, {"guided_json", {{"type", "object"}}}});
  EXPECT_EQ(g.status, 400);
  EXPECT_EQ(json::parse(g.body)["error"]["code"], "unsupported_parameter");
}

TEST(ServerReliability, DrainEndsInFlightStreamsWithAFinalEvent) {
  // The engine is not started: requests wait in its queue until the drain cancels them.
  TestServer s(TestServer::small_engine(), TestServer::loopback(), true, /*start_engine=*/false);
  server::HttpResult streamed, plain;
  std::thread a([&] {
    streamed = s.post("/v1/completions", {{"prompt", "Once"}, {"max_tokens", 8}, {"stream", true}});
  });
  std::thread b([&] { plain = s.post("/v1/completions", {{"prompt", "Once"}, {"max_tokens", 8}}); });
  for (int i = 0; i < 1000 && s.engine->stats().waiting < 2; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(2));
  ASSERT_EQ(s.engine->stats().waiting, 2);
  auto t0 = clk::now();
  s.http->drain(0.3);
  const double took = since(t0);
  a.join();
  b.join();
  EXPECT_GE(took, 0.25);
  EXPECT_LT(took, 3.0);
  ASSERT_EQ(streamed.status, 200);
  ASSERT_GE(streamed.events.size(), 2u);
  EXPECT_EQ(streamed.events.back(), "[DONE]");
  json last = json::parse(streamed.events[streamed.events.size() - 2]);
  EXPECT_EQ(last["error"]["code"], "server_shutdown") << streamed.events[streamed.events.size() - 2];
  EXPECT_EQ(plain.status, 503) << plain.body;
  EXPECT_EQ(json::parse(plain.body)["error"]["code"], "server_shutdown");
  // No longer accepting.
  EXPECT_EQ(s.get("/health").status, 0);
}

TEST(ServerReliability, DrainLetsStreamsThatCanFinishFinish) {
  TestServer s;
  server::HttpResult streamed;
  std::atomic<int> seen{0};
  std::thread a([&] {
    server::PostOptions opt;
    opt.on_event = [&](const std::string&, double) {
      seen++;
      return true;
    };
    streamed = s.post("/v1/completions", {{"prompt", "Once"}, {"max_tokens", 200}, {"ignore_eos", true},
                                          {"stream", true}, {"temperature", 0}}, opt);
  });
  for (int i = 0; i < 2000 && seen.load() == 0; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  auto t0 = clk::now();
  s.http->drain(30);
  a.join();
  EXPECT_LT(since(t0), 20.0);  // returns when the stream is done, not after the timeout
  ASSERT_GE(streamed.events.size(), 2u);
  EXPECT_EQ(streamed.events.back(), "[DONE]");
  json last = json::parse(streamed.events[streamed.events.size() - 2]);
  EXPECT_EQ(last["choices"][0]["finish_reason"], "length") << last.dump();
}
