// Device sampling (src/cuda/sampling.h) against the host sampler (engine/sampler.h), which
// is the reference (its distribution has its own tests): the same draw of the same seed
// picks the same token on both, for greedy, temperature, min-p, top-k, top-p and their
// combinations, on a small and a Llama-3-sized vocabulary; the empirical frequencies of
// many draws follow Sampler::distribution. Also times a batch of 64 rows of 128256.
// Skips without a GPU.
#include <gtest/gtest.h>
#include <cuda_runtime.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "core/philox.h"
#include "cuda/gpu_test_util.h"
#include "cuda/sampling.h"
#include "engine/sampler.h"

namespace spear::cuda {
namespace {

#define CK(x) ASSERT_EQ((x), cudaSuccess) << #x << ": " << cudaGetErrorString(x)

std::vector<float> random_logits(int V, uint32_t seed, float spread) {
  std::mt19937 g(seed);
  std::normal_distribution<float> nd(0.f, spread);
  std::vector<float> l(V);
  for (auto& v : l) v = nd(g);
  return l;
}

// n draws (0..n-1) of one row with params p: device ids.
std::vector<int32_t> device_draws(const std::vector<float>& row, const SamplingParams& p, int n) {
  const int V = static_cast<int>(row.size());
  std::vector<float> rows(static_cast<size_t>(n) * V);
  std::vector<RowSampling> ps(n);
  for (int i = 0; i < n; ++i) {
    std::copy(row.begin(), row.end(), rows.begin() + static_cast<size_t>(i) * V);
    ps[i] = RowSampling{p.temperature, p.top_p, p.min_p, static_cast<int32_t>(p.top_k), p.seed, static_cast<uint64_t>(i)};
  }
  float* dl = nullptr;
  RowSampling* dp = nullptr;
  int32_t* di = nullptr;
  std::vector<int32_t> ids(n, -1);
  EXPECT_EQ(cudaMalloc(&dl, rows.size() * sizeof(float)), cudaSuccess);
  EXPECT_EQ(cudaMalloc(&dp, n * sizeof(RowSampling)), cudaSuccess);
  EXPECT_EQ(cudaMalloc(&di, n * sizeof(int32_t)), cudaSuccess);
  cudaMemcpy(dl, rows.data(), rows.size() * sizeof(float), cudaMemcpyHostToDevice);
  cudaMemcpy(dp, ps.data(), n * sizeof(RowSampling), cudaMemcpyHostToDevice);
  EXPECT_EQ(sample_rows(dl, V, n, V, dp, di, nullptr), cudaSuccess);
  EXPECT_EQ(cudaMemcpy(ids.data(), di, n * sizeof(int32_t), cudaMemcpyDeviceToHost), cudaSuccess);
  cudaFree(dl);
  cudaFree(dp);
  cudaFree(di);
  return ids;
}

struct Case {
  const char* name;
  SamplingParams p;
};

std::vector<Case> cases() {
  std::vector<Case> c;
  auto add = [&](const char* name, float t, int64_t k, float top_p, float min_p) {
    SamplingParams p;
    p.temperature = t;
    p.top_k = k;
    p.top_p = top_p;
    p.min_p = min_p;
    p.seed = 1234567 + c.size();
    c.push_back({name, p});
  };
  add("greedy", 0.f, 0, 1.f, 0.f);
  add("temperature 1", 1.f, 0, 1.f, 0.f);
  add("temperature 0.6", 0.6f, 0, 1.f, 0.f);
  add("top-k 40", 1.f, 40, 1.f, 0.f);
  add("top-k 1", 1.f, 1, 1.f, 0.f);
  add("top-p 0.9", 0.8f, 0, 0.9f, 0.f);
  add("top-p 0.3", 1.f, 0, 0.3f, 0.f);
  add("min-p 0.1", 1.f, 0, 1.f, 0.1f);
  add("all", 0.7f, 50, 0.95f, 0.02f);
  return c;
}

void same_as_host(int V, float spread, int n) {
  const std::vector<float> row = random_logits(V, 7 + V, spread);
  for (const Case& c : cases()) {
    SCOPED_TRACE(std::string(c.name) + " V=" + std::to_string(V));
    const std::vector<int32_t> got = device_draws(row, c.p, n);
    Sampler host(c.p);
    int differ = 0;
    for (int i = 0; i < n; ++i) {
      ASSERT_GE(got[i], 0);
      ASSERT_LT(got[i], V);
      differ += got[i] != host.sample_at(row.data(), V, static_cast<uint64_t>(i));
    }
    // identical up to float rounding at a boundary (the device sums float probabilities)
    EXPECT_LE(differ, n / 500) << differ << " of " << n << " draws differ from the host's";
  }
}

TEST(SamplingGpu, SameTokensAsHostSmallVocab) {
  REQUIRE_GPU();
  same_as_host(1000, 2.0f, 2000);
}

TEST(SamplingGpu, SameTokensAsHostLlama3Vocab) {
  REQUIRE_GPU();
  same_as_host(128256, 3.0f, 200);
}

// Frequencies of 20000 draws against the exact distribution (total variation distance).
TEST(SamplingGpu, FrequenciesFollowTheDistribution) {
  REQUIRE_GPU();
  const int V = 64, n = 20000;
  const std::vector<float> row = random_logits(V, 3, 1.5f);
  for (const Case& c : cases()) {
    if (c.p.temperature == 0.f) continue;
    SCOPED_TRACE(c.name);
    const std::vector<int32_t> got = device_draws(row, c.p, n);
    Sampler host(c.p);
    std::map<int32_t, double> want;
    for (auto [id, pr] : host.distribution(row.data(), V)) want[id] = pr;
    std::map<int32_t, double> freq;
    for (int32_t id : got) freq[id] += 1.0 / n;
    double tv = 0;
    for (int id = 0; id < V; ++id) {
      const double w = want.count(id) ? want[id] : 0.0, f = freq.count(id) ? freq[id] : 0.0;
      if (w == 0.0) EXPECT_EQ(f, 0.0) << "token " << id << " was cut but drawn";
      tv += 0.5 * std::fabs(w - f);
    }
    EXPECT_LT(tv, 0.03) << "total variation distance";
  }
}

TEST(SamplingGpu, RefusesBadArguments) {
  REQUIRE_GPU();
  EXPECT_EQ(sample_rows(nullptr, 10, 1, 10, nullptr, nullptr, nullptr), cudaErrorInvalidValue);
  EXPECT_EQ(sample_rows(nullptr, 5, 1, 10, nullptr, nullptr, nullptr), cudaErrorInvalidValue);
  EXPECT_EQ(sample_rows(nullptr, 10, 0, 10, nullptr, nullptr, nullptr), cudaSuccess);
}

// Not a pass/fail timing: prints what a batch-64 step of a Llama-3 vocabulary costs.
TEST(SamplingGpu, TimesABatchOf64) {
  REQUIRE_GPU();
  const int V = 128256, B = 64;
  const std::vector<float> row = random_logits(V, 11, 3.0f);
  std::vector<float> rows(static_cast<size_t>(B) * V);
  for (int b = 0; b < B; ++b) std::copy(row.begin(), row.end(), rows.begin() + static_cast<size_t>(b) * V);
  float *dl = nullptr, *src = nullptr;
  RowSampling* dp = nullptr;
  int32_t* di = nullptr;
  CK(cudaMalloc(&dl, rows.size() * 4));
  CK(cudaMalloc(&src, rows.size() * 4));
  CK(cudaMalloc(&dp, B * sizeof(RowSampling)));
  CK(cudaMalloc(&di, B * 4));
  CK(cudaMemcpy(src, rows.data(), rows.size() * 4, cudaMemcpyHostToDevice));
  cudaEvent_t e0, e1;
  cudaEventCreate(&e0);
  cudaEventCreate(&e1);
  for (const Case& c : cases()) {
    std::vector<RowSampling> ps(B);
    for (int b = 0; b < B; ++b)
      ps[b] = RowSampling{c.p.temperature, c.p.top_p, c.p.min_p, static_cast<int32_t>(c.p.top_k), c.p.seed,
                          static_cast<uint64_t>(b)};
    CK(cudaMemcpy(dp, ps.data(), B * sizeof(RowSampling), cudaMemcpyHostToDevice));
    std::vector<float> ms;
    for (int it = 0; it < 6; ++it) {
      CK(cudaMemcpy(dl, src, rows.size() * 4, cudaMemcpyDeviceToDevice));
      cudaEventRecord(e0);
      CK(sample_rows(dl, V, B, V, dp, di, nullptr));
      cudaEventRecord(e1);
      CK(cudaEventSynchronize(e1));
      float t = 0;
      cudaEventElapsedTime(&t, e0, e1);
      if (it > 0) ms.push_back(t);
    }
    std::sort(ms.begin(), ms.end());
    std::printf("  sample_rows B=%d V=%d %-16s %.1f us (median of 5)\n", B, V, c.name, 1000.0 * ms[ms.size() / 2]);
  }
  cudaFree(dl);
  cudaFree(src);
  cudaFree(dp);
  cudaFree(di);
}

}  // namespace
}  // namespace spear::cuda
