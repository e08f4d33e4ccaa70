// Prefix caching (engine/paged_kv.h, engine/scheduler.h): the pool's reference counts,
// hash table and LRU eviction; and in the engine, that reusing cached prompt blocks
// changes nothing a request gets (greedy tokens and logprobs equal to the engine without
// the cache and to single-sequence generate), concurrently and one after another, under
// eviction and preemption, and that every reference is returned.
#include <gtest/gtest.h>

#include <chrono>
#include <thread>

#include "core/error.h"
#include "engine/engine_loop.h"
#include "engine/generate.h"
#include "engine/paged_kv.h"
#include "test_engine_streams.h"
#include "test_paths.h"
#include "tokenizer/tokenizer.h"

using namespace spear;

namespace {

// Cached leading blocks of `tokens`, asked by a new sequence (a sequence keeps the hashes
// of its own tokens, which may only grow).
int64_t probe(BlockPool& pool, const std::vector<int32_t>& tokens, int64_t max_blocks = 100,
              int64_t* evictable = nullptr) {
  PagedSequence s(pool);
  return s.cached_prefix(tokens, max_blocks, evictable);
}

}  // namespace

TEST(EnginePrefixCache, PoolCountsReferencesAndKeepsReleasedBlocksCached) {
  BlockPool pool(4, 2, 1, 1, /*storage=*/false, /*prefix_caching=*/true);
  PagedSequence a(pool);
  const std::vector<int32_t> toks = {5, 6, 7, 8, 9};
  ASSERT_TRUE(a.reserve(5));  // 3 blocks, the last partial
  a.register_written(toks, 5);
  EXPECT_EQ(a.registered_blocks(), 2);  // the partial block is never registered
  EXPECT_EQ(pool.cached_blocks(), 2);
  EXPECT_EQ(pool.used_blocks(), 3);
  // Another sequence with the same first four tokens finds both full blocks.
  PagedSequence b(pool);
  const std::vector<int32_t> toks_b = {5, 6, 7, 8, 1, 2};
  int64_t evictable = -1;
  EXPECT_EQ(b.cached_prefix(toks_b, 10, &evictable), 2);
  EXPECT_EQ(evictable, 0);  // a still holds them
  EXPECT_EQ(probe(pool, toks_b, 1), 1);  // the cap holds
  EXPECT_EQ(b.adopt_prefix(toks_b, 10), 2);
  EXPECT_EQ(b.blocks()[0], a.blocks()[0]);
  EXPECT_EQ(b.blocks()[1], a.blocks()[1]);
  EXPECT_EQ(pool.ref_count(a.blocks()[0]), 2);
  EXPECT_EQ(pool.used_blocks(), 3);
  // A different first block: nothing; the same second block after a different first: nothing.
  EXPECT_EQ(probe(pool, {5, 0, 7, 8}), 0);
  EXPECT_EQ(probe(pool, {4, 6, 7, 8}), 0);
  a.release();
  EXPECT_EQ(pool.used_blocks(), 2);  // b's references
  b.release();
  EXPECT_EQ(pool.used_blocks(), 0);
  EXPECT_EQ(pool.free_blocks(), 4);  // evictable blocks count as free
  EXPECT_EQ(pool.cached_blocks(), 2);
  EXPECT_EQ(pool.evictable_blocks(), 2);
  // Still cached after every reference went: found again, and now evictable.
  EXPECT_EQ(probe(pool, toks_b, 10, &evictable), 2);
  EXPECT_EQ(evictable, 2);
}

TEST(EnginePrefixCache, AllocationTakesFreeBlocksFirstThenEvictsLeastRecentlyUsed) {
  BlockPool pool(4, 2, 1, 1, false, true);
  {
    PagedSequence x(pool), y(pool);
    ASSERT_TRUE(x.reserve(2));
    ASSERT_TRUE(y.reserve(2));
    x.register_written(std::vector<int32_t>{1, 2}, 2);
    y.register_written(std::vector<int32_t>{3, 4}, 2);
    x.release();  // released first: least recently used
    y.release();
  }
  EXPECT_EQ(pool.cached_blocks(), 2);
  PagedSequence z(pool);
  ASSERT_TRUE(z.reserve(4));  // the two free blocks: nothing evicted
  EXPECT_EQ(pool.evictions(), 0);
  EXPECT_EQ(pool.cached_blocks(), 2);
  PagedSequence w(pool);
  ASSERT_TRUE(w.reserve(2));  // evicts {1, 2}
  EXPECT_EQ(pool.evictions(), 1);
  EXPECT_EQ(probe(pool, {1, 2, 0}), 0);
  EXPECT_EQ(probe(pool, {3, 4, 0}), 1);
  ASSERT_TRUE(w.reserve(4));  // evicts {3, 4}
  EXPECT_EQ(pool.cached_blocks(), 0);
  EXPECT_EQ(pool.free_blocks(), 0);
  EXPECT_FALSE(w.reserve(6));
}

