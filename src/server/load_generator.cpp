#include "server/load_generator.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <random>
#include <thread>

#include "core/error.h"
#include "server/http_client.h"

namespace spear::server {

using nlohmann::json;

double percentile(std::vector<double> v, double q) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const double pos = q / 100.0 * static_cast<double>(v.size() - 1);
  const size_t lo = static_cast<size_t>(std::floor(pos));
  const size_t hi = std::min(lo + 1, v.size() - 1);
  return v[lo] + (v[hi] - v[lo]) * (pos - static_cast<double>(lo));
}

Summary summarize(std::vector<double> v) {
  Summary s;
  if (v.empty()) return s;
  double sum = 0;
  for (double x : v) sum += x;
  s.mean = sum / static_cast<double>(v.size());
  s.median = percentile(v, 50);
  s.p99 = percentile(v, 99);
  return s;
}

namespace {
using clk = std::chrono::steady_clock;

RequestStats one_request(const Url& url, const LoadConfig& cfg, const std::string& model,
                         const std::vector<int32_t>& prompt, int64_t out_len, double start_s) {
  RequestStats r;
  r.start_s = start_s;
  r.prompt_tokens = static_cast<int64_t>(prompt.size());
  json body{{"model", model},
            {"prompt", prompt},
            {"max_tokens", out_len},
            {"temperature", cfg.temperature},
            {"top_p", cfg.top_p},
            {"ignore_eos", true},
            {"stream", true},
            {"stream_options", {{"include_usage", true}}}};
  PostOptions opt;
  opt.timeout_s = cfg.timeout_s;
  if (!cfg.api_key.empty()) opt.headers.push_back({"Authorization", "Bearer " + cfg.api_key});
  double first = -1, last = -1;
  int64_t usage_tokens = -1;
  opt.on_event = [&](const std::string& data, double t) {
    if (data == "[DONE]") return true;
    json j = json::parse(data, nullptr, false);
    if (j.is_discarded()) return true;
    if (j.contains("usage") && j["usage"].is_object())
      usage_tokens = j["usage"].value("completion_tokens", int64_t{-1});
    if (j.contains("choices") && j["choices"].is_array() && !j["choices"].empty()) {
      const json& c = j["choices"][0];
      // A token chunk (the final chunk carries only finish_reason).
      if (c.contains("finish_reason") && !c["finish_reason"].is_null() && c.value("text", "").empty())
        return true;
      if (first < 0) first = t;
      else r.itl_s.push_back(t - last);
      last = t;
    }
    if (j.contains("error")) r.error = j["error"].dump();
    return true;
  };
  HttpResult h = http_post(url, "/v1/completions", body.dump(), opt);
  r.status = h.status;
  r.e2e_s = h.total_s;
  if (h.status != 200) {
    r.error = h.error.empty() ? h.body.substr(0, 300) : h.error;
    return r;
  }
  r.output_tokens = usage_tokens >= 0 ? usage_tokens : static_cast<int64_t>(r.itl_s.size()) + (first >= 0);
  if (first < 0 || !r.error.empty() || !h.error.empty()) {
    if (r.error.empty()) r.error = h.error.empty() ? "no tokens streamed" : h.error;
    return r;
  }
  r.ttft_s = first;
  r.tpot_s = r.output_tokens > 1 ? (r.e2e_s - r.ttft_s) / static_cast<double>(r.output_tokens - 1) : 0;
  r.ok = true;
  return r;
}
}  // namespace

namespace {
// Sums of the samples of `metric` in Prometheus text, by the value of `label` ("" = all in one).
std::map<std::string, double> scrape(const std::string& text, const std::string& metric, const std::string& label) {
  std::map<std::string, double> out;
  size_t pos = 0;
  while (pos < text.size()) {
    size_t eol = text.find('\n', pos);
    if (eol == std::string::npos) eol = text.size();
    const std::string line = text.substr(pos, eol - pos);
    pos = eol + 1;
    if (line.rfind(metric + "{", 0) != 0 && line.rfind(metric + " ", 0) != 0) continue;
    std::string key;
    if (!label.empty()) {
      const size_t l = line.find(label + "=\"");
      if (l == std::string::npos) continue;
      const size_t v0 = l + label.size() + 2, v1 = line.find('"', v0);
      if (v1 == std::string::npos) continue;
      key = line.substr(v0, v1 - v0);
    }
    const size_t sp = line.rfind(' ');
    if (sp == std::string::npos) continue;
    out[key] += std::strtod(line.c_str() + sp + 1, nullptr);
  }
  return out;
}
}  // namespace

