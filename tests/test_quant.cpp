// The RTN quantizer (bit-exact against its float64 formula), the packed code stream,
// and the QuantLinear oracle (dequantize() and forward() agree).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

#include "core/error.h"
#include "quant/quant_linear.h"
#include "quant/rtn.h"

namespace spear {
namespace {

std::vector<float> random_weights(int64_t N, int64_t K, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.0f, 0.05f);
  std::vector<float> w(static_cast<size_t>(N * K));
  for (auto& v : w) v = nd(rng);
  // Edge rows: all positive (range widened to 0), all zero (scale 1), one outlier.
  if (N > 3) {
    for (int64_t k = 0; k < K; ++k) w[1 * K + k] = std::fabs(w[1 * K + k]) + 0.01f;
    for (int64_t k = 0; k < K; ++k) w[2 * K + k] = 0.0f;
    w[3 * K + K / 2] = 3.0f;
  }
  return w;
}

// The documented rule, written out independently in float64.
void reference_rtn(const float* w, int64_t N, int64_t K, const QuantScheme& s,
                   std::vector<int>& codes, std::vector<float>& scales, std::vector<float>& zeros) {
  const int64_t gs = s.group_size(K), G = s.num_groups(K);
  const int qmax = (1 << s.bits) - 1;
  codes.assign(N * K, 0);
  scales.assign(N * G, 0);
  zeros.assign(N * G, 0);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t g = 0; g < G; ++g) {
      double mn = 0, mx = 0, am = 0;
      for (int64_t k = g * gs; k < std::min(K, (g + 1) * gs); ++k) {
        mn = std::min(mn, (double)w[n * K + k]);
        mx = std::max(mx, (double)w[n * K + k]);
        am = std::max(am, std::fabs((double)w[n * K + k]));
      }
      float sc;
      double z;
      if (s.symmetric) {
        sc = (float)(am / ((1 << (s.bits - 1)) - 1));
        if (sc == 0) sc = 1;
        z = 1 << (s.bits - 1);
      } else {
        sc = (float)((mx - mn) / qmax);
        if (sc == 0) sc = 1;
        z = std::nearbyint(-mn / (double)sc);
      }
      scales[n * G + g] = sc;
      zeros[n * G + g] = (float)z;
      for (int64_t k = g * gs; k < std::min(K, (g + 1) * gs); ++k) {
        double q = std::nearbyint((double)w[n * K + k] / (double)sc) + z;
        codes[n * K + k] = (int)std::min<double>(qmax, std::max(0.0, q));
      }
    }
}

TEST(Quant, RtnBitExactAgainstFormula) {
  const int64_t N = 9;
  for (int bits = 2; bits <= 8; ++bits)
    for (int64_t K : {37, 128, 301})
      for (int64_t group : {-1, 32, 128})
        for (bool sym : {false, true}) {
          QuantScheme s{bits, group, sym};
          auto w = random_weights(N, K, 1000 + bits * 7 + (int)K + (sym ? 1 : 0));
          QuantizedMatrix q = quantize_rtn(w.data(), N, K, s);
          std::vector<int> codes;
          std::vector<float> scales, zeros;
          reference_rtn(w.data(), N, K, s, codes, scales, zeros);
          ASSERT_EQ(q.scales, scales) << s.name() << " K=" << K;
          ASSERT_EQ(q.zeros, zeros) << s.name() << " K=" << K;
          for (int64_t n = 0; n < N; ++n)
            for (int64_t k = 0; k < K; ++k)
              ASSERT_EQ(q.code(n, k), codes[n * K + k]) << s.name() << " n=" << n << " k=" << k;
          // Zero point of an asymmetric group is a valid code; the all-zero row has scale 1.
          for (float z : q.zeros) EXPECT_TRUE(z >= 0 && z <= (1 << bits) - 1);
          EXPECT_EQ(q.scales[2 * s.num_groups(K)], 1.0f);
        }
}

TEST(Quant, RtnErrorWithinHalfStep) {
  const int64_t N = 5, K = 77;
  auto w = random_weights(N, K, 7);
  for (bool sym : {false, true}) {
    QuantizedMatrix q = quantize_rtn(w.data(), N, K, QuantScheme{4, -1, sym});
    auto d = dequantize(q);
    for (int64_t n = 0; n < N; ++n)
      for (int64_t k = 0; k < K; ++k)
        EXPECT_LE(std::fabs(d[n * K + k] - w[n * K + k]), 0.5001 * q.scales[n] + 1e-7);
  }
}