TEST(EnginePrefixCache, DoubleFreeAndStrayReferencesThrow) {
  BlockPool pool(2, 2, 1, 1, false, true);
  const int32_t b = pool.allocate();
  pool.acquire(b);
  pool.release(b);
  pool.release(b);
  EXPECT_THROW(pool.release(b), Error);  // its count is 0 and it is not cached
  EXPECT_THROW(pool.acquire(b), Error);  // free, not cached: nobody may take it
  const int32_t c = pool.allocate();
  pool.register_block(c, 42, 0, std::vector<int32_t>{1, 2});
  pool.release(c);
  EXPECT_THROW(pool.release(c), Error);  // cached and evictable, but no reference left
  pool.acquire(c);                       // a hit
  EXPECT_EQ(pool.ref_count(c), 1);
  pool.release(c);
}

TEST(EnginePrefixCache, DuplicateBlocksStayPrivateAndChainsContinueThroughTheCachedOne) {
  BlockPool pool(8, 2, 1, 1, false, true);
  const std::vector<int32_t> t = {1, 2, 3, 4, 5};
  PagedSequence a(pool), b(pool);
  ASSERT_TRUE(a.reserve(5));
  ASSERT_TRUE(b.reserve(5));  // computed at the same time: no hit for either
  a.register_written(t, 2);   // a's first block cached
  b.register_written(t, 4);   // b's first block is a duplicate; its second is cached after a's first
  a.register_written(t, 4);   // a's second: a duplicate of b's
  EXPECT_EQ(pool.cached_blocks(), 2);
  PagedSequence c(pool);
  EXPECT_EQ(c.adopt_prefix(t, 2), 2);
  EXPECT_EQ(c.blocks()[0], a.blocks()[0]);
  EXPECT_EQ(c.blocks()[1], b.blocks()[1]);
  a.release();
  b.release();
  c.release();
  EXPECT_EQ(pool.used_blocks(), 0);
  EXPECT_EQ(pool.cached_blocks(), 2);
  EXPECT_EQ(pool.free_blocks(), 8);
}

TEST(EnginePrefixCache, AnEvictedParentInvalidatesItsCachedChildren) {
  BlockPool pool(4, 2, 1, 1, false, true);
  const std::vector<int32_t> pt = {1, 2}, ct = {3, 4};
  const uint64_t hp = BlockPool::hash_block(pool.hash_seed(), pt), hc = BlockPool::hash_block(hp, ct);
  const int32_t P = pool.allocate(), C = pool.allocate();
  ASSERT_EQ(pool.register_block(P, hp, 0, pt), P);
  ASSERT_EQ(pool.register_block(C, hc, pool.registration(P), ct), C);
  EXPECT_EQ(pool.lookup(hc, pool.registration(P), ct), C);
  EXPECT_EQ(pool.lookup(hc, 0, ct), -1);  // the right hash after the wrong parent
  pool.release(P);  // the parent first: it is evicted first, the child stays cached
  pool.release(C);
  const int32_t X = pool.allocate(), Y = pool.allocate();  // the free blocks
  EXPECT_EQ(pool.evictions(), 0);
  const int32_t P2 = pool.allocate();
  EXPECT_EQ(P2, P);
  EXPECT_EQ(pool.evictions(), 1);
  EXPECT_EQ(pool.lookup(hp, 0, pt), -1);
  // The same content registered again: a new registration, which the old child does not
  // belong to (its K/V were computed after the old parent; here the same, in general not).
  ASSERT_EQ(pool.register_block(P2, hp, 0, pt), P2);
  EXPECT_EQ(pool.lookup(hp, 0, pt), P2);
  EXPECT_EQ(pool.lookup(hc, pool.registration(P2), ct), -1);
  // A new child replaces the stale entry, which becomes a free block.
  pool.release(X);
  const int32_t C2 = pool.allocate();
  ASSERT_EQ(pool.register_block(C2, hc, pool.registration(P2), ct), C2);
  EXPECT_EQ(pool.lookup(hc, pool.registration(P2), ct), C2);
  EXPECT_EQ(pool.cached_blocks(), 2);
  EXPECT_FALSE(pool.is_cached(C));
  EXPECT_EQ(pool.free_blocks(), 1);  // C, no longer cached
  pool.release(Y);
  pool.release(P2);
  pool.release(C2);
  EXPECT_EQ(pool.used_blocks(), 0);
  EXPECT_EQ(pool.evictable_blocks(), 2);
}