LoadReport run_load(const LoadConfig& cfg) {
  SPEAR_CHECK(cfg.requests >= 1 && cfg.requests <= 1000000, "--requests must be in [1, 1e6]");
  SPEAR_CHECK(cfg.input_len >= 1 && cfg.output_len >= 1, "lengths must be >= 1");
  SPEAR_CHECK(cfg.range_ratio >= 0 && cfg.range_ratio < 1, "--range-ratio must be in [0, 1)");
  SPEAR_CHECK(cfg.concurrency >= 0, "--concurrency must be >= 0");
  SPEAR_CHECK(cfg.shared_prefix_len >= 0, "--shared-prefix-len must be >= 0");
  const Url url = Url::parse(cfg.url);
  std::vector<std::pair<std::string, std::string>> hdr;
  if (!cfg.api_key.empty()) hdr.push_back({"Authorization", "Bearer " + cfg.api_key});
  HttpResult models = http_get(url, "/v1/models", 30, hdr);
  SPEAR_CHECK(models.status == 200, "cannot list models at " + cfg.url + ": " +
                                        (models.error.empty() ? models.body : models.error));
  json mj = json::parse(models.body, nullptr, false);
  SPEAR_CHECK(!mj.is_discarded() && mj.contains("data") && mj["data"].is_array() && !mj["data"].empty(),
              "unexpected /v1/models answer: " + models.body.substr(0, 200));
  const std::string model = cfg.model.empty() ? mj["data"][0].value("id", "") : cfg.model;
  const int64_t vocab = mj["data"][0].value("vocab_size", int64_t{32000});
  const int64_t ctx = mj["data"][0].value("max_model_len", int64_t{1} << 30);

  struct Scraped {
    std::map<std::string, double> phases;
    double steps = 0, prefix_queries = -1, prefix_hits = -1;
  };
  auto metrics_now = [&](Scraped* out) {
    HttpResult m = http_get(url, "/metrics", 30, hdr);
    if (m.status != 200) return false;
    out->phases = scrape(m.body, "spear:engine_phase_seconds_total", "phase");
    const auto st = scrape(m.body, "spear:engine_steps_total", "");
    out->steps = st.count("") ? st.at("") : 0;
    const auto q = scrape(m.body, "spear:prefix_cache_queries_total", "");
    const auto h = scrape(m.body, "spear:prefix_cache_hits_total", "");
    if (q.count("") && h.count("")) {
      out->prefix_queries = q.at("");
      out->prefix_hits = h.at("");
    }
    return !out->phases.empty();
  };
  Scraped before;
  const bool profiling = cfg.profile && metrics_now(&before);
  if (cfg.profile && !profiling)
    std::fprintf(stderr, "spear: --profile: the server exports no spear:engine_phase_seconds_total; no profile\n");

  // Workload, fixed by the seed: lengths, prompt ids, arrival times.
  std::mt19937_64 rng(cfg.seed);
  auto sample_len = [&](int64_t len) {
    if (cfg.range_ratio <= 0) return len;
    std::uniform_int_distribution<int64_t> d(std::max<int64_t>(1, static_cast<int64_t>(len * (1 - cfg.range_ratio))),
                                             std::max<int64_t>(1, static_cast<int64_t>(len * (1 + cfg.range_ratio))));
    return d(rng);
  };
  // Ids from a band that avoids the lowest (usually special) ids.
  const int32_t lo_id = static_cast<int32_t>(std::min<int64_t>(vocab - 1, 3));
  std::uniform_int_distribution<int32_t> tok(lo_id, static_cast<int32_t>(vocab - 1));
  std::exponential_distribution<double> gap(cfg.rate > 0 && std::isfinite(cfg.rate) ? cfg.rate : 1.0);
  std::vector<std::vector<int32_t>> prompts(cfg.requests);
  std::vector<int64_t> outs(cfg.requests);
  std::vector<double> arrivals(cfg.requests);
  std::vector<int32_t> shared(static_cast<size_t>(std::min<int64_t>(cfg.shared_prefix_len, ctx)));
  for (int32_t& id : shared) id = tok(rng);
  double t = 0;
  for (int64_t i = 0; i < cfg.requests; ++i) {
    int64_t in = sample_len(cfg.input_len), out = sample_len(cfg.output_len);
    if (in + out > ctx) in = std::max<int64_t>(1, ctx - out);
    prompts[i].resize(in);
    for (int64_t k = 0; k < in; ++k)
      prompts[i][k] = k < static_cast<int64_t>(shared.size()) ? shared[k] : tok(rng);
    outs[i] = out;
    arrivals[i] = t;
    if (cfg.rate > 0 && std::isfinite(cfg.rate)) t += gap(rng);
  }

  LoadReport rep;
  rep.cfg = cfg;
  rep.requests.resize(cfg.requests);
  std::mutex mu;
  std::condition_variable cv;
  int64_t in_flight = 0;
  std::vector<std::thread> threads;
  const auto t0 = clk::now();
  for (int64_t i = 0; i < cfg.requests; ++i) {
    std::this_thread::sleep_until(t0 + std::chrono::duration_cast<clk::duration>(std::chrono::duration<double>(arrivals[i])));
    if (cfg.concurrency > 0) {
      std::unique_lock<std::mutex> lk(mu);
      cv.wait(lk, [&] { return in_flight < cfg.concurrency; });
    }
    {
      std::lock_guard<std::mutex> lk(mu);
      ++in_flight;
    }
    const double start = std::chrono::duration<double>(clk::now() - t0).count();
    threads.emplace_back([&, i, start] {
      RequestStats r = one_request(url, cfg, model, prompts[i], outs[i], start);
      std::lock_guard<std::mutex> lk(mu);
      rep.requests[i] = std::move(r);
      --in_flight;
      cv.notify_all();
    });
  }
  for (std::thread& th : threads) th.join();
  rep.duration_s = std::chrono::duration<double>(clk::now() - t0).count();
  if (profiling) {
    Scraped after;
    if (metrics_now(&after)) {
      for (const char* ph : {"schedule", "prepare", "forward_device", "forward_copy", "forward_host", "sample", "other"})
        rep.phases.push_back({ph, after.phases[ph] - before.phases[ph]});
      rep.steps = after.steps - before.steps;
      if (before.prefix_queries >= 0 && after.prefix_queries >= 0) {
        rep.prefix_queries = after.prefix_queries - before.prefix_queries;
        rep.prefix_hits = after.prefix_hits - before.prefix_hits;
      }
    }
  }

  std::vector<double> ttft, tpot, itl, e2e;
  for (const RequestStats& r : rep.requests) {
    if (!r.ok) {
      rep.failed++;
      continue;
    }
    rep.completed++;
    rep.input_tokens += r.prompt_tokens;
    rep.output_tokens += r.output_tokens;
    ttft.push_back(r.ttft_s * 1e3);
    if (r.output_tokens > 1) tpot.push_back(r.tpot_s * 1e3);
    for (double x : r.itl_s) itl.push_back(x * 1e3);
    e2e.push_back(r.e2e_s * 1e3);
    if (r.ttft_s * 1e3 <= cfg.slo_ttft_ms && r.tpot_s * 1e3 <= cfg.slo_tpot_ms) rep.good++;
  }
  rep.ttft_ms = summarize(ttft);
  rep.tpot_ms = summarize(tpot);
  rep.itl_ms = summarize(itl);
  rep.e2e_ms = summarize(e2e);
  rep.request_throughput = rep.completed / rep.duration_s;
  rep.output_throughput = rep.output_tokens / rep.duration_s;
  rep.goodput = rep.good / rep.duration_s;
  return rep;
}