TEST(Quant, PackUnpackRoundTrip) {
  std::mt19937 rng(3);
  for (int bits = 2; bits <= 8; ++bits)
    for (int64_t K : {1, 3, 7, 33, 127}) {
      QuantizedMatrix q;
      q.N = 4;
      q.K = K;
      q.scheme.bits = bits;
      q.codes.assign(q.N * q.row_bytes(), 0);
      EXPECT_EQ(q.row_bytes(), (K * bits + 7) / 8);
      std::vector<int> ref(q.N * K);
      for (int64_t n = 0; n < q.N; ++n)
        for (int64_t k = 0; k < K; ++k) {
          ref[n * K + k] = (int)(rng() % (1u << bits));
          q.set_code(n, k, ref[n * K + k]);
        }
      // Overwrite a few codes again (set_code must clear old bits, not only OR).
      for (int64_t n = 0; n < q.N; ++n) {
        ref[n * K + K / 2] = (int)(rng() % (1u << bits));
        q.set_code(n, K / 2, ref[n * K + K / 2]);
      }
      for (int64_t n = 0; n < q.N; ++n)
        for (int64_t k = 0; k < K; ++k) ASSERT_EQ(q.code(n, k), ref[n * K + k]) << bits << " " << K;
      // The little-endian bit stream: code k occupies bits [k*b, k*b+b) of its row.
      for (int64_t n = 0; n < q.N; ++n) {
        const uint8_t* row = q.codes.data() + n * q.row_bytes();
        for (int64_t k = 0; k < K; ++k) {
          int v = 0;
          for (int i = 0; i < bits; ++i) {
            int64_t bit = k * bits + i;
            v |= ((row[bit / 8] >> (bit % 8)) & 1) << i;
          }
          ASSERT_EQ(v, ref[n * K + k]);
        }
        // Padding bits at the end of the row stay zero.
        for (int64_t bit = K * bits; bit < q.row_bytes() * 8; ++bit)
          ASSERT_EQ((row[bit / 8] >> (bit % 8)) & 1, 0);
      }
    }
  // 4-bit: even column in the low nibble.
  QuantizedMatrix q;
  q.N = 1;
  q.K = 2;
  q.codes.assign(1, 0);
  q.set_code(0, 0, 0x3);
  q.set_code(0, 1, 0xa);
  EXPECT_EQ(q.codes[0], 0xa3);
}

TEST(Quant, DequantizeMatchesForward) {
  for (int bits : {2, 3, 4, 8})
    for (int64_t group : {-1, 32})
      for (bool sym : {false, true}) {
        const int64_t N = 13, K = 101, M = 3;
        auto w = random_weights(N, K, 11 + bits);
        QuantLinear lin(quantize_rtn(w.data(), N, K, QuantScheme{bits, group, sym}));
        EXPECT_EQ(lin.in_features(), K);
        EXPECT_EQ(lin.out_features(), N);
        auto d = lin.dequantize();
        std::mt19937 rng(5);
        std::normal_distribution<float> nd;
        std::vector<float> x(M * K), y(M * N, NAN);
        for (auto& v : x) v = nd(rng);
        lin.forward(x.data(), M, y.data());
        for (int64_t m = 0; m < M; ++m) {
          double num = 0, den = 0;
          for (int64_t n = 0; n < N; ++n) {
            double ref = 0;
            for (int64_t k = 0; k < K; ++k) ref += (double)d[n * K + k] * x[m * K + k];
            ASSERT_TRUE(std::isfinite(y[m * N + n]));
            num += (y[m * N + n] - ref) * (y[m * N + n] - ref);
            den += ref * ref;
          }
          EXPECT_LT(std::sqrt(num / den), 1e-5) << lin.w.scheme.name();
        }
      }
}

// The AVX2 4-bit kernel against the plain one: per channel and grouped (groups of 16, 32,
// 48 and 128),
// odd K (a tail outside the 16-column steps), 1..20 rows (chunks of 8 and remainders).
TEST(Quant, Fast4BitKernelMatchesReference) {
  for (int64_t group : {int64_t{-1}, int64_t{16}, int64_t{48}, int64_t{128}})
    for (bool sym : {false, true})
      for (int64_t K : {int64_t{256}, int64_t{203}, int64_t{1024}}) {
        const int64_t N = 37;
        auto w = random_weights(N, K, static_cast<uint32_t>(K + group));
        QuantLinear lin(quantize_rtn(w.data(), N, K, QuantScheme{4, group, sym}));
        std::mt19937 rng(9);
        std::normal_distribution<float> nd;
        for (int64_t M : {1, 3, 8, 9, 20}) {
          std::vector<float> x(M * K), y(M * N, NAN), r(M * N, NAN);
          for (auto& v : x) v = nd(rng);
          lin.forward(x.data(), M, y.data());
          lin.forward_reference(x.data(), M, r.data());
          for (int64_t i = 0; i < M * N; ++i) {
            ASSERT_TRUE(std::isfinite(y[i]));
            ASSERT_NEAR(y[i], r[i], 1e-4f * (1.0f + std::fabs(r[i])))
                << lin.w.scheme.name() << " K=" << K << " M=" << M << " at " << i;
          }
        }
      }
}

TEST(Quant, RejectsBadInput) {
  std::vector<float> w(8, 1.0f);
  EXPECT_THROW(quantize_rtn(w.data(), 2, 4, QuantScheme{1, -1, false}), Error);
  EXPECT_THROW(quantize_rtn(w.data(), 2, 4, QuantScheme{9, -1, false}), Error);
  w[3] = NAN;
  EXPECT_THROW(quantize_rtn(w.data(), 2, 4, QuantScheme{4, -1, false}), Error);
  EXPECT_EQ((QuantScheme{4, 128, true}.name()), "w4-g128-sym");
  EXPECT_EQ((QuantScheme{3, -1, false}.name()), "w3-pc-asym");
}

}  // namespace
}  // namespace spear