namespace {

std::unique_ptr<LlamaModel>& tiny() {
  static std::unique_ptr<LlamaModel> m = LlamaModel::load(test::tiny_model_dir());
  return m;
}

// Prompts that share a long common start (a "system prompt" of tokenized text), then
// differ; lengths vary so that the shared part ends inside and at block boundaries.
std::vector<std::vector<int32_t>> shared_prompts(int n, int64_t* shared_len = nullptr) {
  Tokenizer tok = Tokenizer::from_file(test::tiny_model_dir() + "/tokenizer.json");
  std::vector<int32_t> sys = tok.encode(
      "Once upon a time, there was a little girl named Lily. She loved to play outside in the sun with her "
      "big red ball. One day, her mom said",
      true);
  if (shared_len) *shared_len = static_cast<int64_t>(sys.size());
  const char* tails[] = {" she could go to the park.", " it was time to go home.", " no.",
                         " they would bake a cake together and eat it after lunch.", "", " Lily,",
                         " the ball was too big.", " yes"};
  std::vector<std::vector<int32_t>> out;
  for (int i = 0; i < n; ++i) {
    std::vector<int32_t> p = sys;
    std::vector<int32_t> t = tok.encode(tails[i % 8], false);
    p.insert(p.end(), t.begin(), t.end());
    for (int r = 0; r < i / 8; ++r) p.push_back(static_cast<int32_t>(10 + r + i));
    out.push_back(p);
  }
  return out;
}

using test::drain_all;
using test::ids_of;

std::vector<std::vector<int32_t>> reference(const std::vector<std::vector<int32_t>>& ps, int64_t max_tokens) {
  std::vector<std::vector<int32_t>> out;
  for (const auto& p : ps) {
    GenerateOptions g;
    g.max_new_tokens = max_tokens;
    g.stop_at_eos = false;
    out.push_back(generate(*tiny(), p, g).ids);
  }
  return out;
}

EngineConfig config(bool caching) {
  EngineConfig ec;
  ec.profile = false;
  ec.kv_blocks = 256;
  ec.block_size = 8;
  ec.prefix_caching = caching;
  return ec;
}

EngineRequest make_request(const std::vector<int32_t>& p, int64_t max_tokens, int logprobs = 3,
                           bool prompt_logprobs = false) {
  EngineRequest r;
  r.prompt = p;
  r.max_tokens = max_tokens;
  r.ignore_eos = true;
  r.logprobs = logprobs;
  r.prompt_logprobs = prompt_logprobs;
  r.stream = std::make_shared<RequestStream>();
  return r;
}

struct Outcome {
  std::vector<std::vector<TokenEvent>> events;
  EngineStats stats;
};

// All at once (sequential = false) or each after the previous finished.
Outcome run(Engine& engine, const std::vector<std::vector<int32_t>>& ps, int64_t max_tokens, bool sequential,
        int logprobs = 3, bool prompt_logprobs = false) {
  Outcome out;
  out.events.resize(ps.size());
  std::vector<std::shared_ptr<RequestStream>> streams;
  std::vector<EngineRequest> batch;
  for (size_t i = 0; i < ps.size(); ++i) {
    EngineRequest r = make_request(ps[i], max_tokens, logprobs, prompt_logprobs);
    streams.push_back(r.stream);
    if (sequential) {
      std::vector<EngineRequest> one;
      one.push_back(std::move(r));
      EXPECT_EQ(engine.submit(std::move(one)), Engine::Submit::Ok);
      EXPECT_TRUE(streams[i]->wait_finished(std::chrono::seconds(60)));
    } else {
      batch.push_back(std::move(r));
    }
  }
  if (!sequential) {
    EXPECT_EQ(engine.submit(std::move(batch)), Engine::Submit::Ok);
  }
  for (size_t i = 0; i < ps.size(); ++i) {
    EXPECT_TRUE(streams[i]->wait_finished(std::chrono::seconds(60)));
    EXPECT_EQ(streams[i]->finish_reason(), FinishReason::Length) << streams[i]->error();
    out.events[i] = drain_all(*streams[i]);
  }
  out.stats = engine.stats();
  return out;
}

Outcome run_fresh(EngineConfig ec, const std::vector<std::vector<int32_t>>& ps, int64_t max_tokens, bool sequential,
              int logprobs = 3, bool prompt_logprobs = false) {
  Engine engine(*tiny(), ec);
  engine.start();
  return run(engine, ps, max_tokens, sequential, logprobs, prompt_logprobs);
}

// Same tokens, same logprobs, same top alternatives. The logprobs are compared to 1e-4:
// the cached K/V are the rows a recompute writes, but the CPU matmul reduces in a
// different order for a one-row chunk (sgemv) than for a larger one (sgemm), and taking a
// prefix changes the chunk sizes; the ids must match exactly.
void expect_same_events(const Outcome& a, const Outcome& b, const std::string& what) {
  ASSERT_EQ(a.events.size(), b.events.size());
  for (size_t i = 0; i < a.events.size(); ++i) {
    ASSERT_EQ(a.events[i].size(), b.events[i].size()) << what << " request " << i;
    for (size_t k = 0; k < a.events[i].size(); ++k) {
      const TokenEvent &x = a.events[i][k], &y = b.events[i][k];
      EXPECT_EQ(x.id, y.id) << what << " request " << i << " event " << k;
      EXPECT_EQ(x.is_prompt, y.is_prompt);
      ASSERT_EQ(x.has_logprob, y.has_logprob);
      if (!x.has_logprob) continue;
      EXPECT_NEAR(x.lp.logprob, y.lp.logprob, 1e-4) << what << " request " << i << " event " << k;
      ASSERT_EQ(x.lp.top.size(), y.lp.top.size());
      for (size_t t = 0; t < x.lp.top.size(); ++t) {
        EXPECT_EQ(x.lp.top[t].first, y.lp.top[t].first) << what << " request " << i << " event " << k;
        EXPECT_NEAR(x.lp.top[t].second, y.lp.top[t].second, 1e-4);
      }
    }
  }
}

// Every reference returned: no block in use, every cached block evictable.
void expect_all_returned(const EngineStats& st) {
  EXPECT_EQ(st.kv_blocks_used, 0);
  EXPECT_EQ(st.kv_blocks_cached, st.kv_blocks_evictable);
}

std::vector<int32_t> generated_ids(const std::vector<TokenEvent>& evs) {
  std::vector<int32_t> ids;
  for (const TokenEvent& e : evs)
    if (!e.is_prompt) ids.push_back(e.id);
  return ids;
}

}  // namespace

