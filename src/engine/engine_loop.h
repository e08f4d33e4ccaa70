#pragma once
// The serving engine: a queue of requests and one thread that runs steps. Each
// step the scheduler builds a batch from running decodes and chunks of waiting
// prefills; the model runs it in one forward pass; each sequence that caught up
// samples its next token, which is streamed out at once; finished and cancelled
// sequences are retired and their KV blocks freed.
//
// Threading: submit()/stats() are safe from any thread; everything else (the
// scheduler, the KV pool, the cost model) belongs to the engine thread.
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "engine/cost_model.h"
#include "engine/paged_kv.h"
#include "engine/request.h"
#include "engine/scheduler.h"
#include "engine/step_model.h"
#include "model/llama.h"

namespace spear {

struct EngineConfig {
  SchedulerConfig sched;
  int64_t max_model_len = 0;     // 0: the model's context
  int64_t block_size = 16;       // positions per KV block
  // Prefix caching: full prompt blocks already in the KV cache (same tokens from the
  // start) are taken instead of computed (engine/paged_kv.h). Off: `serve --no-prefix-cache`.
  bool prefix_caching = true;
  int64_t kv_blocks = 0;         // 0: derived from kv_cache_bytes
  // 0: room for max_batch sequences of max_model_len tokens, at most 512 MiB.
  int64_t kv_cache_bytes = 0;
  int64_t max_waiting = 256;     // submit() refuses beyond this (HTTP 429)
  bool profile = true;           // measure the cost model at start
  int64_t max_logprobs = 20;
  // Let a backend that can (StepModel::has_forward_sample) draw the tokens where the logits
  // are; false: always copy the logits and sample on the host (the comparison).
  bool backend_sampling = true;
};

// What a finished request looked like, for latency metrics.
struct RequestRecord {
  FinishReason reason = FinishReason::None;
  int64_t prompt_tokens = 0, generated = 0, preemptions = 0;
  double ttft_s = -1, tpot_s = -1, e2e_s = 0, queue_s = 0;
};

struct StepRecord {
  const char* kind = "decode";
  int64_t tokens = 0, seqs = 0, decodes = 0, prefill_tokens = 0;
  double seconds = 0, predicted_s = 0;  // the forward pass, and what the cost model predicted
  // The engine thread's time around it (wall seconds): scheduling, building the chunks,
  // the forward (= seconds; on a device backend split into device_s and copy_s when known,
  // the rest is host work inside the backend), and the loop's own work since the previous
  // step (new requests, cancellations; not idling). Sampling and streaming the new tokens
  // come after (EngineObserver::on_step_sampled).
  double schedule_s = 0, prepare_s = 0, other_s = 0;
  double device_s = -1, copy_s = -1;
};

// Observer hooks called on the engine thread (keep them cheap).
struct EngineObserver {
  virtual ~EngineObserver() = default;
  // After the forward, before any of the step's tokens is streamed (so a client that has
  // its tokens sees the step counted).
  virtual void on_step(const StepRecord&) {}
  // At the end of the step: seconds spent sampling and streaming its tokens.
  virtual void on_step_sampled(double) {}
  virtual void on_request_done(const RequestRecord&) {}
  virtual void on_preemption() {}
};

struct EngineStats {
  int64_t running = 0, waiting = 0;
  int64_t kv_blocks_used = 0, kv_blocks_total = 0;
  int64_t steps = 0, preemptions = 0;
  int64_t prompt_tokens = 0, generated_tokens = 0;
  // Prefix cache: blocks cached (referenced or evictable) and evictable, and the prompt
  // tokens looked up / found cached at first admission (vLLM's prefix_cache_queries/hits).
  int64_t kv_blocks_cached = 0, kv_blocks_evictable = 0, kv_blocks_evicted = 0;
  int64_t prefix_cache_queries = 0, prefix_cache_hits = 0;
};

class Engine {
 public:
  // The model must outlive the engine. Throws spear::Error on a bad configuration.
  Engine(const LlamaModel& model, EngineConfig cfg, EngineObserver* observer = nullptr);
  // Any backend (the GPU engine: src/gpu/gpu_step_model.h); it must outlive the engine.
  Engine(StepModel& model, EngineConfig cfg, EngineObserver* observer = nullptr);
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  // Starts the engine thread (after profiling the cost model when enabled).
  void start();
  // Stops the thread; requests still in flight finish with FinishReason::Error.
  void stop();

  enum class Submit { Ok, QueueFull, Invalid, Stopped };
  // Queues requests all-or-nothing (one HTTP call may carry several prompts).
  // Invalid: a request that can never run (empty prompt, too long, bad ids); *why
  // says which. Each request's stream gets its events from the engine thread.
  Submit submit(std::vector<EngineRequest> reqs, std::string* why = nullptr);

  EngineStats stats() const;
  const EngineConfig& config() const { return cfg_; }
  int64_t max_model_len() const { return cfg_.max_model_len; }
  int64_t vocab_size() const { return model_.vocab_size(); }
  // Thread-safe copy of the cost model's description and recent error.
  std::string cost_model_summary() const;
  // A copy of the cost model (tests, benchmarks).
  CostModel cost_model() const;

 private:
  Engine(std::unique_ptr<StepModel> owned, StepModel* borrowed, EngineConfig cfg, EngineObserver* observer);
  void loop();
  void step(double t_loop);  // t_loop: when the loop's own work before this step began
  void sweep_cancelled();
  void finish(Sequence* s, FinishReason r, const std::string& err = {});
  void emit_prompt_logprobs(Sequence& s, const float* rows, int64_t start, int64_t n);
  TokenLogprob logprob_of(const float* row, int32_t id, int64_t top) const;

  std::unique_ptr<StepModel> owned_model_;  // the CPU adapter when built from a LlamaModel
  StepModel& model_;
  EngineConfig cfg_;
  EngineObserver* observer_;
  std::unique_ptr<BlockPool> pool_;
  CostModel cost_;
  std::unique_ptr<Scheduler> sched_;

  mutable std::mutex mu_;          // guards inbox_, stop_, waiting_count_, cost summaries
  std::condition_variable cv_;
  std::vector<EngineRequest> inbox_;
  bool stop_ = false;
  std::thread thread_;
  uint64_t next_order_ = 0;

  // Published by the engine thread after each step.
  std::atomic<int64_t> n_running_{0}, n_waiting_{0}, n_steps_{0}, n_preempt_{0};
  std::atomic<int64_t> n_prompt_tok_{0}, n_gen_tok_{0};
  std::string cost_summary_;       // guarded by mu_
  CostModel cost_snapshot_;        // guarded by mu_
  std::vector<float> logits_;      // scratch (rows, vocab)
  std::vector<int32_t> drawn_ids_;              // per chunk, from forward_sample
  std::vector<StepModel::DrawSpec> draws_;      // per chunk: what forward_sample draws
};

double steady_now();  // seconds on the steady clock

}  // namespace spear
