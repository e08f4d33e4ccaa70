// The engine loop: continuous batching, chunked prefill and preemption must not
// change what a request generates; cancellation frees KV blocks; the scheduler's
// policies all run to completion.
#include <gtest/gtest.h>

#include <chrono>
#include <thread>

#include "engine/engine_loop.h"
#include "engine/generate.h"
#include "engine/sampler.h"
#include "engine/step_model.h"
#include "test_engine_streams.h"
#include "test_paths.h"
#include "tokenizer/tokenizer.h"

using namespace spear;

namespace {

std::unique_ptr<LlamaModel>& tiny() {
  static std::unique_ptr<LlamaModel> m = LlamaModel::load(test::tiny_model_dir());
  return m;
}

std::vector<std::vector<int32_t>> prompts(int n) {
  Tokenizer tok = Tokenizer::from_file(test::tiny_model_dir() + "/tokenizer.json");
  const char* texts[] = {"Once upon a time", "The little dog", "Lily and Tom went to the park",
                         "One day, a big bear", "She was happy because", "The sun",
                         "There was a boy named Tim. He liked to", "A cat"};
  std::vector<std::vector<int32_t>> out;
  for (int i = 0; i < n; ++i) {
    std::vector<int32_t> p = tok.encode(texts[i % 8], true);
    // Vary lengths beyond the 8 texts: repeat the text a few times.
    for (int r = 0; r < i / 8; ++r) {
      std::vector<int32_t> more = tok.encode(texts[(i + r) % 8], false);
      p.insert(p.end(), more.begin(), more.end());
    }
    out.push_back(p);
  }
  return out;
}

using test::drain_all;
using test::ids_of;

// Runs every prompt through the engine concurrently; returns generated ids.
std::vector<std::vector<int32_t>> run_engine(EngineConfig ec, const std::vector<std::vector<int32_t>>& ps,
                                             int64_t max_tokens, Engine** out_engine = nullptr) {
  Engine engine(*tiny(), ec);
  engine.start();
  std::vector<std::shared_ptr<RequestStream>> streams;
  std::vector<EngineRequest> reqs;
  for (const auto& p : ps) {
    EngineRequest r;
    r.prompt = p;
    r.max_tokens = max_tokens;
    r.ignore_eos = true;
    r.stream = std::make_shared<RequestStream>();
    streams.push_back(r.stream);
    reqs.push_back(std::move(r));
  }
  EXPECT_EQ(engine.submit(std::move(reqs)), Engine::Submit::Ok);
  std::vector<std::vector<int32_t>> out(ps.size());
  for (size_t i = 0; i < ps.size(); ++i) {
    EXPECT_TRUE(streams[i]->wait_finished(std::chrono::seconds(60)));
    out[i] = ids_of(drain_all(*streams[i]));
    EXPECT_EQ(streams[i]->finish_reason(), FinishReason::Length);
  }
  EngineStats st = engine.stats();
  EXPECT_EQ(st.kv_blocks_used, 0);
  if (out_engine) *out_engine = nullptr;
  return out;
}

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

EngineConfig base_config() {
  EngineConfig ec;
  ec.profile = false;
  ec.kv_blocks = 256;
  ec.block_size = 16;
  return ec;
}

}  // namespace

TEST(EngineBatching, GreedyMatchesSingleSequenceGenerate) {
  auto ps = prompts(12);
  auto ref = reference(ps, 24);
  auto got = run_engine(base_config(), ps, 24);
  for (size_t i = 0; i < ps.size(); ++i) EXPECT_EQ(got[i], ref[i]) << "prompt " << i;
}

TEST(EngineBatching, EveryPolicyGivesTheSameTokens) {
  auto ps = prompts(10);
  auto ref = reference(ps, 16);
  for (SchedulerPolicy p : {SchedulerPolicy::Slo, SchedulerPolicy::SloEcBlind, SchedulerPolicy::Fixed,
                            SchedulerPolicy::NoChunking}) {
    EngineConfig ec = base_config();
    ec.sched.policy = p;
    ec.sched.max_batched_tokens = 7;  // forces chunked prefill for chunking policies
    ec.sched.min_prefill_chunk = 3;
    ec.sched.max_batch = 4;           // forces queueing
    auto got = run_engine(ec, ps, 16);
    for (size_t i = 0; i < ps.size(); ++i) EXPECT_EQ(got[i], ref[i]) << policy_name(p) << " prompt " << i;
  }
}

