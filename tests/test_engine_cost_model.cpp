// The scheduler's cost model: EC inventory (typed, from Linear::ec_rank), least-squares fit
// (non-negative), online refit, and the EC-blind variant.
#include <gtest/gtest.h>

#include "engine/cost_model.h"
#include "engine/step_model.h"
#include "engine/scheduler.h"
#include "model/llama.h"
#include "test_paths.h"

using namespace spear;

TEST(EngineCostModel, FitsAndRefitsOnline) {
  // Synthetic truth: 2 ms + 0.1 ms/token + 0.05 ms/seq + 0.01 ms per 1024 pairs.
  auto truth = [](const StepShape& s) { return 2e-3 + 1e-4 * s.tokens + 5e-5 * s.seqs + 1e-5 * s.attn / 1024.0; };
  std::vector<std::pair<StepShape, double>> prof;
  for (int64_t t : {1, 8, 32, 128, 512})
    for (int64_t s : {1, 4}) {
      StepShape sh{t, std::min(s, t), attn_pairs(64, t)};
      prof.push_back({sh, truth(sh)});
    }
  CostModel cm;
  cm.set_profile(prof);
  StepShape q{100, 3, attn_pairs(10, 100)};
  EXPECT_NEAR(cm.predict(q), truth(q), 0.02 * truth(q));
  // The backend gets 1.5x slower: online refit follows.
  for (int i = 0; i < 300; ++i) {
    StepShape s{1 + (i * 37) % 300, 1 + i % 8, attn_pairs(i % 200, 1 + (i * 37) % 300)};
    cm.observe(s, 1.5 * truth(s));
  }
  EXPECT_NEAR(cm.predict(q), 1.5 * truth(q), 0.1 * truth(q));
  for (double c : cm.coefficients()) EXPECT_GE(c, 0);
}

TEST(EngineCostModel, EcBlindIgnoresEcWork) {
  CostModel aware, blind;
  aware.set_ec_cost(10, 1e-4, 2e-5);
  blind.set_ec_cost(10, 1e-4, 2e-5);
  blind.set_ec_aware(false);
  StepShape s{50, 5, 1000};
  EXPECT_NEAR(aware.predict(s) - blind.predict(s), 10 * 1e-4 + 50 * 2e-5, 1e-12);
}

TEST(EngineCostModel, ProfilesTheTinyModel) {
  auto model = LlamaModel::load(test::tiny_model_dir());
  CostModel cm;
  CpuStepModel step(*model);
  profile_cost_model(step, 512, cm);
  EXPECT_EQ(cm.ec_calls(), 0);  // a float model has no ECs
  StepShape one{1, 1, 64}, many{256, 1, attn_pairs(0, 256)};
  EXPECT_GT(cm.predict(one), 0);
  EXPECT_GT(cm.predict(many), cm.predict(one));
}

TEST(EngineCostModel, SloBudgetShrinksWhenDecodesAreExpensive) {
  // A scheduler with a cost model where each token costs 1 ms and the TPOT SLO is
  // 20 ms: with 10 decodes running, at most ~7 prefill tokens fit (0.85 * 20 - 10),
  // but never fewer than min_prefill_chunk.
  CostModel cm;
  cm.set_profile({{{1, 1, 0}, 1e-3}, {{10, 1, 0}, 1e-2}, {{100, 1, 0}, 1e-1}, {{100, 50, 0}, 1e-1}});
  BlockPool pool(1000, 16, 1, 8);
  SchedulerConfig sc;
  sc.slo_tpot_s = 0.02;
  sc.min_prefill_chunk = 2;
  sc.max_batch = 64;
  Scheduler sched(sc, pool, cm);
  uint64_t order = 0;
  auto seq = [&](int64_t n) {
    EngineRequest r;
    r.prompt.assign(n, 1);
    r.max_tokens = 100;
    r.stream = std::make_shared<RequestStream>();
    return std::make_unique<Sequence>(std::move(r), pool, order++, 0.0);
  };
  // 10 sequences already decoding.
  for (int i = 0; i < 10; ++i) sched.add(seq(1));
  StepPlan p0 = sched.schedule();  // admits them (1-token prompts)
  for (auto& c : p0.chunks) {
    c.seq->n_computed += c.n_tokens;
    c.seq->tokens.push_back(5);  // as if a token had been sampled
  }
  sched.add(seq(500));
  StepPlan p = sched.schedule();
  EXPECT_EQ(p.n_decode, 10);
  EXPECT_GE(p.n_prefill_tokens, 2);
  EXPECT_LE(p.n_prefill_tokens, 8);
  EXPECT_LE(p.predicted_s, 0.02);
}
