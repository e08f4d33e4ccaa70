#include "server/metrics.h"

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

void Histogram::render(std::string& out, const std::string& name, const std::string& help) const {
  std::lock_guard<std::mutex> lk(mu_);
  out += "# HELP " + name + " " + help + "\n# TYPE " + name + " histogram\n";
  uint64_t cum = 0;
  for (size_t i = 0; i < bounds_.size(); ++i) {
    cum += counts_[i];
    out += name + "_bucket{le=\"" + num(bounds_[i]) + "\"} " + std::to_string(cum) + "\n";
  }
  cum += counts_.back();
  out += name + "_bucket{le=\"+Inf\"} " + std::to_string(cum) + "\n";
  out += name + "_sum " + num(sum_) + "\n" + name + "_count " + std::to_string(n_) + "\n";
}

Metrics::Metrics()
    : ttft_(latency_buckets()), tpot_(latency_buckets()), e2e_(latency_buckets()),
      step_(latency_buckets()),
      step_tokens_({1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096}) {}

void Metrics::on_step(const StepRecord& s) {
  step_.observe(s.seconds);
  step_tokens_.observe(static_cast<double>(s.tokens));
  std::lock_guard<std::mutex> lk(mu_);
  steps_by_kind_[s.kind]++;
  if (s.seconds > 0 && s.predicted_s > 0) {
    step_abs_rel_err_sum_ += std::fabs(s.predicted_s - s.seconds) / s.seconds;
    step_err_n_++;
  }
}

void Metrics::on_request_done(const RequestRecord& r) {
  if (r.ttft_s >= 0) ttft_.observe(r.ttft_s);
  if (r.tpot_s >= 0) tpot_.observe(r.tpot_s);
  e2e_.observe(r.e2e_s);
  std::lock_guard<std::mutex> lk(mu_);
  finished_by_reason_[finish_reason_name(r.reason)]++;
}

void Metrics::count_response(const std::string& endpoint, int status) {
  std::lock_guard<std::mutex> lk(mu_);
  responses_[{endpoint, status}]++;
}

void Metrics::set_memory(const std::string& device, const std::map<std::string, int64_t>& bytes) {
  std::lock_guard<std::mutex> lk(mu_);
  mem_device_ = device;
  mem_bytes_ = bytes;
}

std::string Metrics::render(const Engine* engine, bool ready) const {
  std::string out;
  auto gauge = [&](const std::string& name, const std::string& help, double v) {
    out += "# HELP " + name + " " + help + "\n# TYPE " + name + " gauge\n" + name + " " + num(v) + "\n";
  };
  auto counter = [&](const std::string& name, const std::string& help, double v) {
    out += "# HELP " + name + " " + help + "\n# TYPE " + name + " counter\n" + name + " " + num(v) + "\n";
  };
  gauge("spear_ready", "1 once the model is loaded and the engine runs", ready ? 1 : 0);
  EngineStats st;
  if (engine) st = engine->stats();
  gauge("spear_requests_running", "Requests admitted to the engine (prefilling or decoding)", st.running);
  gauge("spear_requests_waiting", "Requests queued for admission", st.waiting);
  gauge("spear_kv_cache_blocks_used", "KV cache blocks in use", st.kv_blocks_used);
  gauge("spear_kv_cache_blocks_total", "KV cache blocks in the pool", st.kv_blocks_total);
  gauge("spear_kv_cache_usage_ratio", "Fraction of KV cache blocks in use",
        st.kv_blocks_total ? static_cast<double>(st.kv_blocks_used) / st.kv_blocks_total : 0);
  counter("spear_prompt_tokens_total", "Prompt tokens received", st.prompt_tokens);
  counter("spear_generation_tokens_total", "Tokens generated", st.generated_tokens);
  counter("spear_preemptions_total", "Sequences preempted (recomputed) for lack of KV memory",
          st.preemptions);
  {
    std::lock_guard<std::mutex> lk(mu_);
    out += "# HELP spear_engine_steps_total Engine steps by kind\n# TYPE spear_engine_steps_total counter\n";
    for (const char* k : {"decode", "prefill", "mixed"}) {
      auto it = steps_by_kind_.find(k);
      out += std::string("spear_engine_steps_total{kind=\"") + k + "\"} " +
             std::to_string(it == steps_by_kind_.end() ? 0 : it->second) + "\n";
    }
    out += "# HELP spear_requests_finished_total Requests finished by reason\n# TYPE spear_requests_finished_total counter\n";
    for (const auto& [reason, n] : finished_by_reason_)
      out += "spear_requests_finished_total{reason=\"" + reason + "\"} " + std::to_string(n) + "\n";
    out += "# HELP spear_http_responses_total HTTP responses by endpoint and status\n# TYPE spear_http_responses_total counter\n";
    for (const auto& [key, n] : responses_)
      out += "spear_http_responses_total{endpoint=\"" + key.first + "\",status=\"" +
             std::to_string(key.second) + "\"} " + std::to_string(n) + "\n";
    if (!mem_bytes_.empty()) {
      out += "# HELP spear_memory_bytes Memory held by use\n# TYPE spear_memory_bytes gauge\n";
      for (const auto& [kind, b] : mem_bytes_)
        out += "spear_memory_bytes{device=\"" + mem_device_ + "\",kind=\"" + kind + "\"} " + std::to_string(b) + "\n";
    }
    gauge("spear_cost_model_mean_abs_rel_error",
          "Mean |predicted - measured| / measured step time of the scheduler's cost model",
          step_err_n_ ? step_abs_rel_err_sum_ / step_err_n_ : 0);
  }
  ttft_.render(out, "spear_time_to_first_token_seconds", "Time to first token");
  tpot_.render(out, "spear_time_per_output_token_seconds", "Time per output token after the first (per request)");
  e2e_.render(out, "spear_e2e_request_latency_seconds", "End-to-end request latency");
  step_.render(out, "spear_engine_step_seconds", "Engine step duration");
  step_tokens_.render(out, "spear_engine_step_tokens", "Token rows per engine step");
  return out;
}

}  // namespace spear::server
