#include "engine/scheduler.h"

#include <algorithm>

#include "core/error.h"

namespace spear {

const char* policy_name(SchedulerPolicy p) {
  switch (p) {
    case SchedulerPolicy::Slo: return "ec-aware";
    case SchedulerPolicy::SloEcBlind: return "ec-blind";
    case SchedulerPolicy::Fixed: return "fixed";
    case SchedulerPolicy::NoChunking: return "no-chunk";
  }
  return "?";
}

bool parse_policy(const std::string& s, SchedulerPolicy* out) {
  for (SchedulerPolicy p : {SchedulerPolicy::Slo, SchedulerPolicy::SloEcBlind,
                            SchedulerPolicy::Fixed, SchedulerPolicy::NoChunking})
    if (s == policy_name(p)) {
      *out = p;
      return true;
    }
  if (s == "slo") {
    *out = SchedulerPolicy::Slo;
    return true;
  }
  return false;
}

const char* StepPlan::kind() const {
  if (n_decode > 0 && n_prefill_tokens > 0) return "mixed";
  return n_decode > 0 ? "decode" : "prefill";
}

Scheduler::Scheduler(SchedulerConfig cfg, BlockPool& pool, CostModel& cost)
    : cfg_(cfg), pool_(pool), cost_(cost) {
  SPEAR_CHECK(cfg_.max_batch >= 1, "scheduler: max_batch must be >= 1");
  SPEAR_CHECK(cfg_.max_batched_tokens >= 1, "scheduler: max_batched_tokens must be >= 1");
  SPEAR_CHECK(cfg_.min_prefill_chunk >= 1, "scheduler: min_prefill_chunk must be >= 1");
  SPEAR_CHECK(cfg_.slo_tpot_s > 0 && cfg_.slo_ttft_s > 0, "scheduler: SLOs must be positive");
}

void Scheduler::add(std::unique_ptr<Sequence> s) {
  // Keep FCFS order by arrival even when a preempted sequence comes back.
  auto it = std::upper_bound(waiting_.begin(), waiting_.end(), s->arrival_order,
                             [](uint64_t o, const std::unique_ptr<Sequence>& x) {
                               return o < x->arrival_order;
                             });
  waiting_.insert(it, std::move(s));
}

std::unique_ptr<Sequence> Scheduler::remove(Sequence* s) {
  std::unique_ptr<Sequence> out;
  for (auto it = running_.begin(); it != running_.end(); ++it)
    if (it->get() == s) {
      out = std::move(*it);
      running_.erase(it);
      break;
    }
  if (!out)
    for (auto it = waiting_.begin(); it != waiting_.end(); ++it)
      if (it->get() == s) {
        out = std::move(*it);
        waiting_.erase(it);
        break;
      }
  if (out) out->kv.release();
  return out;
}

std::vector<Sequence*> Scheduler::all() const {
  std::vector<Sequence*> v;
  for (const auto& s : running_) v.push_back(s.get());
  for (const auto& s : waiting_) v.push_back(s.get());
  return v;
}

void Scheduler::preempt(Sequence* s) {
  for (auto it = running_.begin(); it != running_.end(); ++it)
    if (it->get() == s) {
      std::unique_ptr<Sequence> p = std::move(*it);
      running_.erase(it);
      p->kv.release();
      p->n_computed = 0;  // recompute: everything so far becomes the prompt again
      p->n_preemptions++;
      ++preemptions_;
      add(std::move(p));
      return;
    }
}

int64_t Scheduler::admission_watermark() const {
  // Blocks kept free at admission so running sequences can grow a little before
  // anyone has to be preempted: 1% of the pool, at least one.
  return std::max<int64_t>(1, pool_.num_blocks() / 100);
}

bool Scheduler::ensure_decode_blocks(StepPlan& plan) {
  // In admission order, so that the oldest requests are served first and the
  // newest are the ones preempted.
  for (size_t i = 0; i < running_.size();) {
    Sequence* s = running_[i].get();
    if (s->prefilling()) {
      ++i;
      continue;
    }
    if (s->kv.reserve(s->n_computed + 1)) {
      ++i;
      continue;
    }
    Sequence* victim = running_.back().get();
    plan.preempted.push_back(victim);
    preempt(victim);
    if (victim == s) continue;  // s itself went back; running_[i] is now the next one
  }
  return true;
}

std::vector<std::pair<Sequence*, int64_t>> Scheduler::fill_prefill(int64_t p, int64_t batch_room,
                                                                   bool whole_prompts) const {
  std::vector<std::pair<Sequence*, int64_t>> out;
  int64_t free = pool_.free_blocks();
  const int64_t bs = pool_.block_size();
  // Prompts already admitted continue first.
  for (const auto& sp : running_) {
    Sequence* s = sp.get();
    if (!s->prefilling() || p <= 0) continue;
    int64_t n = std::min(s->pending(), p);
    int64_t need = s->kv.blocks_needed(s->n_computed + n);
    if (need > free) {
      n = (s->kv.num_blocks() + free) * bs - s->n_computed;
      if (n <= 0) continue;
      need = s->kv.blocks_needed(s->n_computed + n);
    }
    out.push_back({s, n});
    free -= need;
    p -= n;
  }
  // Then new admissions, first come first served (the head blocks the rest, so a
  // long prompt is not starved by short ones behind it).
  const int64_t watermark = admission_watermark();
  for (const auto& sp : waiting_) {
    Sequence* s = sp.get();
    if (batch_room <= 0 || p <= 0) break;
    int64_t n = whole_prompts ? s->pending() : std::min(s->pending(), p);
    if (whole_prompts && n > p && !out.empty()) break;
    int64_t need = pool_.blocks_for(n);
    if (free - need < watermark && !(out.empty() && running_.empty() && need <= free)) break;
    out.push_back({s, n});
    free -= need;
    p -= n;
    --batch_room;
  }
  return out;
}

int64_t Scheduler::slo_prefill_budget(const std::vector<ScheduledChunk>& decodes,
                                      int64_t cap) const {
  if (cap <= 0) return 0;
  const int64_t room = cfg_.max_batch - static_cast<int64_t>(running_.size());
  StepShape base;
  for (const ScheduledChunk& c : decodes) {
    base.tokens += 1;
    base.seqs += 1;
    base.attn += attn_pairs(c.seq->n_computed, 1);
  }
  // Without decodes nothing is at risk but the queue's TTFT: take as much as the
  // budget allows, as long as one step stays well within the TTFT SLO.
  const double target =
      decodes.empty() ? cfg_.slo_ttft_s * 0.5 : cfg_.slo_tpot_s * cfg_.tpot_headroom;
  auto cost_of = [&](int64_t p) {
    StepShape s = base;
    for (const auto& [seq, n] : fill_prefill(p, room, false)) {
      s.tokens += n;
      s.seqs += 1;
      s.attn += attn_pairs(seq->n_computed, n);
    }
    return cost_.predict(s);
  };
  int64_t best;
  if (cost_of(cap) <= target) {
    best = cap;
  } else {
    int64_t lo = 0, hi = cap;  // cost_of(lo) fits (or lo = 0), cost_of(hi) does not
    while (hi - lo > 1) {
      int64_t mid = (lo + hi) / 2;
      if (cost_of(mid) <= target) lo = mid;
      else hi = mid;
    }
    best = lo;
  }
  return std::max(best, std::min(cfg_.min_prefill_chunk, cap));
}

StepPlan Scheduler::schedule() {
  StepPlan plan;
  ensure_decode_blocks(plan);
  std::vector<ScheduledChunk> decodes;
  for (const auto& s : running_)
    if (!s->prefilling()) decodes.push_back({s.get(), 1});

  const bool has_prefill_work =
      !waiting_.empty() ||
      std::any_of(running_.begin(), running_.end(), [](const auto& s) { return s->prefilling(); });
  const int64_t room = cfg_.max_batch - static_cast<int64_t>(running_.size());
  std::vector<std::pair<Sequence*, int64_t>> prefill;
  if (has_prefill_work) {
    if (cfg_.policy == SchedulerPolicy::NoChunking) {
      prefill = fill_prefill(cfg_.max_batched_tokens, room, /*whole_prompts=*/true);
      if (!prefill.empty()) decodes.clear();  // prefill-first: decodes wait a step
    } else {
      const int64_t cap =
          std::max<int64_t>(0, cfg_.max_batched_tokens - static_cast<int64_t>(decodes.size()));
      const int64_t p = cfg_.policy == SchedulerPolicy::Fixed ? cap : slo_prefill_budget(decodes, cap);
      prefill = fill_prefill(p, room, false);
    }
  }

  plan.chunks = decodes;
  plan.n_decode = static_cast<int64_t>(decodes.size());
  for (auto& [s, n] : prefill) {
    // Admit: move from waiting to running.
    for (auto it = waiting_.begin(); it != waiting_.end(); ++it)
      if (it->get() == s) {
        running_.push_back(std::move(*it));
        waiting_.erase(it);
        break;
      }
    SPEAR_CHECK(s->kv.reserve(s->n_computed + n), "scheduler: KV reservation failed after planning");
    plan.chunks.push_back({s, n});
    plan.n_prefill_tokens += n;
  }
  for (const ScheduledChunk& c : plan.chunks) {
    plan.shape.tokens += c.n_tokens;
    plan.shape.seqs += 1;
    plan.shape.attn += attn_pairs(c.seq->n_computed, c.n_tokens);
  }
  plan.predicted_s = cost_.predict(plan.shape);
  return plan;
}

}  // namespace spear