nlohmann::json LoadReport::to_json(bool per_request) const {
  auto s = [](const Summary& x) { return json{{"mean", x.mean}, {"median", x.median}, {"p99", x.p99}}; };
  json j{{"url", cfg.url},
         {"rate", std::isfinite(cfg.rate) && cfg.rate > 0 ? json(cfg.rate) : json("inf")},
         {"concurrency", cfg.concurrency},
         {"requests", cfg.requests},
         {"input_len", cfg.input_len},
         {"output_len", cfg.output_len},
         {"range_ratio", cfg.range_ratio},
         {"shared_prefix_len", cfg.shared_prefix_len},
         {"seed", cfg.seed},
         {"temperature", cfg.temperature},
         {"top_p", cfg.top_p},
         {"slo_ttft_ms", cfg.slo_ttft_ms},
         {"slo_tpot_ms", cfg.slo_tpot_ms},
         {"duration_s", duration_s},
         {"completed", completed},
         {"failed", failed},
         {"input_tokens", input_tokens},
         {"output_tokens", output_tokens},
         {"request_throughput", request_throughput},
         {"output_throughput", output_throughput},
         {"goodput", goodput},
         {"slo_attainment", completed + failed ? static_cast<double>(good) / (completed + failed) : 0},
         {"ttft_ms", s(ttft_ms)},
         {"tpot_ms", s(tpot_ms)},
         {"itl_ms", s(itl_ms)},
         {"e2e_ms", s(e2e_ms)}};
  if (!phases.empty()) {
    json p = json::object();
    for (const auto& [name, sec] : phases) p[name] = sec;
    j["engine_profile"] = {{"seconds_by_phase", p}, {"steps", steps}};
    if (prefix_queries >= 0)
      j["engine_profile"]["prefix_cache"] = {{"queries", prefix_queries}, {"hits", prefix_hits},
                                             {"hit_rate", prefix_queries > 0 ? prefix_hits / prefix_queries : 0.0}};
  }
  if (per_request) {
    json rs = json::array();
    for (const RequestStats& r : requests)
      rs.push_back({{"ok", r.ok}, {"status", r.status}, {"error", r.error}, {"start_s", r.start_s},
                    {"prompt_tokens", r.prompt_tokens}, {"output_tokens", r.output_tokens},
                    {"ttft_s", r.ttft_s}, {"tpot_s", r.tpot_s}, {"e2e_s", r.e2e_s}});
    j["per_request"] = rs;
  }
  return j;
}

