#include "engine/engine_loop.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>

#include "core/error.h"

namespace spear {

double steady_now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

Engine::Engine(const LlamaModel& model, EngineConfig cfg, EngineObserver* observer)
    : Engine(std::make_unique<CpuStepModel>(model), nullptr, cfg, observer) {}

Engine::Engine(StepModel& model, EngineConfig cfg, EngineObserver* observer)
    : Engine(nullptr, &model, cfg, observer) {}

Engine::Engine(std::unique_ptr<StepModel> owned, StepModel* borrowed, EngineConfig cfg, EngineObserver* observer)
    : owned_model_(std::move(owned)), model_(borrowed ? *borrowed : *owned_model_), cfg_(cfg), observer_(observer) {
  StepModel& model = model_;
  const ModelConfig& mc = model.config();
  if (cfg_.max_model_len <= 0) cfg_.max_model_len = mc.max_position_embeddings;
  SPEAR_CHECK(cfg_.max_model_len >= 2 && cfg_.max_model_len <= mc.max_position_embeddings,
              "--max-model-len must be in [2, " + std::to_string(mc.max_position_embeddings) +
                  "] (the model's context)");
  SPEAR_CHECK(cfg_.block_size >= 1 && cfg_.block_size <= 1024, "KV block size must be in [1, 1024]");
  SPEAR_CHECK(cfg_.max_waiting >= 1, "the admission queue must hold at least one request");
  const int64_t block_bytes = cfg_.block_size * mc.num_layers * mc.kv_dim() * 2 * 4;
  const int64_t min_blocks = (cfg_.max_model_len + cfg_.block_size - 1) / cfg_.block_size + 1;
  int64_t blocks = cfg_.kv_blocks;
  if (model.kv_blocks() > 0) blocks = model.kv_blocks();  // the backend's own KV memory decides
  if (blocks <= 0 && cfg_.kv_cache_bytes > 0) blocks = cfg_.kv_cache_bytes / block_bytes;
  if (blocks <= 0)
    blocks = std::min<int64_t>((512ll << 20) / block_bytes,
                               std::max<int64_t>(1, cfg_.sched.max_batch) * min_blocks);
  SPEAR_CHECK(blocks >= min_blocks,
              "the KV cache (" + std::to_string(blocks) + " blocks of " +
                  std::to_string(cfg_.block_size) + " positions) cannot hold one sequence of " +
                  std::to_string(cfg_.max_model_len) + " tokens; give it more memory");
  pool_ = std::make_unique<BlockPool>(blocks, cfg_.block_size, mc.num_layers, mc.kv_dim(), model.host_kv(),
                                      cfg_.prefix_caching);
  if (cfg_.sched.policy == SchedulerPolicy::SloEcBlind) {
    cost_.set_ec_aware(false);
    cost_.set_refit(false);
  }
  cfg_.sched.max_batched_tokens = std::max<int64_t>(1, cfg_.sched.max_batched_tokens);
  sched_ = std::make_unique<Scheduler>(cfg_.sched, *pool_, cost_);
  cost_summary_ = cost_.describe();
  cost_snapshot_ = cost_;
}

Engine::~Engine() { stop(); }

void Engine::start() {
  if (thread_.joinable()) return;
  if (cfg_.profile) profile_cost_model(model_, cfg_.max_model_len, cost_, cfg_.block_size);
  {
    std::lock_guard<std::mutex> lk(mu_);
    cost_summary_ = cost_.describe();
    cost_snapshot_ = cost_;
    stop_ = false;
  }
  thread_ = std::thread([this] { loop(); });
}

void Engine::stop() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

Engine::Submit Engine::submit(std::vector<EngineRequest> reqs, std::string* why) {
  auto invalid = [&](const std::string& m) {
    if (why) *why = m;
    return Submit::Invalid;
  };
  const int64_t V = model_.vocab_size();
  for (const EngineRequest& r : reqs) {
    if (!r.stream) return invalid("internal: request without a stream");
    if (r.prompt.empty()) return invalid("the prompt is empty");
    const int64_t n = static_cast<int64_t>(r.prompt.size());
    for (int32_t id : r.prompt)
      if (id < 0 || id >= V)
        return invalid("token id " + std::to_string(id) + " is outside the vocabulary [0, " +
                       std::to_string(V) + ")");
    if (r.max_tokens < 0) return invalid("max_tokens must be >= 0");
    if (n > cfg_.max_model_len || (r.max_tokens > 0 && n >= cfg_.max_model_len))
      return invalid("the prompt has " + std::to_string(n) +
                     " tokens; this server's maximum context length is " +
                     std::to_string(cfg_.max_model_len) + " tokens" +
                     (r.max_tokens > 0 ? ", including at least one generated token" : ""));
    if (r.logprobs > cfg_.max_logprobs)
      return invalid("logprobs must be <= " + std::to_string(cfg_.max_logprobs));
    try {
      Sampler check(r.sampling);
    } catch (const Error& e) {
      return invalid(e.what());
    }
  }
  {
    std::lock_guard<std::mutex> lk(mu_);
    if (stop_ && thread_.joinable()) return Submit::Stopped;
    if (static_cast<int64_t>(inbox_.size()) + n_waiting_.load() +
            static_cast<int64_t>(reqs.size()) > cfg_.max_waiting)
      return Submit::QueueFull;
    const double now = steady_now();
    for (EngineRequest& r : reqs) {
      r.stream->t_arrival = now;
      r.stream->n_prompt_tokens = static_cast<int64_t>(r.prompt.size());
      n_prompt_tok_ += static_cast<int64_t>(r.prompt.size());
      inbox_.push_back(std::move(r));
    }
  }
  cv_.notify_all();
  return Submit::Ok;
}

EngineStats Engine::stats() const {
  EngineStats s;
  s.running = n_running_.load();
  {
    std::lock_guard<std::mutex> lk(mu_);
    s.waiting = n_waiting_.load() + static_cast<int64_t>(inbox_.size());
  }
  s.kv_blocks_total = pool_->num_blocks();
  s.kv_blocks_used = pool_->used_blocks();
  s.kv_blocks_cached = pool_->cached_blocks();
  s.kv_blocks_evictable = pool_->evictable_blocks();
  s.kv_blocks_evicted = pool_->evictions();
  const PrefixCacheStats pc = sched_->prefix_cache_stats();
  s.prefix_cache_queries = pc.queries;
  s.prefix_cache_hits = pc.hits;
  s.steps = n_steps_.load();
  s.preemptions = n_preempt_.load();
  s.prompt_tokens = n_prompt_tok_.load();
  s.generated_tokens = n_gen_tok_.load();
  return s;
}

std::string Engine::cost_model_summary() const {
  std::lock_guard<std::mutex> lk(mu_);
  return cost_summary_;
}

CostModel Engine::cost_model() const {
  std::lock_guard<std::mutex> lk(mu_);
  return cost_snapshot_;
}

void Engine::loop() {
  double t_loop = steady_now();  // when the loop's own work (not idling) began
  while (true) {
    std::vector<EngineRequest> fresh;
    {
      std::unique_lock<std::mutex> lk(mu_);
      if (inbox_.empty() && sched_->num_running() == 0 && sched_->num_waiting() == 0 && !stop_) {
        cv_.wait_for(lk, std::chrono::milliseconds(50));
        t_loop = steady_now();
      }
      if (stop_) break;
      fresh.swap(inbox_);
      // Counted as waiting until the scheduler has them (submit's queue bound).
      n_waiting_ = sched_->num_waiting() + static_cast<int64_t>(fresh.size());
    }
    for (EngineRequest& r : fresh) {
      double t = r.stream->t_arrival;
      sched_->add(std::make_unique<Sequence>(std::move(r), *pool_, next_order_++, t));
    }
    sweep_cancelled();
    if (sched_->num_running() + sched_->num_waiting() > 0) {
      try {
        step(t_loop);
      } catch (const std::exception& e) {
        // A failure inside a step must not take the server down: fail what was in
        // flight, keep serving.
        std::fprintf(stderr, "spear: engine step failed: %s\n", e.what());
        for (Sequence* s : sched_->all()) finish(s, FinishReason::Error, e.what());
      }
    }
    n_running_ = sched_->num_running();
    n_waiting_ = sched_->num_waiting();
    t_loop = steady_now();
    if ((n_steps_.load() & 7) == 0) {
      std::lock_guard<std::mutex> lk(mu_);
      cost_summary_ = cost_.describe();
      cost_snapshot_ = cost_;
    }
  }
  // Shutting down: nobody is left waiting on a stream forever.
  for (Sequence* s : sched_->all()) finish(s, FinishReason::Error, "the server is shutting down");
  std::lock_guard<std::mutex> lk(mu_);
  for (EngineRequest& r : inbox_) r.stream->finish(FinishReason::Error, "the server is shutting down");
  inbox_.clear();
  n_running_ = 0;
  n_waiting_ = 0;
}

void Engine::sweep_cancelled() {
  for (Sequence* s : sched_->all())
    if (s->req.stream->cancelled()) finish(s, FinishReason::Cancelled);
}

void Engine::finish(Sequence* s, FinishReason r, const std::string& err) {
  const double now = steady_now();
  RequestRecord rec;
  rec.reason = r;
  rec.prompt_tokens = s->n_prompt;
  rec.generated = s->n_generated;
  rec.preemptions = s->n_preemptions;
  rec.e2e_s = now - s->t_arrival;
  if (s->n_generated > 0) rec.ttft_s = s->t_first_token - s->t_arrival;
  if (s->n_generated > 1)
    rec.tpot_s = (s->t_last_token - s->t_first_token) / static_cast<double>(s->n_generated - 1);
  RequestStream& st = *s->req.stream;
  st.t_first_token = s->t_first_token;
  st.t_last_token = s->t_last_token;
  st.n_generated = s->n_generated;
  st.n_preemptions = s->n_preemptions;
  std::shared_ptr<RequestStream> keep = s->req.stream;
  sched_->remove(s);  // frees the KV blocks; s is gone after this
  // Metrics first: once the stream finishes, the client may read /metrics at once (the
  // running count too, which the loop otherwise publishes only after the step).
  n_running_ = sched_->num_running();
  if (observer_) observer_->on_request_done(rec);
  keep->finish(r, err);
}

TokenLogprob Engine::logprob_of(const float* row, int32_t id, int64_t top) const {
  const int64_t V = model_.vocab_size();
  float mx = row[0];
  for (int64_t i = 1; i < V; ++i) mx = std::max(mx, row[i]);
  double sum = 0;
  for (int64_t i = 0; i < V; ++i) sum += std::exp(static_cast<double>(row[i] - mx));
  const float lse = mx + static_cast<float>(std::log(sum));
  TokenLogprob lp;
  lp.logprob = row[id] - lse;
  if (top > 0) {
    top = std::min(top, V);
    std::vector<int32_t> idx(V);
    for (int64_t i = 0; i < V; ++i) idx[i] = static_cast<int32_t>(i);
    // Ties broken by lower id, as argmax does, so the first entry is the greedy token.
    auto better = [&](int32_t a, int32_t b) { return row[a] > row[b] || (row[a] == row[b] && a < b); };
    std::partial_sort(idx.begin(), idx.begin() + top, idx.end(), better);
    for (int64_t i = 0; i < top; ++i) lp.top.push_back({idx[i], row[idx[i]] - lse});
  }
  return lp;
}

void Engine::emit_prompt_logprobs(Sequence& s, const float* rows, int64_t start, int64_t n) {
  const int64_t V = model_.vocab_size();
  const int64_t top = std::max(0, s.req.logprobs);
  if (s.prompt_lp_done == 0 && start == 0) {
    TokenEvent ev;
    ev.id = s.tokens[0];
    ev.is_prompt = true;
    s.req.stream->push(std::move(ev));
    s.prompt_lp_done = 1;
  }
  // Row i (position start+i) predicts the token at start+i+1.
  for (int64_t i = 0; i < n; ++i) {
    const int64_t q = start + i + 1;
    if (q >= s.n_prompt) break;
    if (q < s.prompt_lp_done) continue;  // emitted before a preemption
    TokenEvent ev;
    ev.id = s.tokens[q];
    ev.is_prompt = true;
    ev.has_logprob = true;
    ev.lp = logprob_of(rows + i * V, ev.id, top);
    s.req.stream->push(std::move(ev));
    s.prompt_lp_done = q + 1;
  }
}

void Engine::step(double t_loop) {
  const double t_sched = steady_now();
  StepPlan plan = sched_->schedule();
  const double t_planned = steady_now();
  for (size_t i = 0; i < plan.preempted.size(); ++i) {
    ++n_preempt_;
    if (observer_) observer_->on_preemption();
  }
  if (plan.empty()) {
    // Nothing runnable (e.g. everything waits for memory that cancellations will
    // free): do not spin.
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
    return;
  }
  const int64_t V = model_.vocab_size();
  std::vector<SeqChunk> chunks;
  std::vector<bool> all_rows;
  int64_t rows = 0;
  for (const ScheduledChunk& c : plan.chunks) {
    Sequence* s = c.seq;
    const bool all = s->needs_prompt_rows();
    chunks.push_back({&s->kv, s->tokens.data() + s->n_computed, c.n_tokens, s->n_computed, all});
    all_rows.push_back(all);
    rows += all ? c.n_tokens : 1;
  }
  // Every sequence without logprobs or penalties, and only last rows wanted: the backend
  // may draw the tokens where the logits are (no logits copied to the host). The draw
  // index is the output length, as on the host path, so a seeded sequence's tokens do
  // not depend on which path (or batch) computes a step.
  bool on_backend = cfg_.backend_sampling && model_.has_forward_sample();
  for (size_t ci = 0; ci < plan.chunks.size() && on_backend; ++ci) {
    const Sequence* s = plan.chunks[ci].seq;
    on_backend = !all_rows[ci] && !s->sampler.params().has_penalties() && s->req.logprobs < 0;
  }
  if (on_backend) {
    drawn_ids_.resize(plan.chunks.size());
    draws_.clear();
    for (const ScheduledChunk& c : plan.chunks)
      draws_.push_back({c.seq->sampler.params(), static_cast<uint64_t>(c.seq->n_generated)});
  } else {
    logits_.resize(static_cast<size_t>(rows * V));
  }
  const double t0 = steady_now();
  try {
    if (on_backend)
      model_.forward_sample(chunks, draws_, drawn_ids_.data());
    else
      model_.forward(chunks, logits_.data());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "spear: forward failed: %s\n", e.what());
    for (const ScheduledChunk& c : plan.chunks) finish(c.seq, FinishReason::Error, e.what());
    return;
  }
  const double t1 = steady_now();
  const double dt = t1 - t0;
  cost_.observe(plan.shape, dt);
  ++n_steps_;
  if (observer_) {
    StepRecord rec;
    rec.kind = plan.kind();
    rec.tokens = plan.shape.tokens;
    rec.seqs = plan.shape.seqs;
    rec.decodes = plan.n_decode;
    rec.prefill_tokens = plan.n_prefill_tokens;
    rec.seconds = dt;
    rec.predicted_s = plan.predicted_s;
    rec.other_s = std::max(0.0, t_sched - t_loop);
    rec.schedule_s = t_planned - t_sched;
    rec.prepare_s = t0 - t_planned;
    const StepModel::ForwardTimes ft = model_.last_forward_times();
    rec.device_s = ft.device_s;
    rec.copy_s = ft.copy_s;
    observer_->on_step(rec);
  }

