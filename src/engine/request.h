#pragma once
// What a client asks the engine for, and the channel through which the engine
// answers it. The HTTP layer builds an EngineRequest, submits it, and then reads
// TokenEvents from its RequestStream; the engine thread is the only producer.
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "engine/sampler.h"

namespace spear {

enum class FinishReason { None, Stop, Length, Cancelled, Error };
const char* finish_reason_name(FinishReason r);  // "stop", "length", "cancelled", "error"

// One token's log-probability and, optionally, the top alternatives at that position.
struct TokenLogprob {
  float logprob = 0;
  std::vector<std::pair<int32_t, float>> top;  // (id, logprob), most likely first
};

// One emitted token. Prompt tokens are emitted (with their logprobs) only for echo
// requests; `logprob` is empty when logprobs were not asked for, and for the first
// prompt token (nothing predicts it).
struct TokenEvent {
  int32_t id = -1;
  bool is_prompt = false;
  bool has_logprob = false;
  TokenLogprob lp;
};

// Wakes a waiter when any of several streams gets news: one HTTP call with several
// prompts shares one Notifier across its streams.
struct Notifier {
  std::mutex mu;
  std::condition_variable cv;
};

class RequestStream {
 public:
  explicit RequestStream(std::shared_ptr<Notifier> n = nullptr)
      : notifier_(n ? std::move(n) : std::make_shared<Notifier>()) {}

  // ---- producer (engine thread)
  void push(TokenEvent ev);
  void finish(FinishReason r, std::string error = {});

  // ---- consumer (HTTP thread); call with notifier().mu held or use the helpers.
  // Moves pending events into out; returns true once the stream has finished and
  // every event has been taken.
  bool drain(std::vector<TokenEvent>& out);
  bool has_events() const { return !events_.empty(); }
  FinishReason finish_reason() const { return reason_; }
  const std::string& error() const { return error_; }
  bool finished() const { return finished_; }
  // Blocks until the stream finishes or the timeout passes; returns finished().
  bool wait_finished(std::chrono::milliseconds timeout);

  // Asks the engine to stop this request and free its KV blocks (any thread).
  void cancel() { cancelled_.store(true, std::memory_order_relaxed); }
  bool cancelled() const { return cancelled_.load(std::memory_order_relaxed); }

  Notifier& notifier() { return *notifier_; }

  // Timestamps the engine records (steady clock seconds), for metrics and tests.
  double t_arrival = 0, t_first_token = 0, t_last_token = 0;
  int64_t n_prompt_tokens = 0, n_generated = 0, n_preemptions = 0;

 private:
  std::shared_ptr<Notifier> notifier_;
  std::deque<TokenEvent> events_;
  bool finished_ = false;
  FinishReason reason_ = FinishReason::None;
  std::string error_;
  std::atomic<bool> cancelled_{false};
};

struct EngineRequest {
  std::vector<int32_t> prompt;  // token ids, already validated against the vocabulary
  SamplingParams sampling;
  int64_t max_tokens = 16;      // new tokens; 0 = only score the prompt (needs prompt_logprobs)
  bool ignore_eos = false;
  std::vector<int32_t> stop_ids;  // finish with "stop" when one of these is generated
  int logprobs = -1;              // -1: none; k >= 0: each new token's logprob and top k
  bool prompt_logprobs = false;   // emit prompt tokens with logprobs (echo), top `logprobs`
  std::shared_ptr<RequestStream> stream;
};

}  // namespace spear
