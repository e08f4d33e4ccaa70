// The sampler's penalties (vLLM semantics), min_p and their order with temperature,
// top-k and top-p, against values computed by hand.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "core/error.h"
#include "core/philox.h"
#include "engine/sampler.h"

namespace spear {
namespace {

// Logits of a 5-token vocabulary; the prompt holds tokens 0 and 3, the output 1, 1, 2.
const std::vector<float> kLogits = {2.0f, 1.0f, 0.5f, -1.0f, 0.0f};
const std::vector<int32_t> kPrompt = {0, 3, 3};
const std::vector<int32_t> kOutput = {1, 1, 2};
TokenHistory history() { return {kPrompt, kOutput}; }

std::vector<float> penalized(const SamplingParams& p, const TokenHistory& h) {
  std::vector<float> l = kLogits;
  apply_penalties(l.data(), static_cast<int64_t>(l.size()), p, h);
  return l;
}

TEST(EngineSampler, RepetitionPenaltyDividesPositiveAndMultipliesNegativeLogitsOfSeenTokens) {
  SamplingParams p;
  p.repetition_penalty = 2.0f;
  // 0: prompt, 2 > 0 -> 1; 1: output, 1 -> 0.5; 2: output, 0.5 -> 0.25; 3: prompt, -1 -> -2;
  // 4: never seen, unchanged. A token seen twice is penalized once.
  const std::vector<float> want = {1.0f, 0.5f, 0.25f, -2.0f, 0.0f};
  const std::vector<float> got = penalized(p, history());
  for (size_t i = 0; i < want.size(); ++i) EXPECT_FLOAT_EQ(got[i], want[i]) << i;
  // Below 1 it rewards repetition: 2 / 0.5 = 4, -1 * 0.5 = -0.5.
  p.repetition_penalty = 0.5f;
  EXPECT_FLOAT_EQ(penalized(p, history())[0], 4.0f);
  EXPECT_FLOAT_EQ(penalized(p, history())[3], -0.5f);
}

TEST(EngineSampler, FrequencyAndPresencePenaltiesCountOutputTokensOnly) {
  SamplingParams p;
  p.frequency_penalty = 0.1f;
  p.presence_penalty = 0.5f;
  // 1 appears twice: 1 - 2*0.1 - 0.5 = 0.3; 2 once: 0.5 - 0.1 - 0.5 = -0.1; the prompt's
  // tokens 0 and 3 are untouched (OpenAI and vLLM penalize generated tokens only).
  const std::vector<float> want = {2.0f, 0.3f, -0.1f, -1.0f, 0.0f};
  const std::vector<float> got = penalized(p, history());
  for (size_t i = 0; i < want.size(); ++i) EXPECT_FLOAT_EQ(got[i], want[i]) << i;
  // Negative values encourage repetition.
  p.frequency_penalty = -1.0f;
  p.presence_penalty = 0.0f;
  EXPECT_FLOAT_EQ(penalized(p, history())[1], 3.0f);
}

TEST(EngineSampler, AllThreePenaltiesInVllmOrder) {
  SamplingParams p;
  p.repetition_penalty = 2.0f;
  p.frequency_penalty = 0.1f;
  p.presence_penalty = 0.5f;
  // Repetition first (as above: 1, 0.5, 0.25, -2, 0), then frequency and presence:
  // 1: 0.5 - 0.2 - 0.5 = -0.2; 2: 0.25 - 0.1 - 0.5 = -0.35.
  const std::vector<float> want = {1.0f, -0.2f, -0.35f, -2.0f, 0.0f};
  const std::vector<float> got = penalized(p, history());
  for (size_t i = 0; i < want.size(); ++i) EXPECT_FLOAT_EQ(got[i], want[i]) << i;
  // Ids outside the vocabulary in the history are ignored, not written.
  const std::vector<int32_t> bad = {-1, 5, 1000};
  const std::vector<float> same = penalized(p, {bad, bad});
  for (size_t i = 0; i < kLogits.size(); ++i) EXPECT_FLOAT_EQ(same[i], kLogits[i]) << i;
}

TEST(EngineSampler, PenaltiesApplyToGreedyToo) {
  SamplingParams p;  // temperature 0
  const std::vector<int32_t> out = {0, 0, 0};
  Sampler plain(p);
  EXPECT_EQ(plain.sample(kLogits.data(), 5, {kPrompt, out}), 0);
  p.frequency_penalty = 1.0f;  // token 0: 2 - 3 = -1; token 1 (1.0) is now the best
  Sampler pen(p);
  EXPECT_EQ(pen.sample(kLogits.data(), 5, {kPrompt, out}), 1);
  EXPECT_EQ(pen.sample(kLogits.data(), 5), 0);  // without a history nothing is penalized
}

TEST(EngineSampler, DistributionAfterPenaltiesAndTemperature) {
  SamplingParams p;
  p.temperature = 0.5f;
  p.repetition_penalty = 2.0f;
  p.frequency_penalty = 0.1f;
  p.presence_penalty = 0.5f;
  // Penalized logits {1, -0.2, -0.35, -2, 0} / 0.5 = {2, -0.4, -0.7, -4, 0}.
  const double z = std::exp(2.0) + std::exp(-0.4) + std::exp(-0.7) + std::exp(-4.0) + std::exp(0.0);
  Sampler s(p);
  auto d = s.distribution(kLogits.data(), 5, history());
  ASSERT_EQ(d.size(), 5u);
  const int32_t order[] = {0, 4, 1, 2, 3};
  const double lg[] = {2.0, 0.0, -0.4, -0.7, -4.0};
  for (int i = 0; i < 5; ++i) {
    EXPECT_EQ(d[i].first, order[i]) << i;
    EXPECT_NEAR(d[i].second, std::exp(lg[i]) / z, 1e-6) << i;
  }
}

TEST(EngineSampler, MinPKeepsTokensWithinAFactorOfTheBest) {
  SamplingParams p;
  p.temperature = 1.0f;
  // Probabilities are proportional to e^2, e^1, e^0.5, e^-1, e^0. Relative to the best:
  // 1, e^-1 = 0.368, e^-1.5 = 0.223, e^-3 = 0.050, e^-2 = 0.135.
  p.min_p = 0.2f;  // keeps 0, 1, 2
  Sampler s(p);
  auto d = s.distribution(kLogits.data(), 5);
  ASSERT_EQ(d.size(), 3u);
  const double z = std::exp(2.0) + std::exp(1.0) + std::exp(0.5);
  EXPECT_EQ(d[0].first, 0);
  EXPECT_NEAR(d[0].second, std::exp(2.0) / z, 1e-6);
  EXPECT_EQ(d[1].first, 1);
  EXPECT_NEAR(d[1].second, std::exp(1.0) / z, 1e-6);
  EXPECT_EQ(d[2].first, 2);
  EXPECT_NEAR(d[2].second, std::exp(0.5) / z, 1e-6);
  // The temperature comes first: at T = 2 the ratios are e^-0.5 = 0.61, e^-0.75 = 0.47,
  // e^-1 = 0.37 (token 4), e^-1.5 = 0.22: min_p 0.3 keeps four.
  p.temperature = 2.0f;
  p.min_p = 0.3f;
  EXPECT_EQ(Sampler(p).distribution(kLogits.data(), 5).size(), 4u);
  // min_p 1 keeps the best alone.
  p.min_p = 1.0f;
  Sampler one(p);
  for (int i = 0; i < 20; ++i) EXPECT_EQ(one.sample(kLogits.data(), 5), 0);
}

TEST(EngineSampler, MinPThenTopPOnTheRenormalizedMass) {
  SamplingParams p;
  p.temperature = 1.0f;
  p.min_p = 0.2f;  // 0, 1, 2 left: renormalized masses 0.629, 0.231, 0.140
  p.top_p = 0.8f;  // 0.629 < 0.8 <= 0.860: tokens 0 and 1
  Sampler s(p);
  auto d = s.distribution(kLogits.data(), 5);
  ASSERT_EQ(d.size(), 2u);
  const double z = std::exp(2.0) + std::exp(1.0);
  EXPECT_NEAR(d[0].second, std::exp(2.0) / z, 1e-6);
  EXPECT_NEAR(d[1].second, std::exp(1.0) / z, 1e-6);
  // Without min_p the same top_p keeps three (masses 0.563, 0.207, 0.126, ...: 0.770 < 0.8).
  p.min_p = 0.0f;
  EXPECT_EQ(Sampler(p).distribution(kLogits.data(), 5).size(), 3u);
}

TEST(EngineSampler, SamplesFollowThePenalizedDistribution) {
  SamplingParams p;
  p.temperature = 1.0f;
  p.presence_penalty = 2.0f;
  p.seed = 7;
  Sampler s(p);
  const std::vector<int32_t> out = {0};
  auto d = s.distribution(kLogits.data(), 5, {{}, out});
  std::vector<int> counts(5);
  const int N = 20000;
  for (int i = 0; i < N; ++i) counts[s.sample(kLogits.data(), 5, {{}, out})]++;
  for (const auto& [id, prob] : d) EXPECT_NEAR(counts[id] / double(N), prob, 0.015) << id;
  // Token 0 (2 - 2 = 0) now ties token 4 instead of dominating.
  EXPECT_NEAR(counts[0] / double(N), counts[4] / double(N), 0.03);
}

// Philox4x32-10 against Random123's known-answer vectors (kat_vectors: counter, key ->
// output), and the uniform built from it.
TEST(EngineSampler, PhiloxKnownAnswers) {
  const Philox4 a = philox4x32_10(0, 0, 0, 0, 0, 0);
  EXPECT_EQ(a.v[0], 0x6627e8d5u);
  EXPECT_EQ(a.v[1], 0xe169c58du);
  EXPECT_EQ(a.v[2], 0xbc57ac4cu);
  EXPECT_EQ(a.v[3], 0x9b00dbd8u);
  const uint32_t f = 0xffffffffu;
  const Philox4 b = philox4x32_10(f, f, f, f, f, f);
  EXPECT_EQ(b.v[0], 0x408f276du);
  EXPECT_EQ(b.v[1], 0x41c83b0eu);
  EXPECT_EQ(b.v[2], 0xa20bc7c6u);
  EXPECT_EQ(b.v[3], 0x6d5451fdu);
  const Philox4 c = philox4x32_10(0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u, 0xa4093822u, 0x299f31d0u);
  EXPECT_EQ(c.v[0], 0xd16cfe09u);
  EXPECT_EQ(c.v[1], 0x94fdccebu);
  EXPECT_EQ(c.v[2], 0x5001e420u);
  EXPECT_EQ(c.v[3], 0x24126ea1u);
  double mean = 0;
  for (uint64_t n = 0; n < 100000; ++n) {
    const double u = philox_uniform(42, n);
    ASSERT_GE(u, 0.0);
    ASSERT_LT(u, 1.0);
    mean += u / 100000;
  }
  EXPECT_NEAR(mean, 0.5, 0.005);
  EXPECT_NE(philox_uniform(42, 0), philox_uniform(43, 0));
}

// A draw is a function of (seed, draw index): sample() counts draws from 0, sample_at()
// takes the index, and both agree.
TEST(EngineSampler, DrawsAreIndexedBySeedAndPosition) {
  SamplingParams p;
  p.temperature = 1.0f;
  p.seed = 99;
  Sampler a(p), b(p);
  for (uint64_t i = 0; i < 50; ++i) EXPECT_EQ(a.sample(kLogits.data(), 5), b.sample_at(kLogits.data(), 5, i)) << i;
  EXPECT_EQ(Sampler(p).sample_at(kLogits.data(), 5, 17), Sampler(p).sample_at(kLogits.data(), 5, 17));
}

TEST(EngineSampler, OutOfRangeParametersAreRefused) {
  auto bad = [](auto set) {
    SamplingParams p;
    set(p);
    EXPECT_THROW(Sampler{p}, Error);
  };
  bad([](SamplingParams& p) { p.min_p = -0.1f; });
  bad([](SamplingParams& p) { p.min_p = 1.5f; });
  bad([](SamplingParams& p) { p.presence_penalty = 2.5f; });
  bad([](SamplingParams& p) { p.frequency_penalty = -2.5f; });
  bad([](SamplingParams& p) { p.repetition_penalty = 0.0f; });
  bad([](SamplingParams& p) { p.repetition_penalty = NAN; });
}

}  // namespace
}  // namespace spear