  const auto& eos = model_.config().eos_token_ids;
  int64_t r = 0;
  for (size_t ci = 0; ci < plan.chunks.size(); ++ci) {
    Sequence* s = plan.chunks[ci].seq;
    const int64_t n = plan.chunks[ci].n_tokens;
    const float* last = nullptr;
    if (on_backend) {
      r += 1;
    } else if (all_rows[ci]) {
      emit_prompt_logprobs(*s, &logits_[r * V], s->n_computed, n);
      last = &logits_[(r + n - 1) * V];
      r += n;
    } else {
      last = &logits_[r * V];
      r += 1;
    }
    s->n_computed += n;
    if (s->pending() > 0) continue;  // still prefilling
    // Caught up: the last row predicts the next token.
    if (s->n_generated >= s->req.max_tokens) {
      finish(s, FinishReason::Length);
      continue;
    }
    const std::span<const int32_t> toks(s->tokens);
    const int32_t id = on_backend ? drawn_ids_[ci]
                                  : s->sampler.sample_at(last, V, static_cast<uint64_t>(s->n_generated),
                                                         {toks.first(s->n_prompt), toks.subspan(s->n_prompt)});
    TokenEvent ev;
    ev.id = id;
    if (s->req.logprobs >= 0) {
      ev.has_logprob = true;
      ev.lp = logprob_of(last, id, s->req.logprobs);
    }
    s->tokens.push_back(id);
    s->n_generated++;
    ++n_gen_tok_;
    if (s->n_generated == 1) s->t_first_token = t1;
    s->t_last_token = t1;
    s->req.stream->push(std::move(ev));
    const bool is_eos = std::find(eos.begin(), eos.end(), id) != eos.end();
    const bool is_stop =
        std::find(s->req.stop_ids.begin(), s->req.stop_ids.end(), id) != s->req.stop_ids.end();
    if ((is_eos && !s->req.ignore_eos) || is_stop) finish(s, FinishReason::Stop);
    else if (s->n_generated >= s->req.max_tokens ||
             static_cast<int64_t>(s->tokens.size()) >= cfg_.max_model_len)
      finish(s, FinishReason::Length);
  }
  if (observer_) observer_->on_step_sampled(steady_now() - t1);
}

}  // namespace spear