TEST(EngineBatching, PreemptionByRecomputeKeepsResults) {
  auto ps = prompts(16);
  auto ref = reference(ps, 40);
  EngineConfig ec = base_config();
  ec.block_size = 4;
  // Barely more than one full-length sequence: many preemptions.
  ec.max_model_len = 96;
  ec.kv_blocks = 96 / 4 + 8;
  ec.sched.max_batch = 16;
  Engine engine(*tiny(), ec);
  engine.start();
  std::vector<std::shared_ptr<RequestStream>> streams;
  std::vector<EngineRequest> reqs;
  for (const auto& p : ps) {
    EngineRequest r;
    r.prompt = p;
    r.max_tokens = 40;
    r.ignore_eos = true;
    r.stream = std::make_shared<RequestStream>();
    streams.push_back(r.stream);
    reqs.push_back(std::move(r));
  }
  ASSERT_EQ(engine.submit(std::move(reqs)), Engine::Submit::Ok);
  for (size_t i = 0; i < ps.size(); ++i) {
    ASSERT_TRUE(streams[i]->wait_finished(std::chrono::seconds(60)));
    EXPECT_EQ(ids_of(drain_all(*streams[i])), ref[i]) << "prompt " << i;
  }
  EXPECT_GT(engine.stats().preemptions, 0);
  EXPECT_EQ(engine.stats().kv_blocks_used, 0);
}