std::string LoadReport::table() const {
  char b[4096];
  std::string rate = std::isfinite(cfg.rate) && cfg.rate > 0 ? std::to_string(cfg.rate) : "inf";
  std::snprintf(
      b, sizeof b,
      "============ Serving Benchmark Result ============\n"
      "%-40s %10s\n%-40s %10lld\n%-40s %10lld\n%-40s %10lld\n%-40s %10.2f\n"
      "%-40s %10lld\n%-40s %10lld\n%-40s %10.2f\n%-40s %10.2f\n%-40s %10.2f\n"
      "%-40s %9.1f%%\n"
      "---------------Time to First Token----------------\n"
      "%-40s %10.2f\n%-40s %10.2f\n%-40s %10.2f\n"
      "-----Time per Output Token (excl. 1st token)------\n"
      "%-40s %10.2f\n%-40s %10.2f\n%-40s %10.2f\n"
      "---------------Inter-token Latency----------------\n"
      "%-40s %10.2f\n%-40s %10.2f\n%-40s %10.2f\n"
      "----------------End-to-end Latency----------------\n"
      "%-40s %10.2f\n%-40s %10.2f\n%-40s %10.2f\n"
      "==================================================\n",
      "Request rate (req/s):", rate.c_str(), "Max concurrency:", static_cast<long long>(cfg.concurrency),
      "Successful requests:", static_cast<long long>(completed), "Failed requests:", static_cast<long long>(failed),
      "Benchmark duration (s):", duration_s, "Total input tokens:", static_cast<long long>(input_tokens),
      "Total generated tokens:", static_cast<long long>(output_tokens), "Request throughput (req/s):", request_throughput,
      "Output token throughput (tok/s):", output_throughput,
      ("Goodput (req/s, TTFT<=" + std::to_string(static_cast<int>(cfg.slo_ttft_ms)) + "ms, TPOT<=" +
       std::to_string(static_cast<int>(cfg.slo_tpot_ms)) + "ms):").c_str(),
      goodput, "SLO attainment:", completed + failed ? 100.0 * good / (completed + failed) : 0.0,
      "Mean TTFT (ms):", ttft_ms.mean, "Median TTFT (ms):", ttft_ms.median, "P99 TTFT (ms):", ttft_ms.p99,
      "Mean TPOT (ms):", tpot_ms.mean, "Median TPOT (ms):", tpot_ms.median, "P99 TPOT (ms):", tpot_ms.p99,
      "Mean ITL (ms):", itl_ms.mean, "Median ITL (ms):", itl_ms.median, "P99 ITL (ms):", itl_ms.p99,
      "Mean E2EL (ms):", e2e_ms.mean, "Median E2EL (ms):", e2e_ms.median, "P99 E2EL (ms):", e2e_ms.p99);
  std::string out = b;
  if (!phases.empty()) {
    // Where the engine thread's time went during the run, against the run's wall time.
    double busy = 0;
    for (const auto& [name, sec] : phases) busy += sec;
    out += "--------Engine loop profile (server side)---------\n";
    char row[160];
    std::snprintf(row, sizeof row, "%-28s %10s %9s %10s\n", "phase", "seconds", "% wall", "ms/step");
    out += row;
    for (const auto& [name, sec] : phases) {
      std::snprintf(row, sizeof row, "%-28s %10.3f %8.1f%% %10.3f\n", name.c_str(), sec, 100.0 * sec / duration_s,
                    steps > 0 ? 1e3 * sec / steps : 0.0);
      out += row;
    }
    std::snprintf(row, sizeof row, "%-28s %10.3f %8.1f%% %10.3f\n", "engine busy (sum)", busy, 100.0 * busy / duration_s,
                  steps > 0 ? 1e3 * busy / steps : 0.0);
    out += row;
    std::snprintf(row, sizeof row, "%-28s %10.0f\n", "engine steps", steps);
    out += row;
    if (prefix_queries >= 0) {
      std::snprintf(row, sizeof row, "%-28s %9.1f%% (%.0f of %.0f prompt tokens)\n", "prefix cache hit rate",
                    prefix_queries > 0 ? 100.0 * prefix_hits / prefix_queries : 0.0, prefix_hits, prefix_queries);
      out += row;
    }
    out += "==================================================\n";
  }
  return out;
}

}  // namespace spear::server
