// The GPU layouts of src/quant/gpu_layout.h, checked on the CPU (no GPU needed): bit-exact
// against the canonical packing, and an emulation of the kernels' fragment reads
// (lane, sub-tile, register, half -> row, k) that must reproduce QuantLinear::forward, and an
// emulation of the batch kernel's whole data movement (its split of the grid, the shared-memory
// stage layout of quant/gpu_batch_tiles.h, the fragment reads and mma.m16n8k16's operand maps).
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "core/dtype.h"
#include "core/error.h"
#include "quant/gpu_batch_tiles.h"
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

// The batch kernel (src/cuda/w4a16_batch.cuh) emulated step by step on the CPU: for every
// block (tile, K split), stage (unit) and warp, the stage's shared memory is filled as the
// kernel's cp.async loops fill it (chunk -> offset functions of gpu_batch_tiles.h, zero fill
// past N_pad, M and K), each lane reads its weight words and x chunks at the offsets the kernel
// reads, and the warp's mma.m16n8k16 is assembled from the 32 lanes' registers with PTX's
// operand maps (A: a_r half h = row g + 8 (r & 1), col 2q + 8 (r >> 1) + h; B: b0 = rows 2q,
// 2q + 1, b1 = rows 2q + 8, 2q + 9, col g). The sum over blocks must be QuantLinear::forward.
// What this cannot see: timing, the pipeline's synchronisation, the epilogue's atomics.
TEST(CudaRepack, BatchKernelEmulationMatchesQuantLinear) {
  namespace bt = batch_tiles;
  struct Cfg {
    int nt, warps, splits, tg;
    int64_t group;
  };
  for (const Cfg cf : {Cfg{1, 4, 3, 8, -1}, Cfg{2, 8, 1, 8, 128}, Cfg{4, 4, 2, 4, -1}, Cfg{2, 4, 4, 2, 128}}) {
    SCOPED_TRACE("nt=" + std::to_string(cf.nt) + " warps=" + std::to_string(cf.warps) +
                 " splits=" + std::to_string(cf.splits) + " tg=" + std::to_string(cf.tg));
    const int64_t N = 200, K = 392;  // N_pad 208 (13 row blocks), K_pad 512 (4 units)
    const int TM = 8 * cf.tg, M = TM - 3;
    QuantizedMatrix q = make(N, K, cf.group, false, 7);
    GpuW4Layout l = repack_w4(q);
    std::mt19937 rng(3);
    std::normal_distribution<float> nd;
    std::vector<float> x(static_cast<size_t>(M) * K), y(static_cast<size_t>(M) * N);
    for (auto& v : x) v = nd(rng);
    QuantLinear(q).forward(x.data(), M, y.data());
    const int NB = static_cast<int>(l.n_blocks()), KB = static_cast<int>(l.k_blocks()), KU = KB / 2;
    const int rows = cf.nt * cf.warps, tiles = (NB + rows - 1) / rows;
    std::vector<double> ye(static_cast<size_t>(M) * N, 0.0);
    std::vector<unsigned char> wsm(static_cast<size_t>(cf.warps) * cf.nt * 1024);
    std::vector<float> xsm(static_cast<size_t>(TM) * 128);  // x in halves: byte offset / 2
    for (int tile = 0; tile < tiles; ++tile)
      for (int ks = 0; ks < cf.splits; ++ks) {
        const int nb0 = tile * rows;
        for (int un = bt::split_begin(KU, ks, cf.splits); un < bt::split_begin(KU, ks + 1, cf.splits); ++un) {
          // the stage, as load_w and load_x fill it
          for (int c = 0; c < cf.warps * cf.nt * 64; ++c) {
            const int rb = bt::w_chunk_rb(c), kb = bt::w_chunk_kb(c), ln = bt::w_chunk_lane(c);
            const int nb = nb0 + rb;
            unsigned char* dst = &wsm[bt::w_offset(rb, kb, ln)];
            if (nb < NB)
              std::memcpy(dst, &l.qweight[((static_cast<size_t>(nb) * KB + 2 * un + kb) * 32 + ln) * 16], 16);
            else
              std::memset(dst, 0, 16);
          }
          for (int c = 0; c < TM * 16; ++c) {
            const int t = c >> 4, ch = c & 15, k = un * 128 + ch * 8;
            for (int j = 0; j < 8; ++j)
              xsm[bt::x_offset(t, ch) / 2 + j] = (t < M && k < K) ? x[static_cast<size_t>(t) * K + k + j] : 0.0f;
          }
          for (int warp = 0; warp < cf.warps; ++warp)
            for (int i = 0; i < cf.nt; ++i) {
              const int nb = nb0 + warp * cf.nt + i;
              for (int h = 0; h < 2; ++h)
                for (int s = 0; s < 4; ++s) {
                  const int sp = s >> 1, s2 = s & 1;
                  double A[16][16], B[16][64];
                  for (int lane = 0; lane < 32; ++lane) {
                    const int g = lane >> 2, qd = lane & 3;
                    uint32_t word;
                    std::memcpy(&word, &wsm[bt::w_offset(warp * cf.nt + i, h, lane) + 4 * s], 4);
                    for (int r = 0; r < 4; ++r)
                      for (int hh = 0; hh < 2; ++hh) {
                        const int row = g + 8 * (r & 1), col = 2 * qd + 8 * (r >> 1) + hh;
                        const int code = static_cast<int>((word >> (4 * r + 16 * hh)) & 0xfu);
                        // the weight itself (exact scale): n, and the group of this unit's inputs
                        const int64_t n = static_cast<int64_t>(nb) * 16 + row;
                        const int64_t gi = l.group ? std::min<int64_t>((un * 128) / l.group, l.G - 1) : 0;
                        A[row][col] = n < l.N_pad ? l.scales[gi * l.N_pad + n] *
                                                        (code - static_cast<int>(l.zeros[gi * l.N_pad + n]))
                                                  : 0.0;
                      }
                    for (int tg = 0; tg < cf.tg; ++tg) {
                      const int t = tg * 8 + g;
                      const float* chunk = &xsm[bt::x_offset(t, bt::x_chunk(h, qd, sp)) / 2];
                      // b0 = word 2 s2 (halves 0, 1), b1 = word 2 s2 + 1
                      B[2 * qd][t] = chunk[4 * s2];
                      B[2 * qd + 1][t] = chunk[4 * s2 + 1];
                      B[2 * qd + 8][t] = chunk[4 * s2 + 2];
                      B[2 * qd + 9][t] = chunk[4 * s2 + 3];
                    }
                  }
                  for (int row = 0; row < 16; ++row) {
                    const int64_t n = static_cast<int64_t>(nb) * 16 + row;
                    if (n >= N) continue;
                    for (int t = 0; t < M; ++t) {
                      double d = 0;
                      for (int c = 0; c < 16; ++c) d += A[row][c] * B[c][t];
                      ye[static_cast<size_t>(t) * N + n] += d;
                    }
                  }
                }
            }
        }
      }
    for (size_t i = 0; i < y.size(); ++i) ASSERT_NEAR(ye[i], y[i], 1e-4 * (1 + std::fabs(y[i]))) << "cell " << i;
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