TEST(EnginePrefixCache, SequentialRequestsReuseTheSharedPrefixAndGetTheSameResults) {
  int64_t shared = 0;
  auto ps = shared_prompts(8, &shared);
  ASSERT_GE(shared, 24);
  auto ref = reference(ps, 12);
  Outcome off = run_fresh(config(false), ps, 12, true);
  Outcome on = run_fresh(config(true), ps, 12, true);
  expect_same_events(off, on, "sequential");
  for (size_t i = 0; i < ps.size(); ++i) EXPECT_EQ(generated_ids(on.events[i]), ref[i]) << "request " << i;
  EXPECT_EQ(off.stats.prefix_cache_hits, 0);
  EXPECT_EQ(off.stats.kv_blocks_cached, 0);
  // Every request after the first finds at least the shared prompt's full blocks (more
  // where it repeats an earlier request's longer prefix).
  int64_t prompt_tokens = 0, min_hits = 0;
  for (size_t i = 0; i < ps.size(); ++i) {
    prompt_tokens += static_cast<int64_t>(ps[i].size());
    if (i > 0) min_hits += std::min<int64_t>(shared, static_cast<int64_t>(ps[i].size()) - 1) / 8 * 8;
  }
  EXPECT_EQ(on.stats.prefix_cache_queries, prompt_tokens);
  EXPECT_GE(on.stats.prefix_cache_hits, min_hits);
  EXPECT_LT(on.stats.prefix_cache_hits, prompt_tokens);
  expect_all_returned(on.stats);
  EXPECT_GT(on.stats.kv_blocks_cached, 0);
}

