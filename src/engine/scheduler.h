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
#include <cstdint>
#include <deque>
#include <memory>
#include <string>
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

 private:
  void preempt(Sequence* s);
  bool ensure_decode_blocks(StepPlan& plan);
  // Largest prefill token count whose step fits the TPOT target.
  int64_t slo_prefill_budget(const std::vector<ScheduledChunk>& decodes, int64_t cap) const;
  // Prefill chunks a budget of p tokens would schedule (no side effects).
  std::vector<std::pair<Sequence*, int64_t>> fill_prefill(int64_t p, int64_t batch_room,
                                                          bool whole_prompts) const;
  int64_t admission_watermark() const;

  SchedulerConfig cfg_;
  BlockPool& pool_;
  CostModel& cost_;
  std::deque<std::unique_ptr<Sequence>> waiting_;  // ordered by arrival_order
  std::vector<std::unique_ptr<Sequence>> running_; // in admission order
  int64_t preemptions_ = 0;
};

}  // namespace spear
