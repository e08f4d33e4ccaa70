#pragma once
// `spear bench-serve`: a load generator for an OpenAI-compatible server, after
// vLLM's benchmark_serving. Requests arrive as a Poisson process at a given rate
// (or all at once), optionally capped at a fixed concurrency; prompts are random
// token ids of fixed or uniformly sampled length, sent to /v1/completions with
// stream=true and ignore_eos so that every request generates exactly its output
// length. Per request it measures TTFT (first streamed token), ITL (gaps between
// streamed chunks), TPOT ((e2e - TTFT) / (output tokens - 1)) and end-to-end
// latency; it reports mean, median and p99 of each, throughput, and goodput (the
// rate of requests meeting every SLO).
#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace spear::server {

struct LoadConfig {
  std::string url = "http://127.0.0.1:8080";
  std::string model;             // empty: the first of /v1/models
  std::string api_key;
  double rate = 4;               // requests per second; <= 0 or inf: all at once
  int64_t concurrency = 0;       // in-flight requests at most; 0: unlimited
  int64_t requests = 200;
  int64_t input_len = 128, output_len = 64;
  double range_ratio = 0;        // lengths uniform in [len*(1-r), len*(1+r)]
  // The first shared_prefix_len tokens of every prompt are the same (one random draw of
  // the seed, e.g. a system prompt); the prompt length stays as sampled (a prompt shorter
  // than the prefix is the prefix's start). 0: every prompt random throughout.
  int64_t shared_prefix_len = 0;
  uint64_t seed = 0;
  double temperature = 0;        // sampling of every request (0: greedy)
  double top_p = 1;
  double slo_ttft_ms = 1000, slo_tpot_ms = 50;
  double timeout_s = 600;        // per request
  // Read the server's engine-loop profile (spear:engine_phase_seconds_total, from
  // /metrics) before and after the run, and report where the engine thread's time went
  // (and the prefix cache's hit rate, spear:prefix_cache_hits_total / _queries_total).
  bool profile = false;
};

struct RequestStats {
  bool ok = false;
  int status = 0;
  std::string error;
  int64_t prompt_tokens = 0, output_tokens = 0;
  double start_s = 0;            // since the benchmark started
  double ttft_s = 0, tpot_s = 0, e2e_s = 0;
  std::vector<double> itl_s;
};

struct Summary {
  double mean = 0, median = 0, p99 = 0;
};
Summary summarize(std::vector<double> v);  // milliseconds in, the same units out
double percentile(std::vector<double> v, double q);  // linear interpolation, q in [0, 100]

struct LoadReport {
  LoadConfig cfg;
  std::vector<RequestStats> requests;
  double duration_s = 0;
  int64_t completed = 0, failed = 0, good = 0;
  int64_t input_tokens = 0, output_tokens = 0;
  Summary ttft_ms, tpot_ms, itl_ms, e2e_ms;
  double request_throughput = 0, output_throughput = 0, goodput = 0;
  // --profile: engine seconds by phase during the run (schedule, prepare, forward_device,
  // forward_copy, forward_host, sample, other) and engine steps; empty when not asked or
  // when the server does not export them.
  std::vector<std::pair<std::string, double>> phases;
  double steps = 0;
  // --profile: prompt tokens the server looked up in its prefix cache during the run, and
  // found there (-1: not exported).
  double prefix_queries = -1, prefix_hits = -1;
  nlohmann::json to_json(bool per_request = false) const;
  std::string table() const;
};

// Throws spear::Error when the server cannot be reached at the start.
LoadReport run_load(const LoadConfig& cfg);

}  // namespace spear::server
