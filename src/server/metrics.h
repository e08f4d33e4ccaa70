#pragma once
// Server metrics in the Prometheus text format (GET /metrics): requests running
// and waiting, tokens in and out, TTFT / TPOT / end-to-end histograms, KV blocks in
// use, engine steps by kind, preemptions, HTTP responses by status. Fed by the
// engine (as its EngineObserver) and by the HTTP layer.
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
  // Appends the _bucket/_sum/_count lines of `name`.
  void render(std::string& out, const std::string& name, const std::string& help) const;

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
  void on_request_done(const RequestRecord& r) override;
  void on_preemption() override {}

  // HTTP layer
  void count_response(const std::string& endpoint, int status);

  // Memory by use ("weights", "ec", "kv_cache", "activations") on a device ("cpu", "cuda"),
  // set once at load; rendered as spear_memory_bytes{device, kind}.
  void set_memory(const std::string& device, const std::map<std::string, int64_t>& bytes);

  // Prometheus text; `engine` may be null while loading.
  std::string render(const Engine* engine, bool ready) const;

 private:
  Histogram ttft_, tpot_, e2e_, step_, step_tokens_;
  mutable std::mutex mu_;
  std::map<std::string, uint64_t> steps_by_kind_;
  std::map<std::string, uint64_t> finished_by_reason_;
  std::map<std::pair<std::string, int>, uint64_t> responses_;
  std::string mem_device_;
  std::map<std::string, int64_t> mem_bytes_;
  double step_abs_rel_err_sum_ = 0;
  uint64_t step_err_n_ = 0;
};

}  // namespace spear::server