TEST(EngineBatching, CancellationFreesBlocks) {
  EngineConfig ec = base_config();
  Engine engine(*tiny(), ec);
  engine.start();
  EngineRequest r;
  r.prompt = prompts(1)[0];
  r.max_tokens = 400;
  r.ignore_eos = true;
  r.stream = std::make_shared<RequestStream>();
  auto s = r.stream;
  std::vector<EngineRequest> v;
  v.push_back(std::move(r));
  ASSERT_EQ(engine.submit(std::move(v)), Engine::Submit::Ok);
  // Wait for a few tokens, then cancel.
  for (int i = 0; i < 1000 && engine.stats().generated_tokens < 3; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  EXPECT_GT(engine.stats().kv_blocks_used, 0);
  s->cancel();
  ASSERT_TRUE(s->wait_finished(std::chrono::seconds(10)));
  EXPECT_EQ(s->finish_reason(), FinishReason::Cancelled);
  EXPECT_EQ(engine.stats().kv_blocks_used, 0);
}

TEST(EngineBatching, RejectsRequestsThatCanNeverRun) {
  EngineConfig ec = base_config();
  ec.max_model_len = 32;
  Engine engine(*tiny(), ec);
  auto req = [](std::vector<int32_t> p, int64_t mt) {
    EngineRequest r;
    r.prompt = std::move(p);
    r.max_tokens = mt;
    r.stream = std::make_shared<RequestStream>();
    std::vector<EngineRequest> v;
    v.push_back(std::move(r));
    return v;
  };
  std::string why;
  EXPECT_EQ(engine.submit(req({}, 1), &why), Engine::Submit::Invalid);
  EXPECT_EQ(engine.submit(req({1, 9999}, 1), &why), Engine::Submit::Invalid);
  EXPECT_NE(why.find("vocabulary"), std::string::npos);
  EXPECT_EQ(engine.submit(req(std::vector<int32_t>(32, 5), 1), &why), Engine::Submit::Invalid);
  EXPECT_EQ(engine.submit(req({1, -3}, 1), &why), Engine::Submit::Invalid);
  EXPECT_EQ(engine.submit(req({1, 5}, -1), &why), Engine::Submit::Invalid);
  // The admission queue bound gives QueueFull (the engine is not started: nothing drains).
  EngineConfig small = base_config();
  small.max_waiting = 2;
  Engine e2(*tiny(), small);
  EXPECT_EQ(e2.submit(req({1, 5}, 1)), Engine::Submit::Ok);
  EXPECT_EQ(e2.submit(req({1, 5}, 1)), Engine::Submit::Ok);
  EXPECT_EQ(e2.submit(req({1, 5}, 1)), Engine::Submit::QueueFull);
}

namespace {
// A backend that draws tokens itself (as the GPU backend does on the device): the CPU
// engine's logits, then each chunk's last row drawn by Sampler::sample_at with the draw
// the engine asks for. Counts its use.
class DrawingStepModel final : public StepModel {
 public:
  explicit DrawingStepModel(const LlamaModel& m) : cpu_(m) {}
  const ModelConfig& config() const override { return cpu_.config(); }
  void forward(std::span<const SeqChunk> chunks, float* logits) override {
    ++logit_steps;
    cpu_.forward(chunks, logits);
  }
  bool has_forward_sample() const override { return true; }
  void forward_sample(std::span<const SeqChunk> chunks, std::span<const DrawSpec> draws, int32_t* ids) override {
    ++sample_steps;
    const int64_t V = config().vocab_size;
    std::vector<float> rows(chunks.size() * V);
    for (const SeqChunk& c : chunks) EXPECT_FALSE(c.all_logits);
    EXPECT_EQ(draws.size(), chunks.size());
    cpu_.forward(chunks, rows.data());
    for (size_t i = 0; i < chunks.size(); ++i) {
      EXPECT_FALSE(draws[i].params.has_penalties());
      Sampler s(draws[i].params);
      ids[i] = s.sample_at(rows.data() + i * V, V, draws[i].draw);
    }
  }
  EcInventory ec_inventory() const override { return cpu_.ec_inventory(); }
  bool host_kv() const override { return cpu_.host_kv(); }
  void profile_ec(const EcInventory& inv, CostModel& cm) override { cpu_.profile_ec(inv, cm); }
  std::string device() const override { return "cpu (drawing backend)"; }
  std::vector<std::pair<std::string, int64_t>> memory_by_use() const override { return cpu_.memory_by_use(); }
  int sample_steps = 0, logit_steps = 0;

 private:
  CpuStepModel cpu_;
};
}  // namespace

// Greedy steps through the backend's own argmax give the same tokens as sampling from the
// logits; a request with logprobs in the batch sends its steps through the logits path.
TEST(EngineBatching, BackendArgmaxForGreedySteps) {
  auto ps = prompts(6);
  auto ref = reference(ps, 12);
  DrawingStepModel model(*tiny());
  Engine engine(model, base_config());
  engine.start();
  std::vector<std::shared_ptr<RequestStream>> streams;
  std::vector<EngineRequest> reqs;
  for (size_t i = 0; i < ps.size(); ++i) {
    EngineRequest r;
    r.prompt = ps[i];
    r.max_tokens = 12;
    r.ignore_eos = true;
    if (i == 5) r.logprobs = 0;  // its steps need the logits
    r.stream = std::make_shared<RequestStream>();
    streams.push_back(r.stream);
    reqs.push_back(std::move(r));
  }
  ASSERT_EQ(engine.submit(std::move(reqs)), Engine::Submit::Ok);
  for (size_t i = 0; i < ps.size(); ++i) {
    ASSERT_TRUE(streams[i]->wait_finished(std::chrono::seconds(60)));
    const std::vector<TokenEvent> evs = drain_all(*streams[i]);
    EXPECT_EQ(ids_of(evs), ref[i]) << "prompt " << i;
    if (i == 5) {
      ASSERT_FALSE(evs.empty());
      EXPECT_TRUE(evs[0].has_logprob);
    }
  }
  engine.stop();
  EXPECT_GT(model.logit_steps, 0);  // the steps with the logprobs request in the batch
  // Without the logprobs request every decode step goes through the backend's argmax.
  DrawingStepModel greedy_model(*tiny());
  {
    Engine e2(greedy_model, base_config());
    e2.start();
    EngineRequest r;
    r.prompt = ps[0];
    r.max_tokens = 12;
    r.ignore_eos = true;
    r.stream = std::make_shared<RequestStream>();
    auto st = r.stream;
    std::vector<EngineRequest> one;
    one.push_back(std::move(r));
    ASSERT_EQ(e2.submit(std::move(one)), Engine::Submit::Ok);
    ASSERT_TRUE(st->wait_finished(std::chrono::seconds(60)));
    EXPECT_EQ(ids_of(drain_all(*st)), ref[0]);
    e2.stop();
  }
  EXPECT_EQ(greedy_model.logit_steps, 0);  // the prefill wants its last row only: argmax too
  EXPECT_EQ(greedy_model.sample_steps, 12);
}

// Seeded sampling gives the same tokens whether the backend draws them (on the device) or
// the engine draws from host logits, and whatever shares the batch: the draw is a function
// of (seed, output position) alone. A penalized request in the batch sends its steps
// through the logits path.
TEST(EngineBatching, SeededSamplingIndependentOfPathAndBatch) {
  auto ps = prompts(4);
  auto run = [&](StepModel& model, bool with_penalized) {
    Engine engine(model, base_config());
    engine.start();
    std::vector<std::shared_ptr<RequestStream>> streams;
    std::vector<EngineRequest> reqs;
    for (size_t i = 0; i < ps.size(); ++i) {
      EngineRequest r;
      r.prompt = ps[i];
      r.max_tokens = 10;
      r.ignore_eos = true;
      r.sampling.temperature = 0.9f;
      r.sampling.top_k = 20;
      r.sampling.top_p = 0.9f;
      r.sampling.seed = 100 + i;
      r.stream = std::make_shared<RequestStream>();
      streams.push_back(r.stream);
      reqs.push_back(std::move(r));
    }
    if (with_penalized) {
      EngineRequest r;
      r.prompt = ps[0];
      r.max_tokens = 10;
      r.sampling.temperature = 1.0f;
      r.sampling.repetition_penalty = 1.3f;
      r.stream = std::make_shared<RequestStream>();
      reqs.push_back(std::move(r));
    }
    EXPECT_EQ(engine.submit(std::move(reqs)), Engine::Submit::Ok);
    std::vector<std::vector<int32_t>> out;
    for (auto& st : streams) {
      EXPECT_TRUE(st->wait_finished(std::chrono::seconds(60)));
      out.push_back(ids_of(drain_all(*st)));
    }
    engine.stop();
    return out;
  };
  CpuStepModel host(*tiny());
  DrawingStepModel drawing(*tiny()), mixed(*tiny());
  const auto a = run(host, false), b = run(drawing, false), c = run(mixed, true);
  EXPECT_EQ(a, b);
  EXPECT_EQ(a, c);
  EXPECT_GT(drawing.sample_steps, 0);
  EXPECT_EQ(drawing.logit_steps, 0);
  EXPECT_GT(mixed.logit_steps, 0);
  for (const auto& ids : a) EXPECT_EQ(ids.size(), 10u);
}
