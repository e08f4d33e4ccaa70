#pragma once
// A small HTTP client for spear's own tools (bench-serve) and tests: one POST whose
// response is read as it arrives, split into server-sent events, each stamped with
// its arrival time.
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace spear::server {

struct Url {
  std::string host = "127.0.0.1";
  int port = 80;
  // "http://host:port" (path ignored); throws spear::Error otherwise.
  static Url parse(const std::string& url);
};

struct HttpResult {
  int status = 0;            // 0: no response (connection failed / cut)
  std::string error;         // transport error, if any
  std::string body;          // whole body (non-SSE, or an error response)
  std::vector<std::string> events;  // SSE `data:` payloads, in order
  std::vector<double> event_times;  // seconds since the request started
  double total_s = 0;
};

struct PostOptions {
  std::vector<std::pair<std::string, std::string>> headers;
  double timeout_s = 300;
  // Called for each SSE event as it arrives; return false to hang up early.
  std::function<bool(const std::string& data, double t)> on_event;
};

HttpResult http_post(const Url& url, const std::string& path, const std::string& body,
                     const PostOptions& opt = {});
HttpResult http_get(const Url& url, const std::string& path, double timeout_s = 30,
                    const std::vector<std::pair<std::string, std::string>>& headers = {});

}  // namespace spear::server
