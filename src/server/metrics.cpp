#include "server/metrics.h"

#include <algorithm>
#include <cmath>
#include <cstdio>

namespace spear::server {

namespace {
std::string num(double v) {
  char b[64];
  std::snprintf(b, sizeof b, "%.9g", v);
  return b;
}
std::vector<double> latency_buckets() {
  return {0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
          0.5,   0.75,   1.0,   1.5,  2.5,  5.0,  10.0, 20.0,  40.0, 80.0};
}
// 1, 2, 5, 10, 20, 50, ... as vLLM's token-count histograms.
std::vector<double> token_buckets() {
  std::vector<double> b;
  for (double m = 1; m <= 1e6; m *= 10)
    for (double f : {1.0, 2.0, 5.0}) b.push_back(m * f);
  return b;
}
// A Prometheus label value: backslash, double quote and newline escaped.
std::string label_value(const std::string& v) {
  std::string r;
  for (char c : v) {
    if (c == '\\' || c == '"') r += '\\';
    if (c == '\n') {
      r += "\\n";
      continue;
    }
    r += c;
  }
  return r;
}
}  // namespace

Histogram::Histogram(std::vector<double> bounds)
    : bounds_(std::move(bounds)), counts_(bounds_.size() + 1, 0) {}

void Histogram::observe(double v) {
  if (!std::isfinite(v)) return;
  std::lock_guard<std::mutex> lk(mu_);
  size_t i = 0;
  while (i < bounds_.size() && v > bounds_[i]) ++i;
  counts_[i]++;
  sum_ += v;
  n_++;
}

void Histogram::render(std::string& out, const std::string& name, const std::string& help,
                       const std::string& labels) const {
  std::lock_guard<std::mutex> lk(mu_);
  out += "# HELP " + name + " " + help + "\n# TYPE " + name + " histogram\n";
  const std::string pre = labels.empty() ? "" : labels + ",";
  const std::string own = labels.empty() ? "" : "{" + labels + "}";
  uint64_t cum = 0;
  for (size_t i = 0; i < bounds_.size(); ++i) {
    cum += counts_[i];
    out += name + "_bucket{" + pre + "le=\"" + num(bounds_[i]) + "\"} " + std::to_string(cum) + "\n";
  }
  cum += counts_.back();
  out += name + "_bucket{" + pre + "le=\"+Inf\"} " + std::to_string(cum) + "\n";
  out += name + "_sum" + own + " " + num(sum_) + "\n" + name + "_count" + own + " " + std::to_string(n_) + "\n";
}

Metrics::Metrics()
    : ttft_(latency_buckets()), tpot_(latency_buckets()), e2e_(latency_buckets()),
      step_(latency_buckets()),
      step_tokens_({1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096}),
      req_prompt_tokens_(token_buckets()), req_gen_tokens_(token_buckets()) {
  set_model_name("");
}

void Metrics::on_step(const StepRecord& s) {
  step_.observe(s.seconds);
  step_tokens_.observe(static_cast<double>(s.tokens));
  std::lock_guard<std::mutex> lk(mu_);
  steps_by_kind_[s.kind]++;
  phase_s_["schedule"] += s.schedule_s;
  phase_s_["prepare"] += s.prepare_s;
  phase_s_["other"] += s.other_s;
  if (s.device_s >= 0) {
    const double copy = std::max(0.0, s.copy_s);
    phase_s_["forward_device"] += s.device_s;
    phase_s_["forward_copy"] += copy;
    phase_s_["forward_host"] += std::max(0.0, s.seconds - s.device_s - copy);
  } else {
    phase_s_["forward_host"] += s.seconds;  // the CPU engine: the forward is host work
  }
  if (s.seconds > 0 && s.predicted_s > 0) {
    step_abs_rel_err_sum_ += std::fabs(s.predicted_s - s.seconds) / s.seconds;
    step_err_n_++;
  }
}

void Metrics::on_step_sampled(double seconds) {
  std::lock_guard<std::mutex> lk(mu_);
  phase_s_["sample"] += seconds;
}

void Metrics::on_request_done(const RequestRecord& r) {
  if (r.ttft_s >= 0) ttft_.observe(r.ttft_s);
  if (r.tpot_s >= 0) tpot_.observe(r.tpot_s);
  e2e_.observe(r.e2e_s);
  req_prompt_tokens_.observe(static_cast<double>(r.prompt_tokens));
  req_gen_tokens_.observe(static_cast<double>(r.generated));
  std::lock_guard<std::mutex> lk(mu_);
  finished_by_reason_[finish_reason_name(r.reason)]++;
}

void Metrics::count_response(const std::string& endpoint, int status) {
  std::lock_guard<std::mutex> lk(mu_);
  responses_[{endpoint, status}]++;
}

void Metrics::set_model_name(const std::string& name) {
  std::lock_guard<std::mutex> lk(mu_);
  model_label_ = "model_name=\"" + label_value(name) + "\"";
}

void Metrics::set_memory(const std::string& device, const std::map<std::string, int64_t>& bytes) {
  std::lock_guard<std::mutex> lk(mu_);
  mem_device_ = device;
  mem_bytes_ = bytes;
}

std::string Metrics::render(const Engine* engine, bool ready) const {
  std::string out;
  std::string model;
  {
    std::lock_guard<std::mutex> lk(mu_);
    model = model_label_;
  }
  // `name{model_name="..",extra} value`
  auto series = [&](const std::string& name, const std::string& extra, const std::string& v) {
    out += name + "{" + model + (extra.empty() ? "" : "," + extra) + "} " + v + "\n";
  };
  auto head = [&](const std::string& name, const std::string& help, const char* type) {
    out += "# HELP " + name + " " + help + "\n# TYPE " + name + " " + type + "\n";
  };
  auto gauge = [&](const std::string& name, const std::string& help, double v) {
    head(name, help, "gauge");
    series(name, "", num(v));
  };
  auto counter = [&](const std::string& name, const std::string& help, double v) {
    head(name, help, "counter");
    series(name, "", num(v));
  };
  gauge("spear:ready", "1 once the model is loaded and the engine runs", ready ? 1 : 0);
  EngineStats st;
  if (engine) st = engine->stats();
  gauge("spear:num_requests_running", "Requests admitted to the engine (prefilling or decoding)", st.running);
  gauge("spear:num_requests_waiting", "Requests queued for admission", st.waiting);
  gauge("spear:kv_cache_usage_perc", "Fraction of KV cache blocks in use (1 = all)",
        st.kv_blocks_total ? static_cast<double>(st.kv_blocks_used) / st.kv_blocks_total : 0);
  gauge("spear:kv_cache_blocks_used", "KV cache blocks in use", st.kv_blocks_used);
  gauge("spear:kv_cache_blocks_total", "KV cache blocks in the pool", st.kv_blocks_total);
  gauge("spear:kv_cache_blocks_cached",
        "KV cache blocks held by the prefix cache (in use or evictable; evictable ones count as free)",
        st.kv_blocks_cached);
  counter("spear:prefix_cache_queries_total",
          "Prompt tokens looked up in the prefix cache (at a request's first admission)", st.prefix_cache_queries);
  counter("spear:prefix_cache_hits_total", "Prompt tokens found in the prefix cache (not computed)",
          st.prefix_cache_hits);
  counter("spear:prompt_tokens_total", "Prompt tokens received", st.prompt_tokens);
  counter("spear:generation_tokens_total", "Tokens generated", st.generated_tokens);
  counter("spear:num_preemptions_total", "Sequences preempted (recomputed) for lack of KV memory",
          st.preemptions);
  {
    std::lock_guard<std::mutex> lk(mu_);
    head("spear:request_success_total", "Requests finished, by reason (abort: cancelled)", "counter");
    std::map<std::string, uint64_t> by_reason{{"stop", 0}, {"length", 0}, {"abort", 0}, {"error", 0}};
    for (const auto& [reason, n] : finished_by_reason_) by_reason[reason == "cancelled" ? "abort" : reason] += n;
    for (const auto& [reason, n] : by_reason)
      series("spear:request_success_total", "finished_reason=\"" + reason + "\"", std::to_string(n));
    head("spear:engine_steps_total", "Engine steps by kind", "counter");
    for (const char* k : {"decode", "prefill", "mixed"}) {
      auto it = steps_by_kind_.find(k);
      series("spear:engine_steps_total", std::string("kind=\"") + k + "\"",
             std::to_string(it == steps_by_kind_.end() ? 0 : it->second));
    }
    head("spear:http_responses_total", "HTTP responses by endpoint and status", "counter");
    for (const auto& [key, n] : responses_)
      series("spear:http_responses_total",
             "endpoint=\"" + key.first + "\",status=\"" + std::to_string(key.second) + "\"", std::to_string(n));
    if (!mem_bytes_.empty()) {
      head("spear:memory_bytes", "Memory held by use", "gauge");
      for (const auto& [kind, b] : mem_bytes_)
        series("spear:memory_bytes", "device=\"" + mem_device_ + "\",kind=\"" + kind + "\"", std::to_string(b));
    }
    head("spear:engine_phase_seconds_total",
         "Engine thread seconds by phase of a step (forward_device: the GPU running it; forward_host: the "
         "backend's host work, or the whole forward on the CPU)",
         "counter");
    for (const char* ph : {"schedule", "prepare", "forward_device", "forward_copy", "forward_host", "sample", "other"}) {
      auto it = phase_s_.find(ph);
      series("spear:engine_phase_seconds_total", std::string("phase=\"") + ph + "\"",
             num(it == phase_s_.end() ? 0.0 : it->second));
    }
    gauge("spear:cost_model_mean_abs_rel_error",
          "Mean |predicted - measured| / measured step time of the scheduler's cost model",
          step_err_n_ ? step_abs_rel_err_sum_ / step_err_n_ : 0);
  }
  ttft_.render(out, "spear:time_to_first_token_seconds", "Time to first token", model);
  tpot_.render(out, "spear:time_per_output_token_seconds", "Time per output token after the first (per request)", model);
  e2e_.render(out, "spear:e2e_request_latency_seconds", "End-to-end request latency", model);
  step_tokens_.render(out, "spear:iteration_tokens_total", "Token rows per engine step", model);
  req_prompt_tokens_.render(out, "spear:request_prompt_tokens", "Prompt tokens per finished request", model);
  req_gen_tokens_.render(out, "spear:request_generation_tokens", "Generated tokens per finished request", model);
  step_.render(out, "spear:engine_step_seconds", "Engine step duration", model);
  return out;
}

}  // namespace spear::server
