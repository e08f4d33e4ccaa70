// The Llama forward pass on a random small model: against a float64 reference
// written out naively here, and consistency between prefill, decode and batching.
#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "core/error.h"
#include "model/llama.h"

namespace spear {
namespace {

struct RefWeights {  // float64 copies, (out, in) row-major
  std::vector<double> embed, final_norm;
  struct Layer {
    std::vector<double> an, fn, m[7];
  };
  std::vector<Layer> layers;
};

std::vector<float> randn(size_t n, std::mt19937_64& g, float scale) {
  std::normal_distribution<float> d(0.0f, scale);
  std::vector<float> v(n);
  for (float& x : v) x = d(g);
  return v;
}

ModelConfig small_config() {
  ModelConfig c;
  c.vocab_size = 61;
  c.hidden_size = 32;
  c.intermediate_size = 48;
  c.num_layers = 2;
  c.num_heads = 4;
  c.num_kv_heads = 2;
  c.head_dim = 8;
  c.max_position_embeddings = 64;
  c.rms_norm_eps = 1e-5;
  c.tie_word_embeddings = true;
  return c;
}

std::unique_ptr<LlamaModel> random_model(const ModelConfig& c, RefWeights* ref, uint64_t seed) {
  std::mt19937_64 g(seed);
  auto to_d = [](const std::vector<float>& v) { return std::vector<double>(v.begin(), v.end()); };
  auto embed = randn(c.vocab_size * c.hidden_size, g, 1.0f);
  ref->embed = to_d(embed);
  std::vector<LayerWeights> layers(c.num_layers);
  ref->layers.resize(c.num_layers);
  const int64_t D = c.hidden_size, F = c.intermediate_size;
  const int64_t shapes[7][2] = {{c.q_dim(), D}, {c.kv_dim(), D}, {c.kv_dim(), D}, {D, c.q_dim()},
                                {F, D},         {F, D},          {D, F}};
  for (int64_t l = 0; l < c.num_layers; ++l) {
    auto an = randn(D, g, 0.2f), fn = randn(D, g, 0.2f);
    for (auto& v : an) v += 1.0f;
    for (auto& v : fn) v += 1.0f;
    ref->layers[l].an = to_d(an);
    ref->layers[l].fn = to_d(fn);
    layers[l].attn_norm = an;
    layers[l].ffn_norm = fn;
    for (int m = 0; m < 7; ++m) {
      auto w = randn(shapes[m][0] * shapes[m][1], g, 1.0f / std::sqrt(float(shapes[m][1])));
      ref->layers[l].m[m] = to_d(w);
      layers[l].modules[kAllModules[m]] = std::make_unique<DenseLinear>(shapes[m][0], shapes[m][1], w);
    }
  }
  auto fnorm = randn(D, g, 0.1f);
  for (auto& v : fnorm) v += 1.0f;
  ref->final_norm = to_d(fnorm);
  return std::make_unique<LlamaModel>(c, embed, std::move(layers), fnorm, std::vector<float>{});
}

// Naive float64 Llama: full causal attention over the whole sequence.
std::vector<double> reference_logits(const ModelConfig& c, const RefWeights& w,
                                     const std::vector<int32_t>& ids) {
  const int64_t T = ids.size(), D = c.hidden_size, HD = c.head_dim, F = c.intermediate_size;
  auto matvec = [](const std::vector<double>& W, const std::vector<double>& x, int64_t out) {
    std::vector<double> y(out, 0.0);
    int64_t in = x.size();
    for (int64_t o = 0; o < out; ++o)
      for (int64_t i = 0; i < in; ++i) y[o] += W[o * in + i] * x[i];
    return y;
  };
  auto norm = [&](const std::vector<double>& x, const std::vector<double>& g) {
    double ss = 0;
    for (double v : x) ss += v * v;
    double inv = 1.0 / std::sqrt(ss / x.size() + c.rms_norm_eps);
    std::vector<double> y(x.size());
    for (size_t i = 0; i < x.size(); ++i) y[i] = g[i] * x[i] * inv;
    return y;
  };
  auto rope = [&](std::vector<double>& v, int64_t heads, int64_t pos) {
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t i = 0; i < HD / 2; ++i) {
        double f = pos / std::pow(c.rope.theta, 2.0 * i / HD);
        double a = v[h * HD + i], b = v[h * HD + i + HD / 2];
        v[h * HD + i] = a * std::cos(f) - b * std::sin(f);
        v[h * HD + i + HD / 2] = b * std::cos(f) + a * std::sin(f);
      }
  };
  std::vector<std::vector<double>> x(T);
  for (int64_t t = 0; t < T; ++t)
    x[t] = std::vector<double>(&w.embed[ids[t] * D], &w.embed[ids[t] * D] + D);
  for (int64_t l = 0; l < c.num_layers; ++l) {
    const auto& L = w.layers[l];
    std::vector<std::vector<double>> q(T), k(T), v(T);
    for (int64_t t = 0; t < T; ++t) {
      auto xn = norm(x[t], L.an);
      q[t] = matvec(L.m[0], xn, c.q_dim());
      k[t] = matvec(L.m[1], xn, c.kv_dim());
      v[t] = matvec(L.m[2], xn, c.kv_dim());
      rope(q[t], c.num_heads, t);
      rope(k[t], c.num_kv_heads, t);
    }
    for (int64_t t = 0; t < T; ++t) {
      std::vector<double> att(c.q_dim(), 0.0);
      for (int64_t h = 0; h < c.num_heads; ++h) {
        int64_t kh = h / (c.num_heads / c.num_kv_heads);
        std::vector<double> s(t + 1);
        double mx = -1e300;
        for (int64_t j = 0; j <= t; ++j) {
          double d = 0;
          for (int64_t i = 0; i < HD; ++i) d += q[t][h * HD + i] * k[j][kh * HD + i];
          s[j] = d / std::sqrt(double(HD));
          mx = std::max(mx, s[j]);
        }
        double z = 0;
        for (double& e : s) z += (e = std::exp(e - mx));
        for (int64_t j = 0; j <= t; ++j)
          for (int64_t i = 0; i < HD; ++i) att[h * HD + i] += s[j] / z * v[j][kh * HD + i];
      }
      auto o = matvec(L.m[3], att, D);
      for (int64_t i = 0; i < D; ++i) x[t][i] += o[i];
      auto xn = norm(x[t], L.fn);
      auto gt = matvec(L.m[4], xn, F), up = matvec(L.m[5], xn, F);
      for (int64_t i = 0; i < F; ++i) gt[i] = gt[i] / (1 + std::exp(-gt[i])) * up[i];
      auto dn = matvec(L.m[6], gt, D);
      for (int64_t i = 0; i < D; ++i) x[t][i] += dn[i];
    }
  }
  std::vector<double> logits;
  for (int64_t t = 0; t < T; ++t) {
    auto h = norm(x[t], w.final_norm);
    auto lg = matvec(w.embed, h, c.vocab_size);
    logits.insert(logits.end(), lg.begin(), lg.end());
  }
  return logits;
}

TEST(Model, ForwardMatchesFloat64Reference) {
  ModelConfig c = small_config();
  RefWeights ref;
  auto model = random_model(c, &ref, 1234);
  std::vector<int32_t> ids = {3, 17, 60, 0, 5, 5, 42, 11, 29};
  ContiguousKVCache kv(c.num_layers, 16, c.kv_dim());
  auto got = model->forward(ids.data(), ids.size(), kv, 0, true);
  auto want = reference_logits(c, ref, ids);
  ASSERT_EQ(got.size(), want.size());
  double max_err = 0, max_ref = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    max_err = std::max(max_err, std::abs(got[i] - want[i]));
    max_ref = std::max(max_ref, std::abs(want[i]));
  }
  EXPECT_LT(max_err / max_ref, 1e-5) << "max abs err " << max_err;
}

