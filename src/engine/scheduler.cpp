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
  if (out) {
    register_written(out.get());
    out->kv.release();
  }
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
      register_written(p.get());  // its blocks stay cached: the recompute may find them
      p->kv.release();
      p->n_computed = 0;  // recompute: everything so far becomes the prompt again
      p->n_preemptions++;
      ++preemptions_;
      add(std::move(p));
      return;
    }
}

void Scheduler::register_written(Sequence* s) {
  s->kv.register_written(s->tokens, s->n_computed);
}

Scheduler::PrefixProbe Scheduler::probe_prefix(Sequence* s) const {
  PrefixProbe p;
  if (!pool_.prefix_caching() || s->needs_prompt_rows() || s->kv.num_blocks() > 0) return p;
  auto it = probes_.find(s);
  if (it != probes_.end()) return it->second;
  // At least the last token is computed: its row gives the next token's logits.
  const int64_t cap = (static_cast<int64_t>(s->tokens.size()) - 1) / pool_.block_size();
  p.blocks = s->kv.cached_prefix(s->tokens, cap, &p.evictable);
  probes_.emplace(s, p);
  return p;
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

std::vector<Scheduler::PrefillPick> Scheduler::fill_prefill(int64_t p, int64_t batch_room,
                                                            bool whole_prompts) const {
  std::vector<PrefillPick> out;
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
    out.push_back({s, n, 0, s->n_computed});
    free -= need;
    p -= n;
  }
  // Then new admissions, first come first served (the head blocks the rest, so a
  // long prompt is not starved by short ones behind it). A cached prefix is taken, not
  // computed: it costs no tokens, and blocks only where it takes evictable ones.
  const int64_t watermark = admission_watermark();
  for (const auto& sp : waiting_) {
    Sequence* s = sp.get();
    if (batch_room <= 0 || p <= 0) break;
    const PrefixProbe pr = probe_prefix(s);
    const int64_t start = s->n_computed + pr.blocks * bs;
    const int64_t pending = static_cast<int64_t>(s->tokens.size()) - start;
    int64_t n = whole_prompts ? pending : std::min(pending, p);
    if (whole_prompts && n > p && !out.empty()) break;
    int64_t need = pool_.blocks_for(start + n) - pr.blocks + pr.evictable;
    if (free - need < watermark && !(out.empty() && running_.empty() && need <= free)) break;
    out.push_back({s, n, pr.blocks, start});
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
    for (const PrefillPick& pk : fill_prefill(p, room, false)) {
      s.tokens += pk.n;
      s.seqs += 1;
      s.attn += attn_pairs(pk.start, pk.n);
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
  // The previous step wrote its chunks' K/V: their full blocks become cached (before
  // anyone looks the cache up or allocates).
  if (pool_.prefix_caching())
    for (const auto& s : running_) register_written(s.get());
  probes_.clear();
  ensure_decode_blocks(plan);
  std::vector<ScheduledChunk> decodes;
  for (const auto& s : running_)
    if (!s->prefilling()) decodes.push_back({s.get(), 1});

  const bool has_prefill_work =
      !waiting_.empty() ||
      std::any_of(running_.begin(), running_.end(), [](const auto& s) { return s->prefilling(); });
  const int64_t room = cfg_.max_batch - static_cast<int64_t>(running_.size());
  std::vector<PrefillPick> prefill;
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
  // Admit: move from waiting to running, and take the cached prefixes first (before any
  // allocation below could evict a block that a later admission counted on).
  for (const PrefillPick& pk : prefill) {
    Sequence* s = pk.seq;
    bool admitted = false;
    for (auto it = waiting_.begin(); it != waiting_.end(); ++it)
      if (it->get() == s) {
        running_.push_back(std::move(*it));
        waiting_.erase(it);
        admitted = true;
        break;
      }
    if (!admitted) continue;
    const bool looked_up = pool_.prefix_caching() && !s->needs_prompt_rows();
    if (pk.reuse > 0) {
      const int64_t got = s->kv.adopt_prefix(s->tokens, pk.reuse);
      SPEAR_CHECK(got == pk.reuse, "scheduler: a cached prefix vanished between planning and admission");
      s->n_computed = pk.start;
    }
    if (looked_up && s->n_preemptions == 0) {  // a recompute after preemption is not a new query
      prefix_queries_.fetch_add(s->n_prompt, std::memory_order_relaxed);
      prefix_hits_.fetch_add(pk.start, std::memory_order_relaxed);
    }
  }
  for (const PrefillPick& pk : prefill) {
    Sequence* s = pk.seq;
    SPEAR_CHECK(s->n_computed == pk.start, "scheduler: a chunk does not start where it was planned");
    SPEAR_CHECK(s->kv.reserve(s->n_computed + pk.n), "scheduler: KV reservation failed after planning");
    plan.chunks.push_back({s, pk.n});
    plan.n_prefill_tokens += pk.n;
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
