// Unit tests: each CPU op against a float64 reference.
#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "core/dtype.h"
#include "core/error.h"
#include "engine/sampler.h"
#include "eval/perplexity.h"
#include "model/linear.h"
#include "model/ops.h"
#include "model/rope.h"

namespace spear {
namespace {

std::vector<float> randn(size_t n, uint64_t seed, float scale = 1.0f) {
  std::mt19937_64 g(seed);
  std::normal_distribution<float> d(0.0f, scale);
  std::vector<float> v(n);
  for (float& x : v) x = d(g);
  return v;
}

TEST(Ops, RmsnormMatchesFloat64) {
  const int64_t rows = 3, dim = 37;
  auto x = randn(rows * dim, 1), w = randn(dim, 2);
  std::vector<float> y(rows * dim);
  rmsnorm(x.data(), w.data(), y.data(), rows, dim, 1e-5f);
  for (int64_t r = 0; r < rows; ++r) {
    double ss = 0;
    for (int64_t i = 0; i < dim; ++i) ss += double(x[r * dim + i]) * x[r * dim + i];
    double inv = 1.0 / std::sqrt(ss / dim + 1e-5);
    for (int64_t i = 0; i < dim; ++i)
      EXPECT_NEAR(y[r * dim + i], w[i] * x[r * dim + i] * inv, 1e-5);
  }
}

TEST(Ops, DotAxpySoftmaxMatchFloat64) {
  for (int64_t n : {1, 7, 8, 16, 33, 100}) {
    auto a = randn(n, 3 + n), b = randn(n, 4 + n);
    double ref = 0;
    for (int64_t i = 0; i < n; ++i) ref += double(a[i]) * b[i];
    EXPECT_NEAR(dot(a.data(), b.data(), n), ref, 1e-4 * (1 + std::abs(ref)));
    auto y = b;
    axpy(0.5f, a.data(), y.data(), n);
    for (int64_t i = 0; i < n; ++i) EXPECT_NEAR(y[i], b[i] + 0.5 * a[i], 1e-6);
    auto s = a;
    softmax(s.data(), n);
    double mx = *std::max_element(a.begin(), a.end()), z = 0;
    for (float v : a) z += std::exp(double(v) - mx);
    for (int64_t i = 0; i < n; ++i) EXPECT_NEAR(s[i], std::exp(double(a[i]) - mx) / z, 1e-6);
    EXPECT_NEAR(log_softmax_at(a.data(), n, n / 2), double(a[n / 2]) - mx - std::log(z), 1e-9);
  }
}

TEST(Ops, SiluMul) {
  auto g = randn(50, 5), u = randn(50, 6);
  auto out = g;
  silu_mul(out.data(), u.data(), 50);
  for (int i = 0; i < 50; ++i) EXPECT_NEAR(out[i], g[i] / (1 + std::exp(-double(g[i]))) * u[i], 1e-6);
}

TEST(Ops, MatmulMatchesFloat64) {
  for (int64_t M : {1, 2, 5}) {
    const int64_t K = 19, N = 23;
    auto x = randn(M * K, 7), w = randn(N * K, 8);
    std::vector<float> y(M * N);
    matmul_nt(x.data(), w.data(), y.data(), M, K, N);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) {
        double ref = 0;
        for (int64_t k = 0; k < K; ++k) ref += double(x[m * K + k]) * w[n * K + k];
        EXPECT_NEAR(y[m * N + n], ref, 1e-4);
      }
  }
}

TEST(Ops, RopeDefaultMatchesFormula) {
  RopeConfig cfg;
  cfg.theta = 10000;
  const int64_t hd = 8;
  Rope rope(cfg, hd);
  rope.reserve(100);
  auto x = randn(2 * hd, 9);
  auto y = x;
  rope.apply(y.data(), 2, 37);
  for (int64_t h = 0; h < 2; ++h)
    for (int64_t i = 0; i < hd / 2; ++i) {
      double f = 37.0 / std::pow(10000.0, 2.0 * i / hd);
      double a = x[h * hd + i], b = x[h * hd + i + hd / 2];
      EXPECT_NEAR(y[h * hd + i], a * std::cos(f) - b * std::sin(f), 1e-4);
      EXPECT_NEAR(y[h * hd + i + hd / 2], b * std::cos(f) + a * std::sin(f), 1e-4);
    }
}

TEST(Ops, RopeScalings) {
  RopeConfig base;
  base.theta = 500000;
  RopeConfig lin = base;
  lin.type = RopeConfig::Type::Linear;
  lin.factor = 4;
  auto b = rope_inv_freq(base, 64), l = rope_inv_freq(lin, 64);
  for (size_t i = 0; i < b.size(); ++i) EXPECT_FLOAT_EQ(l[i], b[i] / 4);
  RopeConfig l3 = base;
  l3.type = RopeConfig::Type::Llama3;
  l3.factor = 8;
  l3.low_freq_factor = 1;
  l3.high_freq_factor = 4;
  l3.original_max_position_embeddings = 8192;
  auto s = rope_inv_freq(l3, 64);
  for (size_t i = 0; i < b.size(); ++i) {
    double wavelen = 2 * M_PI / b[i];
    if (wavelen < 8192.0 / 4) EXPECT_FLOAT_EQ(s[i], b[i]);            // high frequency: kept
    else if (wavelen > 8192.0) EXPECT_FLOAT_EQ(s[i], b[i] / 8.0f);    // low frequency: scaled
    else {                                                            // smooth band in between
      EXPECT_LE(s[i], b[i] * 1.0001);
      EXPECT_GE(s[i], b[i] / 8.0 * 0.9999);
    }
  }
}

TEST(Ops, Float16Conversions) {
  for (float f : {0.0f, 1.0f, -2.5f, 65504.0f, 6.1035156e-05f, 5.9604645e-08f, 0.1f, 3.14159f}) {
    float back = f16_to_f32(f32_to_f16(f));
    EXPECT_NEAR(back, f, std::abs(f) * 1e-3 + 1e-7) << f;
    EXPECT_NEAR(bf16_to_f32(f32_to_bf16(f)), f, std::abs(f) * 8e-3 + 1e-30) << f;
  }
  EXPECT_TRUE(std::isinf(f16_to_f32(f32_to_f16(1e6f))));
  EXPECT_TRUE(std::isnan(f16_to_f32(f32_to_f16(NAN))));
  EXPECT_EQ(f32_to_bf16(1.00390625f), 0x3f80);  // tie rounds to even
}

TEST(Ops, KlDivergence) {
  auto p = randn(30, 11), q = randn(30, 12);
  double lp = 0, lq = 0, mp = -1e9, mq = -1e9;
  for (int i = 0; i < 30; ++i) mp = std::max(mp, double(p[i])), mq = std::max(mq, double(q[i]));
  for (int i = 0; i < 30; ++i) lp += std::exp(p[i] - mp), lq += std::exp(q[i] - mq);
  double ref = 0;
  for (int i = 0; i < 30; ++i) {
    double a = p[i] - mp - std::log(lp), b = q[i] - mq - std::log(lq);
    ref += std::exp(a) * (a - b);
  }
  EXPECT_NEAR(kl_from_logits(p.data(), q.data(), 30), ref, 1e-9);
  EXPECT_NEAR(kl_from_logits(p.data(), p.data(), 30), 0.0, 1e-12);
}

TEST(Sampler, GreedyTopKTopP) {
  std::vector<float> logits = {0.1f, 3.0f, 2.9f, -1.0f, 3.0f};
  EXPECT_EQ(argmax(logits.data(), 5), 1);  // first of the tied maxima
  SamplingParams p;
  p.temperature = 1.0f;
  p.top_k = 1;
  Sampler s1(p);
  for (int i = 0; i < 20; ++i) EXPECT_EQ(s1.sample(logits.data(), 5), 1);
  p.top_k = 0;
  p.top_p = 0.3f;  // the best token alone holds > 30% of the mass
  Sampler s2(p);
  for (int i = 0; i < 20; ++i) EXPECT_EQ(s2.sample(logits.data(), 5), 1);
  // Plain sampling visits the likely tokens with roughly softmax frequencies.
  p.top_p = 1.0f;
  p.seed = 42;
  Sampler s3(p);
  std::vector<int> counts(5);
  for (int i = 0; i < 20000; ++i) counts[s3.sample(logits.data(), 5)]++;
  double z = 0;
  for (float l : logits) z += std::exp(l);
  for (int i = 0; i < 5; ++i) EXPECT_NEAR(counts[i] / 20000.0, std::exp(logits[i]) / z, 0.015);
  // Same seed, same stream.
  Sampler a(p), b(p);
  for (int i = 0; i < 50; ++i) EXPECT_EQ(a.sample(logits.data(), 5), b.sample(logits.data(), 5));
  SamplingParams bad;
  bad.top_p = 0;
  EXPECT_THROW(Sampler{bad}, Error);
  bad.top_p = 1;
  bad.temperature = -1;
  EXPECT_THROW(Sampler{bad}, Error);
}

}  // namespace
}  // namespace spear
