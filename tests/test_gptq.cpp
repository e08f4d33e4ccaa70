// GPTQ against RTN on the same grid, and the quantized module the engine runs.
#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "core/error.h"
#include "core/linalg.h"
#include "model/linear.h"
#include "quant/gptq.h"
#include "quant/quantized_linear_layer.h"
#include "quant/rtn.h"

namespace spear {
namespace {

std::vector<float> randn(size_t n, std::mt19937_64& g, float scale) {
  std::normal_distribution<float> d(0.0f, scale);
  std::vector<float> v(n);
  for (float& x : v) x = d(g);
  return v;
}

// Correlated inputs (a random mixing of independent features with decaying scales), as
// real activations are: that correlation is what GPTQ exploits.
std::vector<float> correlated_inputs(int64_t n, int64_t K, std::mt19937_64& g) {
  std::vector<float> mix = randn(K * K, g, 1.0f / std::sqrt(static_cast<float>(K)));
  std::vector<float> z = randn(n * K, g, 1.0f), x(n * K);
  for (int64_t k = 0; k < K; ++k)
    for (int64_t t = 0; t < n; ++t) z[t * K + k] *= std::exp(-3.0f * k / K);
  matmul_nt(z.data(), mix.data(), x.data(), n, K, K);
  return x;
}

std::vector<double> hessian(const std::vector<float>& x, int64_t n, int64_t K) {
  std::vector<double> H(K * K, 0.0);
  for (int64_t t = 0; t < n; ++t)
    for (int64_t i = 0; i < K; ++i)
      for (int64_t j = 0; j < K; ++j) H[i * K + j] += static_cast<double>(x[t * K + i]) * x[t * K + j];
  return H;
}

// ‖X Wᵀ − X Qᵀ‖² over the calibration inputs.
double output_error(const std::vector<float>& x, int64_t n, const std::vector<float>& W,
                    const QuantizedMatrix& q) {
  std::vector<float> Q = dequantize(q), y1(n * q.N), y2(n * q.N);
  matmul_nt(x.data(), W.data(), y1.data(), n, q.K, q.N);
  matmul_nt(x.data(), Q.data(), y2.data(), n, q.K, q.N);
  double e = 0;
  for (size_t i = 0; i < y1.size(); ++i) e += static_cast<double>(y1[i] - y2[i]) * (y1[i] - y2[i]);
  return e;
}

TEST(Gptq, LowersOutputErrorBelowRtn) {
  std::mt19937_64 g(1);
  const int64_t N = 48, K = 256, n = 2048;
  std::vector<float> W = randn(N * K, g, 0.05f);
  std::vector<float> x = correlated_inputs(n, K, g);
  std::vector<double> H = hessian(x, n, K);
  for (int bits : {3, 4})
    for (int64_t group : {int64_t{-1}, int64_t{64}})
      for (bool act : {false, true}) {
        QuantScheme s;
        s.bits = bits;
        s.group = group;
        GptqOptions o;
        o.act_order = act;
        o.block = 32;  // several lazy blocks
        QuantizedMatrix r = quantize_rtn(W.data(), N, K, s);
        QuantizedMatrix q = quantize_gptq(W.data(), N, K, s, H, o);
        const double er = output_error(x, n, W, r), eq = output_error(x, n, W, q);
        EXPECT_LT(eq, 0.8 * er) << "bits " << bits << " group " << group << " act_order " << act
                                << ": gptq " << eq << " rtn " << er;
        // The result is a valid canonical matrix: integral zeros in range, positive scales.
        for (size_t i = 0; i < q.zeros.size(); ++i) {
          EXPECT_EQ(q.zeros[i], std::floor(q.zeros[i]));
          EXPECT_GE(q.zeros[i], 0);
          EXPECT_LE(q.zeros[i], (1 << bits) - 1);
          EXPECT_GT(q.scales[i], 0);
        }
      }
}

// With a diagonal Hessian no error is propagated: GPTQ is RTN, code for code.
TEST(Gptq, DiagonalHessianGivesRtn) {
  std::mt19937_64 g(2);
  const int64_t N = 16, K = 64;
  std::vector<float> W = randn(N * K, g, 0.1f);
  std::vector<double> H(K * K, 0.0);
  for (int64_t i = 0; i < K; ++i) H[i * K + i] = 1.0 + i;
  for (int64_t group : {int64_t{-1}, int64_t{16}}) {
    QuantScheme s;
    s.group = group;
    QuantizedMatrix r = quantize_rtn(W.data(), N, K, s);
    QuantizedMatrix q = quantize_gptq(W.data(), N, K, s, H, GptqOptions{});
    EXPECT_EQ(q.codes, r.codes);
    EXPECT_EQ(q.scales, r.scales);
    EXPECT_EQ(q.zeros, r.zeros);
  }
}

// The factor GPTQ runs on, U with H⁻¹ = Uᵀ U, from one Cholesky and one triangular inverse
// (the reversed-order identity in linalg.cpp): against the float64 product and against the
// inverse-then-Cholesky route it replaced.
TEST(Gptq, InverseCholeskyIsTheFactorOfTheInverse) {
  std::mt19937_64 g(4);
  const int64_t n = 2000, K = 150;
  std::vector<double> H = hessian(correlated_inputs(n, K, g), n, K);
  for (int64_t i = 0; i < K; ++i) H[i * K + i] += 1e-2;
  std::vector<double> U = H, V = H;
  inverse_cholesky_upper(U, K);
  spd_inverse(V, K);
  cholesky_upper(V, K);
  double worst = 0, worst_v = 0;
  for (int64_t i = 0; i < K; ++i)
    for (int64_t j = 0; j < K; ++j) {
      if (j < i) EXPECT_EQ(U[i * K + j], 0.0);
      if (i == j) EXPECT_GT(U[i * K + i], 0.0);
      // (Uᵀ U H)_ij = δ_ij
      double p = 0;
      for (int64_t a = 0; a < K; ++a) {
        double ut_u = 0;
        for (int64_t b = 0; b <= std::min(i, a); ++b) ut_u += U[b * K + i] * U[b * K + a];
        p += ut_u * H[a * K + j];
      }
      worst = std::max(worst, std::abs(p - (i == j ? 1.0 : 0.0)));
      worst_v = std::max(worst_v, std::abs(U[i * K + j] - V[i * K + j]) / std::abs(V[i * K + i]));
    }
  EXPECT_LT(worst, 1e-8);
  EXPECT_LT(worst_v, 1e-9);
  std::vector<double> bad(K * K, 0.0);
  bad[0] = -1;
  EXPECT_THROW(inverse_cholesky_upper(bad, K), Error);
}

// One factor shared by the modules of a site gives each of them the codes of its own
// factorisation; inputs that were always zero (H row and column 0) dequantize to 0.
TEST(Gptq, SharedFactorGivesTheSameCodes) {
  std::mt19937_64 g(5);
  const int64_t N = 24, K = 128, n = 1024;
  std::vector<float> x = correlated_inputs(n, K, g);
  for (int64_t t = 0; t < n; ++t) x[t * K + 7] = x[t * K + 90] = 0;  // two dead inputs
  std::vector<double> H = hessian(x, n, K);
  for (bool act : {false, true})
    for (int64_t group : {int64_t{-1}, int64_t{32}}) {
      QuantScheme s;
      s.group = group;
      GptqOptions o;
      o.act_order = act;
      o.block = 48;  // blocks that do not line up with the groups
      const GptqFactor f = gptq_factor(H, K, o);
      EXPECT_TRUE(f.dead[7] && f.dead[90] && !f.dead[8]);
      for (int m = 0; m < 2; ++m) {
        std::vector<float> W = randn(N * K, g, 0.05f);
        QuantizedMatrix a = quantize_gptq(W.data(), N, K, s, H, o), b = quantize_gptq(W.data(), N, K, s, f, o);
        EXPECT_EQ(a.codes, b.codes) << "act_order " << act << " group " << group;
        EXPECT_EQ(a.scales, b.scales);
        EXPECT_EQ(a.zeros, b.zeros);
        const std::vector<float> Q = dequantize(b);
        for (int64_t r = 0; r < N; ++r) {
          EXPECT_EQ(Q[r * K + 7], 0.0f);
          EXPECT_EQ(Q[r * K + 90], 0.0f);
        }
      }
    }
  GptqOptions other;
  EXPECT_THROW(quantize_gptq(randn(N * 64, g, 0.1f).data(), N, 64, QuantScheme{}, gptq_factor(H, K, other), other),
               Error);
}

TEST(Gptq, RejectsBadInput) {
  std::vector<float> W(4 * 8, 0.1f);
  std::vector<double> H(8 * 8, 0.0);
  for (int i = 0; i < 8; ++i) H[i * 8 + i] = 1;
  QuantScheme s;
  EXPECT_THROW(quantize_gptq(W.data(), 4, 8, s, std::vector<double>(7, 0.0), GptqOptions{}), Error);
  s.bits = 9;
  EXPECT_THROW(quantize_gptq(W.data(), 4, 8, s, H, GptqOptions{}), Error);
  s.bits = 4;
  W[3] = NAN;
  EXPECT_THROW(quantize_gptq(W.data(), 4, 8, s, H, GptqOptions{}), Error);
}

// Both paths of the engine's quantized module (packed kernel for few rows, dequantize +
// sgemm for many) compute x · dequantize()ᵀ.
TEST(Gptq, QuantizedLinearLayerMatchesDequantized) {
  std::mt19937_64 g(3);
  const int64_t N = 40, K = 96;
  std::vector<float> W = randn(N * K, g, 0.1f);
  QuantScheme s;
  s.group = 32;
  QuantizedLinearLayer layer(quantize_rtn(W.data(), N, K, s));
  std::vector<float> Q = layer.dequantize();
  for (int64_t M : {1, 3, 8, 33}) {
    std::vector<float> x = randn(M * K, g, 1.0f), y(M * N), ref(M * N);
    layer.forward(x.data(), M, y.data());
    matmul_nt(x.data(), Q.data(), ref.data(), M, K, N);
    for (int64_t i = 0; i < M * N; ++i) EXPECT_NEAR(y[i], ref[i], 1e-4) << "M " << M;
  }
  EXPECT_EQ(layer.weight_bytes(), N * K / 2 + N * 3 * 2 * 2);
  EXPECT_EQ(layer.kind(), "w4-g32-asym");
}

}  // namespace
}  // namespace spear
