#pragma once
// Server metrics in the Prometheus text format (GET /metrics): requests running
// and waiting, tokens in and out, TTFT / TPOT / end-to-end histograms, KV blocks in
// use, engine steps by kind, preemptions, HTTP responses by status. Fed by the
// engine (as its EngineObserver) and by the HTTP layer.
// Names are vLLM's with the prefix `spear:` instead of `vllm:` (so that vLLM's
// Grafana dashboards work with the prefix replaced), every series labelled
// model_name="<served model name>": spear:num_requests_running, ..._waiting,
// spear:kv_cache_usage_perc, spear:prompt_tokens_total, spear:generation_tokens_total,
// spear:num_preemptions_total, spear:request_success_total{finished_reason},
// spear:time_to_first_token_seconds, spear:time_per_output_token_seconds,
// spear:e2e_request_latency_seconds, spear:iteration_tokens_total,
// spear:request_prompt_tokens, spear:request_generation_tokens (histograms),
// spear:prefix_cache_queries_total / _hits_total (prompt tokens); and
// spear's own: spear:ready, spear:kv_cache_blocks_used / _total / _cached,
// spear:engine_steps_total{kind}, spear:engine_step_seconds,
// spear:http_responses_total{endpoint,status}, spear:memory_bytes{device,kind},
// spear:cost_model_mean_abs_rel_error, and the engine loop's profile
// spear:engine_phase_seconds_total{phase} (schedule, prepare, forward_device, forward_copy,
// forward_host, sample, other: where the engine thread's time goes; bench-serve --profile).
#include <array>
#include <atomic>
#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "engine/engine_loop.h"

namespace spear::server {

class Histogram {
 public:
  explicit Histogram(std::vector<double> bounds);
  void observe(double v);
  // Appends the _bucket/_sum/_count lines of `name`; `labels` (`k="v",...`) go on each.
  void render(std::string& out, const std::string& name, const std::string& help,
              const std::string& labels = "") const;

 private:
  std::vector<double> bounds_;
  std::vector<uint64_t> counts_;  // one per bound, then +Inf
  double sum_ = 0;
  uint64_t n_ = 0;
  mutable std::mutex mu_;
};

class Metrics final : public EngineObserver {
 public:
  Metrics();
  // EngineObserver (engine thread)
  void on_step(const StepRecord& s) override;
  void on_step_sampled(double seconds) override;
  void on_request_done(const RequestRecord& r) override;
  void on_preemption() override {}

  // HTTP layer
  void count_response(const std::string& endpoint, int status);
  // The model_name label of every series ("" until set).
  void set_model_name(const std::string& name);

  // Memory by use ("weights", "ec", "kv_cache", "activations") on a device ("cpu", "cuda"),
  // set once at load; rendered as spear:memory_bytes{device, kind}.
  void set_memory(const std::string& device, const std::map<std::string, int64_t>& bytes);

  // Prometheus text; `engine` may be null while loading.
  std::string render(const Engine* engine, bool ready) const;

 private:
  Histogram ttft_, tpot_, e2e_, step_, step_tokens_, req_prompt_tokens_, req_gen_tokens_;
  mutable std::mutex mu_;
  std::map<std::string, uint64_t> steps_by_kind_;
  // Engine-thread seconds by phase (StepRecord): schedule, prepare, forward (device, copy,
  // host inside the backend), sample, other.
  std::map<std::string, double> phase_s_;
  std::map<std::string, uint64_t> finished_by_reason_;
  std::map<std::pair<std::string, int>, uint64_t> responses_;
  std::string mem_device_, model_label_;  // model_label_: model_name="..." (escaped)
  std::map<std::string, int64_t> mem_bytes_;
  double step_abs_rel_err_sum_ = 0;
  uint64_t step_err_n_ = 0;
};

}  // namespace spear::server
