// The GPU layouts of src/quant/gpu_layout.h, checked on the CPU (no GPU needed): bit-exact
// against the canonical packing, and an emulation of the kernels' fragment reads
// (lane, sub-tile, register, half -> row, k) that must reproduce QuantLinear::forward.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "core/dtype.h"
#include "core/error.h"
#include "quant/gpu_layout.h"
#include "quant/quant_linear.h"
#include "quant/rtn.h"

namespace spear {
namespace {

QuantizedMatrix make(int64_t N, int64_t K, int64_t group, bool sym, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.0f, 0.02f);
  std::vector<float> w(N * K);
  for (auto& v : w) v = nd(rng);
  return quantize_rtn(w.data(), N, K, QuantScheme{4, group, sym});
}

TEST(CudaRepack, BitExactAndRoundTrip) {
  for (auto [N, K] : {std::pair<int64_t, int64_t>{37, 301}, {16, 128}, {50, 1000}, {5, 7}})
    for (int64_t group : {-1, 128, 256})
      for (bool sym : {false, true}) {
        QuantizedMatrix q = make(N, K, group, sym, (uint32_t)(N * 31 + K));
        GpuW4Layout l = repack_w4(q);
        EXPECT_EQ(l.N_pad % 16, 0);
        EXPECT_EQ(l.K_pad % 128, 0);
        EXPECT_EQ((int64_t)l.qweight.size(), l.N_pad * l.K_pad / 2);
        for (int64_t n = 0; n < l.N_pad; ++n)
          for (int64_t k = 0; k < l.K_pad; ++k) {
            const int c = gpu_w4_code(l, n, k);
            if (n < N && k < K) {
              ASSERT_EQ(c, q.code(n, k)) << n << " " << k;
            } else if (n < N) {  // padded k: the group's zero point (weight exactly 0)
              const int64_t g = l.group ? std::min<int64_t>(k / l.group, l.G - 1) : 0;
              ASSERT_EQ(c, l.zeros[g * l.N_pad + n]);
            } else {
              ASSERT_EQ(c, 0);
            }
          }
        QuantizedMatrix back = unpack_w4(l);
        EXPECT_EQ(back.codes, q.codes);
        EXPECT_EQ(back.scales, q.scales);
        EXPECT_EQ(back.zeros, q.zeros);
      }
}

// Every nibble of the tiled stream is used exactly once.
TEST(CudaRepack, PositionsAreABijection) {
  const int64_t N_pad = 32, K_pad = 256;
  std::vector<int> seen(N_pad * K_pad, 0);
  for (int64_t n = 0; n < N_pad; ++n)
    for (int64_t k = 0; k < K_pad; ++k) {
      W4Pos p = gpu_w4_position(K_pad, n, k);
      ASSERT_LT(p.byte, N_pad * K_pad / 2);
      seen[p.byte * 2 + p.shift / 4]++;
    }
  for (int v : seen) ASSERT_EQ(v, 1);
  std::vector<int> seen_a(32 * K_pad, 0);
  for (int64_t j = 0; j < 32; ++j)
    for (int64_t k = 0; k < K_pad; ++k) seen_a[gpu_ec_a_index(K_pad, j, k)]++;
  for (int v : seen_a) ASSERT_EQ(v, 1);
}

// Emulates the kernel: lane (g, q) reads its 16 bytes of tile (nb, kb); for sub-tile s,
// register r = (word >> 4r) & 0x000f000f gives codes of (row g + 8(r&1), k 16q+4s+2(r>>1)+h)
// and multiplies with x[token][kb*64 + 16q + 4s + 2(r>>1) + h] (the B fragment read).
TEST(CudaRepack, FragmentEmulationMatchesQuantLinear) {
  for (int64_t group : {-1, 128})
    for (bool sym : {false, true}) {
      const int64_t N = 45, K = 389, M = 3;
      QuantizedMatrix q = make(N, K, group, sym, 99);
      GpuW4Layout l = repack_w4(q);
      std::mt19937 rng(1);
      std::normal_distribution<float> nd;
      std::vector<float> x(M * K), y(M * N), ye(M * N, 0.0f);
      for (auto& v : x) v = nd(rng);
      QuantLinear(q).forward(x.data(), M, y.data());
      const int64_t KB = l.k_blocks();
      for (int64_t nb = 0; nb < l.n_blocks(); ++nb)
        for (int64_t kb = 0; kb < KB; ++kb)
          for (int lane = 0; lane < 32; ++lane)
            for (int s = 0; s < 4; ++s) {
              uint32_t word;
              std::memcpy(&word, &l.qweight[((nb * KB + kb) * 32 + lane) * 16 + s * 4], 4);
              const int g = lane / 4, qd = lane % 4;
              for (int r = 0; r < 4; ++r) {
                const uint32_t v = (word >> (4 * r)) & 0x000f000fu;
                for (int h = 0; h < 2; ++h) {
                  const int code = h ? (v >> 16) : (v & 0xffff);
                  const int64_t n = nb * 16 + g + 8 * (r & 1);
                  const int64_t k = kb * 64 + 16 * qd + 4 * s + 2 * (r >> 1) + h;
                  if (n >= N) continue;
                  const int64_t gi = l.group ? k / l.group : 0;
                  const int64_t gc = std::min<int64_t>(gi, l.G - 1);
                  const float w = l.scales[gc * l.N_pad + n] * (code - (int)l.zeros[gc * l.N_pad + n]);
                  if (k >= K) {
                    ASSERT_EQ(code, l.zeros[gc * l.N_pad + n]);
                    continue;
                  }
                  for (int64_t m = 0; m < M; ++m) ye[m * N + n] += w * x[m * K + k];
                }
              }
            }
      for (int64_t i = 0; i < M * N; ++i) ASSERT_NEAR(ye[i], y[i], 1e-4 * (1 + std::fabs(y[i])));
    }
}

TEST(CudaRepack, EcFactors) {
  const int64_t r = 20, K = 300, N = 19, K_pad = 384, N_pad = 32;
  std::vector<uint16_t> a(r * K), b(N * r);
  for (int64_t i = 0; i < r * K; ++i) a[i] = f32_to_f16((float)(i % 97) - 48.0f);
  for (int64_t i = 0; i < N * r; ++i) b[i] = f32_to_bf16((float)(i % 31));
  auto ra = repack_ec_a(a.data(), r, K, K_pad);
  auto rb = repack_ec_b(b.data(), N, r, N_pad);
  ASSERT_EQ((int64_t)ra.size(), 32 * K_pad);
  ASSERT_EQ((int64_t)rb.size(), N_pad * 32);
  // Fragment emulation for A: lane (g,q), sub-tile s, register r, half h.
  const int64_t KB = K_pad / 64;
  for (int64_t ja = 0; ja < 2; ++ja)
    for (int64_t kb = 0; kb < KB; ++kb)
      for (int s = 0; s < 4; ++s)
        for (int lane = 0; lane < 32; ++lane)
          for (int rr = 0; rr < 4; ++rr)
            for (int h = 0; h < 2; ++h) {
              const int64_t j = ja * 16 + lane / 4 + 8 * (rr & 1);
              const int64_t k = kb * 64 + 16 * (lane % 4) + 4 * s + 2 * (rr >> 1) + h;
              const uint16_t v = ra[(((ja * KB + kb) * 4 + s) * 32 + lane) * 8 + 2 * rr + h];
              ASSERT_EQ(v, (j < r && k < K) ? a[j * K + k] : 0) << j << " " << k;
            }
  for (int64_t n = 0; n < N_pad; ++n)
    for (int64_t j = 0; j < 32; ++j) ASSERT_EQ(rb[n * 32 + j], (n < N && j < r) ? b[n * r + j] : 0);
}

TEST(CudaRepack, RejectsUnsupported) {
  std::vector<float> w(16 * 256, 0.5f);
  EXPECT_THROW(repack_w4(quantize_rtn(w.data(), 16, 256, QuantScheme{3, -1, false})), Error);
  EXPECT_THROW(repack_w4(quantize_rtn(w.data(), 16, 256, QuantScheme{4, 64, false})), Error);
  // A group as large as K is per-channel.
  EXPECT_EQ(repack_w4(quantize_rtn(w.data(), 16, 256, QuantScheme{4, 256, false})).group, 0);
}

}  // namespace
}  // namespace spear
