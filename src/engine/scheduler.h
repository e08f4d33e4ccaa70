#pragma once
// Builds each engine step: which running sequences decode, which prompts advance
// by how many tokens, which waiting requests are admitted, and who is preempted.
//
// Policies:
//  * Slo (EC-aware): continuous batching with chunked prefill. Every running decode
//    is in every step; the prefill chunk is the largest whose predicted step time
//    (CostModel, EC work included, refit online) keeps the step within the TPOT SLO;
//    when nothing decodes the chunk is bounded only by the token budget, so new
//    requests start (TTFT) as soon as possible. A prompt always advances by at least
//    min_prefill_chunk tokens per step, so prefill cannot starve behind decodes.
//  * SloEcBlind: the same, with a cost model that ignores EC work and does not
//    refit (the baseline of the benchmark).
//  * Fixed: chunked prefill with a fixed token budget per step (Sarathi-Serve).
//  * NoChunking: whole prompts, prefill-first (steps are either all-prefill or
//    all-decode), as servers without chunked prefill do.
//
// Memory: a request is admitted only when the blocks for its first chunk are free
// (above a small watermark kept for running sequences to grow). When a running
// decode needs a block and none is free, the most recently admitted sequence is
// preempted by recompute: its blocks are freed and it goes back to the head of the
// waiting queue with its tokens so far as the prompt.
//
// Prefix caching (when the pool caches, engine/paged_kv.h): a request admitted starts
// with the longest cached run of its leading full blocks (at most floor((len-1)/block)
// blocks, so the step still computes its last token and yields logits; none for a
// request that wants prompt logprobs, whose prompt rows must all be computed), and
// n_computed starts after them; its prefill chunks, their cost and their new blocks
// count only the rest. Blocks are registered once their K/V are written: at the start
// of each schedule() for the previous step's chunks, and when a sequence is removed or
// preempted. Cached blocks without references count as free for admission.
#include <atomic>
#include <cstdint>
#include <deque>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "engine/cost_model.h"
#include "engine/paged_kv.h"
#include "engine/sequence.h"

namespace spear {

enum class SchedulerPolicy { Slo, SloEcBlind, Fixed, NoChunking };
const char* policy_name(SchedulerPolicy p);
bool parse_policy(const std::string& s, SchedulerPolicy* out);  // "ec-aware", "ec-blind", "fixed", "no-chunk"

struct SchedulerConfig {
  SchedulerPolicy policy = SchedulerPolicy::Slo;
  int64_t max_batch = 32;               // running sequences at most
  int64_t max_batched_tokens = 2048;    // token rows per step at most
  int64_t min_prefill_chunk = 32;       // progress guarantee for prompts
  double slo_tpot_s = 0.05;
  double slo_ttft_s = 1.0;
  double tpot_headroom = 0.85;          // aim steps at this fraction of the TPOT SLO
};

// Prefix-cache accounting in tokens (vLLM's prefix_cache_queries / _hits): the prompt
// tokens of requests that looked the cache up at their first admission, and the tokens
// of those that were found cached.
struct PrefixCacheStats {
  int64_t queries = 0, hits = 0;
};

struct ScheduledChunk {
  Sequence* seq = nullptr;
  int64_t n_tokens = 0;   // rows of this sequence in the step, from seq->n_computed
};

struct StepPlan {
  std::vector<ScheduledChunk> chunks;
  StepShape shape;
  double predicted_s = 0;
  int64_t n_decode = 0, n_prefill_tokens = 0;
  std::vector<Sequence*> preempted;  // preempted while planning (for metrics)
  bool empty() const { return chunks.empty(); }
  const char* kind() const;          // "decode", "prefill", "mixed"
};

class Scheduler {
 public:
  Scheduler(SchedulerConfig cfg, BlockPool& pool, CostModel& cost);

  void add(std::unique_ptr<Sequence> s);  // to the waiting queue, FCFS
  StepPlan schedule();
  // Removes a sequence (finished or cancelled) and frees its blocks.
  std::unique_ptr<Sequence> remove(Sequence* s);

  // Every sequence, running first (for cancellation sweeps and shutdown).
  std::vector<Sequence*> all() const;
  int64_t num_running() const { return static_cast<int64_t>(running_.size()); }
  int64_t num_waiting() const { return static_cast<int64_t>(waiting_.size()); }
  const SchedulerConfig& config() const { return cfg_; }
  int64_t preemptions() const { return preemptions_; }
  // Safe from any thread.
  PrefixCacheStats prefix_cache_stats() const {
    return {prefix_queries_.load(std::memory_order_relaxed), prefix_hits_.load(std::memory_order_relaxed)};
  }

 private:
  void preempt(Sequence* s);
  bool ensure_decode_blocks(StepPlan& plan);
  // Largest prefill token count whose step fits the TPOT target.
  int64_t slo_prefill_budget(const std::vector<ScheduledChunk>& decodes, int64_t cap) const;
  struct PrefillPick {
    Sequence* seq;
    int64_t n;       // tokens to compute this step
    int64_t reuse;   // cached blocks a waiting sequence takes at admission
    int64_t start;   // the first position computed (after those blocks)
  };
  // Prefill chunks a budget of p tokens would schedule (no side effects).
  std::vector<PrefillPick> fill_prefill(int64_t p, int64_t batch_room, bool whole_prompts) const;
  // Cached leading blocks a waiting sequence would take, and how many of them are
  // evictable (memoized for one schedule()).
  struct PrefixProbe {
    int64_t blocks = 0, evictable = 0;
  };
  PrefixProbe probe_prefix(Sequence* s) const;
  void register_written(Sequence* s);
  int64_t admission_watermark() const;

  SchedulerConfig cfg_;
  BlockPool& pool_;
  CostModel& cost_;
  std::deque<std::unique_ptr<Sequence>> waiting_;  // ordered by arrival_order
  std::vector<std::unique_ptr<Sequence>> running_; // in admission order
  int64_t preemptions_ = 0;
  mutable std::unordered_map<const Sequence*, PrefixProbe> probes_;  // this schedule()'s
  std::atomic<int64_t> prefix_queries_{0}, prefix_hits_{0};
};

}  // namespace spear