TEST(Model, IncrementalDecodeAndBatchingAgreeWithPrefill) {
  ModelConfig c = small_config();
  RefWeights ref;
  auto model = random_model(c, &ref, 99);
  std::vector<int32_t> a = {1, 2, 3, 4, 5, 6, 7}, b = {9, 8, 7, 50, 60};
  const int64_t V = c.vocab_size;
  ContiguousKVCache kva(c.num_layers, 16, c.kv_dim()), kvb(c.num_layers, 16, c.kv_dim());
  auto full_a = model->forward(a.data(), a.size(), kva, 0, true);
  auto full_b = model->forward(b.data(), b.size(), kvb, 0, true);

  // Prefill 3 tokens, then decode one by one: each step's logits equal the full run's row.
  ContiguousKVCache kv(c.num_layers, 16, c.kv_dim());
  model->forward(a.data(), 3, kv, 0, false);
  for (int64_t t = 3; t < (int64_t)a.size(); ++t) {
    auto step = model->forward(&a[t], 1, kv, t, false);
    for (int64_t i = 0; i < V; ++i) EXPECT_NEAR(step[i], full_a[t * V + i], 1e-4);
  }

  // Two sequences in one batch: chunked prefill of a (tokens 4..6 after 0..3) next
  // to the whole of b. Rows must equal the separate runs.
  ContiguousKVCache kv1(c.num_layers, 16, c.kv_dim()), kv2(c.num_layers, 16, c.kv_dim());
  model->forward(a.data(), 4, kv1, 0, false);
  SeqChunk chunks[2] = {{&kv1, &a[4], 3, 4, true}, {&kv2, b.data(), (int64_t)b.size(), 0, false}};
  std::vector<float> out((3 + 1) * V);
  model->forward(chunks, out.data());
  for (int64_t r = 0; r < 3; ++r)
    for (int64_t i = 0; i < V; ++i) EXPECT_NEAR(out[r * V + i], full_a[(4 + r) * V + i], 1e-4);
  for (int64_t i = 0; i < V; ++i)
    EXPECT_NEAR(out[3 * V + i], full_b[(b.size() - 1) * V + i], 1e-4);
}

TEST(Model, RejectsBadTokensAndOverflow) {
  ModelConfig c = small_config();
  RefWeights ref;
  auto model = random_model(c, &ref, 5);
  ContiguousKVCache kv(c.num_layers, 4, c.kv_dim());
  std::vector<int32_t> bad = {1, 61};
  EXPECT_THROW(model->forward(bad.data(), 2, kv, 0, false), Error);
  std::vector<int32_t> neg = {-1};
  EXPECT_THROW(model->forward(neg.data(), 1, kv, 0, false), Error);
  std::vector<int32_t> five = {1, 2, 3, 4, 5};
  EXPECT_THROW(model->forward(five.data(), 5, kv, 0, false), Error);
}

}  // namespace
}  // namespace spear