TEST(EnginePrefixCache, ConcurrentRequestsGetTheSameResults) {
  auto ps = shared_prompts(16);
  auto ref = reference(ps, 10);
  for (SchedulerPolicy pol : {SchedulerPolicy::Slo, SchedulerPolicy::Fixed, SchedulerPolicy::NoChunking}) {
    EngineConfig on_cfg = config(true), off_cfg = config(false);
    for (EngineConfig* c : {&on_cfg, &off_cfg}) {
      c->sched.policy = pol;
      c->sched.max_batch = 4;            // later admissions find what earlier ones wrote
      c->sched.max_batched_tokens = 20;  // chunked prefill: blocks complete chunk by chunk
      c->sched.min_prefill_chunk = 5;
    }
    Outcome off = run_fresh(off_cfg, ps, 10, false);
    Outcome on = run_fresh(on_cfg, ps, 10, false);
    expect_same_events(off, on, policy_name(pol));
    for (size_t i = 0; i < ps.size(); ++i)
      EXPECT_EQ(generated_ids(on.events[i]), ref[i]) << policy_name(pol) << " request " << i;
    EXPECT_GT(on.stats.prefix_cache_hits, 0) << policy_name(pol);
    expect_all_returned(on.stats);
    expect_all_returned(off.stats);
  }
}

TEST(EnginePrefixCache, FullyCachedPromptStillComputesItsLastToken) {
  // A prompt of exactly 4 blocks and one of 4 blocks + 1 token: the second time round
  // 3 and 4 blocks are taken and the rest (8 tokens, 1 token) computed.
  auto base = shared_prompts(1)[0];
  ASSERT_GE(base.size(), 33u);
  std::vector<int32_t> p32(base.begin(), base.begin() + 32), p33(base.begin(), base.begin() + 33);
  auto ref = reference({p32, p33}, 6);
  Engine engine(*tiny(), config(true));
  engine.start();
  Outcome first = run(engine, {p32, p33}, 6, true);
  const int64_t hits0 = first.stats.prefix_cache_hits;
  EXPECT_EQ(hits0, 32);  // p33 found p32's four blocks (p32's own cap was 3 blocks)
  Outcome again = run(engine, {p32, p33}, 6, true);
  EXPECT_EQ(again.stats.prefix_cache_hits - hits0, 24 + 32);
  EXPECT_EQ(generated_ids(again.events[0]), ref[0]);
  EXPECT_EQ(generated_ids(again.events[1]), ref[1]);
  expect_same_events(first, again, "fully cached");
  // A one-token prompt has nothing to take.
  const std::vector<std::vector<int32_t>> single = {std::vector<int32_t>(1, p32[0])};
  Outcome one = run(engine, single, 3, true);
  EXPECT_EQ(one.stats.prefix_cache_hits, again.stats.prefix_cache_hits);
  expect_all_returned(one.stats);
}

TEST(EnginePrefixCache, PromptLogprobsRequestsComputeTheirWholePrompt) {
  auto ps = shared_prompts(4);
  Outcome off = run_fresh(config(false), ps, 4, true, 2, /*prompt_logprobs=*/true);
  Outcome on = run_fresh(config(true), ps, 4, true, 2, true);
  expect_same_events(off, on, "prompt logprobs");
  EXPECT_EQ(on.stats.prefix_cache_queries, 0);  // never looked up
  EXPECT_EQ(on.stats.prefix_cache_hits, 0);
  for (size_t i = 0; i < ps.size(); ++i) {
    int64_t prompt_events = 0;
    for (const TokenEvent& e : on.events[i]) prompt_events += e.is_prompt;
    EXPECT_EQ(prompt_events, static_cast<int64_t>(ps[i].size()));
  }
  // Their blocks are still registered for others: a plain request afterwards hits.
  Engine engine(*tiny(), config(true));
  engine.start();
  run(engine, {ps[0]}, 2, true, 2, true);
  Outcome plain = run(engine, {ps[1]}, 4, true);
  EXPECT_GT(plain.stats.prefix_cache_hits, 0);
  expect_all_returned(plain.stats);
}

