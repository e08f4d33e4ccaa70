#include "server/http_client.h"

#include <strings.h>

#include <chrono>

#include "core/error.h"
#include "server/httplib_config.h"

namespace spear::server {

Url Url::parse(const std::string& url) {
  std::string rest = url;
  const std::string scheme = "http://";
  if (rest.compare(0, scheme.size(), scheme) == 0) rest = rest.substr(scheme.size());
  else SPEAR_CHECK(rest.find("://") == std::string::npos, "only http:// URLs are supported: " + url);
  size_t slash = rest.find('/');
  if (slash != std::string::npos) rest = rest.substr(0, slash);
  Url u;
  size_t colon = rest.rfind(':');
  if (colon == std::string::npos) {
    u.host = rest;
  } else {
    u.host = rest.substr(0, colon);
    try {
      u.port = std::stoi(rest.substr(colon + 1));
    } catch (...) {
      u.port = -1;
    }
  }
  SPEAR_CHECK(!u.host.empty() && u.port > 0 && u.port < 65536, "bad URL: " + url);
  return u;
}

namespace {
using clk = std::chrono::steady_clock;

void configure(httplib::Client& cli, double timeout_s) {
  const time_t sec = static_cast<time_t>(timeout_s);
  const time_t usec = static_cast<time_t>((timeout_s - sec) * 1e6);
  cli.set_connection_timeout(sec, usec);
  cli.set_read_timeout(sec, usec);
  cli.set_write_timeout(sec, usec);
  cli.set_tcp_nodelay(true);
  cli.set_keep_alive(false);
}
}  // namespace

HttpResult http_post(const Url& url, const std::string& path, const std::string& body,
                     const PostOptions& opt) {
  httplib::Client cli(url.host, url.port);
  configure(cli, opt.timeout_s);
  HttpResult out;
  const auto t0 = clk::now();
  std::string buf;
  bool is_sse = false, checked = false;
  httplib::Request req;
  req.method = "POST";
  req.path = path;
  req.body = body;
  bool has_type = false;
  for (const auto& [k, v] : opt.headers) {
    req.set_header(k, v);
    has_type = has_type || strcasecmp(k.c_str(), "Content-Type") == 0;
  }
  if (!has_type) req.set_header("Content-Type", "application/json");
  req.response_handler = [&](const httplib::Response& r) {
    out.status = r.status;
    is_sse = r.get_header_value("Content-Type").find("text/event-stream") == 0;
    checked = true;
    return true;
  };
  req.content_receiver = [&](const char* data, size_t n, uint64_t, uint64_t) {
    if (!checked || !is_sse) {
      out.body.append(data, n);
      return true;
    }
    buf.append(data, n);
    // Events end with a blank line.
    size_t end;
    while ((end = buf.find("\n\n")) != std::string::npos) {
      std::string ev = buf.substr(0, end);
      buf.erase(0, end + 2);
      if (ev.rfind("data: ", 0) != 0) continue;  // comments, other fields
      const double t = std::chrono::duration<double>(clk::now() - t0).count();
      std::string payload = ev.substr(6);
      out.events.push_back(payload);
      out.event_times.push_back(t);
      if (opt.on_event && !opt.on_event(payload, t)) return false;
    }
    return true;
  };
  httplib::Response res;
  httplib::Error err = httplib::Error::Success;
  if (!cli.send(req, res, err)) {
    out.error = httplib::to_string(err);
    if (out.status == 0) out.status = res.status > 0 ? res.status : 0;
  } else {
    out.status = res.status;
    if (out.body.empty() && !is_sse) out.body = res.body;
  }
  out.total_s = std::chrono::duration<double>(clk::now() - t0).count();
  return out;
}

HttpResult http_get(const Url& url, const std::string& path, double timeout_s,
                    const std::vector<std::pair<std::string, std::string>>& headers) {
  httplib::Client cli(url.host, url.port);
  configure(cli, timeout_s);
  httplib::Headers h;
  for (const auto& [k, v] : headers) h.emplace(k, v);
  HttpResult out;
  const auto t0 = clk::now();
  auto r = cli.Get(path.c_str(), h);
  if (r) {
    out.status = r->status;
    out.body = r->body;
  } else {
    out.error = httplib::to_string(r.error());
  }
  out.total_s = std::chrono::duration<double>(clk::now() - t0).count();
  return out;
}

}  // namespace spear::server
