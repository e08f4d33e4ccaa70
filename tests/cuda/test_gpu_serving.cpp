// The serving engine on the GPU backend (src/gpu/gpu_step_model.h): many concurrent
// greedy requests, continuous batching and chunked prefill over the engine's paged pool
// with the K/V on the GPU. Each request must generate what the CPU engine generates for it
// alone, up to the first step where the CPU's top two logits are a near tie for fp16
// (margin < 0.1); the pool must be empty afterwards; the cost-model profile (with the
// ECs' share measured on the GPU) must run. Skips without a GPU.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>

#include "cuda/gpu_test_util.h"
#include "gpu/gpu_step_model.h"
#include "engine/engine_loop.h"
#include "model/kv_cache.h"
#include "model/load_hf.h"
#include "quant/cpu_model.h"
#include "test_paths.h"
#include "tokenizer/tokenizer.h"

namespace spear::cuda {
namespace {


struct Greedy {
  std::vector<int32_t> ids;
  std::vector<double> margins;  // top-1 minus top-2 logit at each step
};

Greedy cpu_greedy(const LlamaModel& m, const std::vector<int32_t>& prompt, int n) {
  const ModelConfig& cfg = m.config();
  ContiguousKVCache kv(cfg.num_layers, static_cast<int64_t>(prompt.size()) + n + 1, cfg.kv_dim());
  std::vector<float> logits = m.forward(prompt.data(), prompt.size(), kv, 0, false);
  Greedy g;
  int64_t pos = static_cast<int64_t>(prompt.size());
  for (int i = 0; i < n; ++i, ++pos) {
    std::vector<float> sorted = logits;
    std::partial_sort(sorted.begin(), sorted.begin() + 2, sorted.end(), std::greater<float>());
    g.margins.push_back(sorted[0] - sorted[1]);
    int32_t id = static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
    g.ids.push_back(id);
    logits = m.forward(&id, 1, kv, pos, false);
  }
  return g;
}

TEST(GpuServing, ConcurrentGreedyMatchesCpu) {
  REQUIRE_GPU();
  const LlamaWeights weights = load_hf_weights(test::tiny_model_dir());
  auto model = build_cpu_model(weights);
  Tokenizer tok = Tokenizer::from_file(test::tiny_model_dir() + "/tokenizer.json");
  const char* texts[] = {"Once upon a time", "The little dog", "Lily and Tom went to the park",
                         "One day, a big bear", "She was happy because", "The sun",
                         "There was a boy named Tim. He liked to", "A cat"};
  std::vector<std::vector<int32_t>> ps;
  for (int i = 0; i < 12; ++i) {
    std::vector<int32_t> p = tok.encode(texts[i % 8], true);
    if (i >= 8) {
      std::vector<int32_t> more = tok.encode(texts[(i + 3) % 8], false);
      p.insert(p.end(), more.begin(), more.end());
    }
    ps.push_back(p);
  }
  const int n_new = 24;

  EngineConfig ec;
  ec.profile = true;  // runs GpuStepModel::profile_ec and the step profile on the GPU
  ec.block_size = 16;
  ec.max_model_len = 256;
  ec.sched.max_batch = 8;
  ec.sched.max_batched_tokens = 32;  // forces chunked prefill next to decodes
  GpuServeOptions go;
  go.max_batch = 8;
  go.max_tokens = 32;
  go.max_len = 256;
  go.block_size = 16;
  go.gpu_memory_fraction = 0.5;
  GpuStepModel backend(weights, go);
  EXPECT_GT(backend.kv_blocks(), 0);
  Engine engine(backend, ec);
  engine.start();
  std::vector<std::shared_ptr<RequestStream>> streams;
  std::vector<EngineRequest> reqs;
  for (const auto& p : ps) {
    EngineRequest r;
    r.prompt = p;
    r.max_tokens = n_new;
    r.ignore_eos = true;
    r.stream = std::make_shared<RequestStream>();
    streams.push_back(r.stream);
    reqs.push_back(std::move(r));
  }
  ASSERT_EQ(engine.submit(std::move(reqs)), Engine::Submit::Ok);
  for (size_t i = 0; i < ps.size(); ++i) {
    ASSERT_TRUE(streams[i]->wait_finished(std::chrono::seconds(60))) << "request " << i;
    std::vector<TokenEvent> evs;
    {
      std::lock_guard<std::mutex> lk(streams[i]->notifier().mu);
      streams[i]->drain(evs);
    }
    ASSERT_EQ(streams[i]->finish_reason(), FinishReason::Length) << "request " << i;
    Greedy want = cpu_greedy(*model, ps[i], n_new);
    ASSERT_EQ(evs.size(), want.ids.size());
    for (size_t t = 0; t < evs.size(); ++t) {
      if (evs[t].id == want.ids[t]) continue;
      EXPECT_LT(want.margins[t], 0.1) << "request " << i << " diverges at step " << t
                                      << " where the CPU's choice is not a near tie";
      break;
    }
  }
  EXPECT_EQ(engine.stats().kv_blocks_used, 0);
  engine.stop();
}

}  // namespace
}  // namespace spear::cuda