TEST(EnginePrefixCache, EvictionUnderPressureKeepsResults) {
  // A pool of 24 blocks of 8 for prompts of ~5-6 blocks + 8 generated: cached blocks are
  // evicted all the time, by prompts that share the prefix and by ones that do not.
  auto shared = shared_prompts(8);
  std::vector<std::vector<int32_t>> ps;
  for (size_t i = 0; i < shared.size(); ++i) {
    ps.push_back(shared[i]);
    std::vector<int32_t> other = shared[i];
    for (size_t k = 1; k < other.size(); ++k) other[k] = static_cast<int32_t>(3 + (k * 7 + i * 13) % 250);
    ps.push_back(other);
  }
  auto ref = reference(ps, 8);
  EngineConfig ec = config(true);
  ec.kv_blocks = 24;
  ec.max_model_len = 96;
  ec.sched.max_batch = 3;
  Engine engine(*tiny(), ec);
  engine.start();
  Outcome seq = run(engine, ps, 8, true);
  Outcome conc = run(engine, ps, 8, false);
  for (size_t i = 0; i < ps.size(); ++i) {
    EXPECT_EQ(generated_ids(seq.events[i]), ref[i]) << "sequential " << i;
    EXPECT_EQ(generated_ids(conc.events[i]), ref[i]) << "concurrent " << i;
  }
  expect_same_events(seq, conc, "sequential vs concurrent");
  EXPECT_GT(conc.stats.kv_blocks_evicted, 0);
  EXPECT_GT(conc.stats.prefix_cache_hits, 0);
  expect_all_returned(conc.stats);
  EXPECT_LE(conc.stats.kv_blocks_cached, 24);
}

TEST(EnginePrefixCache, PreemptionWithSharedBlocksKeepsResults) {
  auto ps = shared_prompts(12);
  auto ref = reference(ps, 40);
  EngineConfig ec = config(true);
  ec.block_size = 4;
  ec.max_model_len = 128;
  ec.kv_blocks = 128 / 4 + 10;  // barely more than one full-length sequence
  ec.sched.max_batch = 12;
  Engine engine(*tiny(), ec);
  engine.start();
  Outcome r = run(engine, ps, 40, false);
  for (size_t i = 0; i < ps.size(); ++i) EXPECT_EQ(generated_ids(r.events[i]), ref[i]) << "request " << i;
  EXPECT_GT(r.stats.preemptions, 0);
  EXPECT_GT(r.stats.prefix_cache_hits, 0);
  expect_all_returned(r.stats);
  EngineConfig off = ec;
  off.prefix_caching = false;
  Outcome o = run_fresh(off, ps, 40, false);
  expect_same_events(o, r, "preemption");
}

TEST(EnginePrefixCache, CancellingASharingRequestReturnsItsReferences) {
  auto ps = shared_prompts(2);
  Engine engine(*tiny(), config(true));
  engine.start();
  run(engine, {ps[0]}, 2, true);  // caches the shared prefix
  EngineRequest r = make_request(ps[1], 400);
  auto s = r.stream;
  std::vector<EngineRequest> v;
  v.push_back(std::move(r));
  ASSERT_EQ(engine.submit(std::move(v)), Engine::Submit::Ok);
  for (int i = 0; i < 2000 && engine.stats().generated_tokens < 5; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  EXPECT_GT(engine.stats().prefix_cache_hits, 0);
  EXPECT_GT(engine.stats().kv_blocks_used, 0);
  s->cancel();
  ASSERT_TRUE(s->wait_finished(std::chrono::seconds(10)));
  EXPECT_EQ(s->finish_reason(), FinishReason::Cancelled);
  expect_all_returned(engine.stats());
}
