// Correctness of the CUDA W4A16 GEMM (src/cuda/w4a16.h) against a float64 CPU reference
// built from the dequantize() oracle: fp16 and bf16 activations, per-channel and grouped,
// asymmetric and symmetric, odd M/N/K, poisoned outputs (every element written, nothing
// past N touched), the EC with a per-token gate (per-coordinate and the full r x r one)
// checked token by token, every kernel
// (decode, batch, prefill, dequantize + cuBLAS), EC mode (fused, split) and the dispatcher. Skips without a GPU.
#include <gtest/gtest.h>
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "cuda/gpu_test_util.h"
#include "core/dtype.h"
#include "cuda/w4a16.h"
#include "quant/gpu_layout.h"
#include "quant/rtn.h"

namespace spear::cuda {
namespace {


#define CK(x) ASSERT_EQ((x), cudaSuccess) << #x << ": " << cudaGetErrorString(x)

uint16_t to_bits(float v, bool bf16) { return bf16 ? f32_to_bf16(v) : f32_to_f16(v); }
double from_bits(uint16_t h, bool bf16) { return bf16 ? bf16_to_f32(h) : f16_to_f32(h); }

struct Problem {
  int N, K;
  int64_t group;
  bool sym, bf16;
  int r;  // 0: no EC
  Gate gate = Gate::kSigmoid2;
};

std::string name(const Problem& p) {
  char b[160];
  std::snprintf(b, sizeof b, "N=%d K=%d %s %s r=%d", p.N, p.K, QuantScheme{4, p.group, p.sym}.name().c_str(),
                p.bf16 ? "bf16" : "f16", p.r);
  return b;
}

struct Host {
  std::vector<float> deq;           // (N, K)
  std::vector<uint16_t> a, b;       // EC A (r, K), B (N, r) bits
  std::vector<double> ad, bd;       // as double
  std::vector<float> gg, gc;        // gate: g (r), or G (r, r) for Gate::kFull; c (r)
  W4Matrix w;
  EcTerm ec;
};

void build(const Problem& p, Host& h, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<float> w(static_cast<size_t>(p.N) * p.K);
  for (auto& v : w) v = 0.02f * nd(rng);
  QuantizedMatrix q = quantize_rtn(w.data(), p.N, p.K, QuantScheme{4, p.group, p.sym});
  h.deq = dequantize(q);
  ASSERT_EQ(w4_upload(repack_w4(q), &h.w), cudaSuccess);
  if (p.r > 0) {
    h.a.resize(static_cast<size_t>(p.r) * p.K);
    h.b.resize(static_cast<size_t>(p.N) * p.r);
    h.ad.resize(h.a.size());
    h.bd.resize(h.b.size());
    for (size_t i = 0; i < h.a.size(); ++i) {
      h.a[i] = to_bits(nd(rng) / std::sqrt(static_cast<float>(p.K)), p.bf16);
      h.ad[i] = from_bits(h.a[i], p.bf16);
    }
    for (size_t i = 0; i < h.b.size(); ++i) {
      h.b[i] = to_bits(0.3f * nd(rng), p.bf16);
      h.bd[i] = from_bits(h.b[i], p.bf16);
    }
    const bool full = p.gate == Gate::kFull;
    h.gg.resize(full ? static_cast<size_t>(p.r) * p.r : p.r);
    h.gc.resize(p.r);
    for (auto& g : h.gg) g = full ? nd(rng) / std::sqrt(static_cast<float>(p.r)) : nd(rng);
    for (auto& c : h.gc) c = 0.5f * nd(rng);
    const int64_t K_pad = round_up(p.K, 128), N_pad = round_up(p.N, 16);
    ASSERT_EQ(ec_upload(repack_ec_a(h.a.data(), p.r, p.K, K_pad), repack_ec_b(h.b.data(), p.N, p.r, N_pad),
                        h.gg.data(), h.gc.data(), p.r, p.gate, &h.ec),
              cudaSuccess);
  }
}

// Float64 reference: y (M, N) and the EC part alone.
void reference(const Problem& p, const Host& h, const std::vector<double>& x, int M, std::vector<double>& y,
               std::vector<double>& yec) {
  y.assign(static_cast<size_t>(M) * p.N, 0.0);
  yec.assign(static_cast<size_t>(M) * p.N, 0.0);
#pragma omp parallel for schedule(static)
  for (int t = 0; t < M; ++t) {
    const double* xt = &x[static_cast<size_t>(t) * p.K];
    std::vector<double> u(p.r, 0.0), v(p.r, 0.0);
    for (int j = 0; j < p.r; ++j)
      for (int k = 0; k < p.K; ++k) u[j] += h.ad[static_cast<size_t>(j) * p.K + k] * xt[k];
    for (int j = 0; j < p.r; ++j) {
      double gam = 1.0;
      if (p.gate == Gate::kSigmoid2) gam = 2.0 / (1.0 + std::exp(-(h.gg[j] * u[j] + h.gc[j])));
      if (p.gate == Gate::kFull) {  // 1 + tanh(G u + c): every coordinate of the token's u
        double s = h.gc[j];
        for (int l = 0; l < p.r; ++l) s += static_cast<double>(h.gg[static_cast<size_t>(j) * p.r + l]) * u[l];
        gam = 1.0 + std::tanh(s);
      }
      v[j] = gam * u[j];
    }
    for (int n = 0; n < p.N; ++n) {
      double acc = 0;
      const float* wr = &h.deq[static_cast<size_t>(n) * p.K];
      for (int k = 0; k < p.K; ++k) acc += static_cast<double>(wr[k]) * xt[k];
      double e = 0;
      for (int j = 0; j < p.r; ++j) e += h.bd[static_cast<size_t>(n) * p.r + j] * v[j];
      y[static_cast<size_t>(t) * p.N + n] = acc + e;
      yec[static_cast<size_t>(t) * p.N + n] = e;
    }
  }
}

struct Case {
  KernelConfig cfg;
  bool use_dispatcher = false;
  bool batch_on = false;  // the dispatcher with the batch kernel among its choices (w4a16_set_batch)
};

void run_problem(const Problem& p, const std::vector<int>& Ms, uint32_t seed) {
  SCOPED_TRACE(name(p));
  Host h;
  build(p, h, seed);
  if (::testing::Test::HasFatalFailure()) return;
  const Act act = p.bf16 ? Act::kBF16 : Act::kF16;
  const EcTerm* ec = p.r > 0 ? &h.ec : nullptr;
  W4A16Dispatcher disp("/nonexistent-dir/none.txt");  // heuristic only
  CK(disp.init());
  // The dequantize + cuBLAS path: its own scratch for the largest M (the dispatcher picks it
  // for M >= 512).
  cublasHandle_t blas = nullptr;
  ASSERT_EQ(cublasCreate(&blas), CUBLAS_STATUS_SUCCESS);
  const int max_m = *std::max_element(Ms.begin(), Ms.end());
  const size_t scratch_bytes = w4a16_dequant_scratch_bytes(0, max_m, h.w, ec);
  void* scratch = nullptr;
  CK(cudaMalloc(&scratch, scratch_bytes));
  disp.set_dequant(blas, scratch, scratch_bytes);
  std::mt19937 rng(seed + 1);
  std::normal_distribution<float> nd(0.f, 1.f);
  for (int M : Ms) {
    SCOPED_TRACE("M=" + std::to_string(M));
    const int64_t ldx = p.K, ldy = p.N + 5;
    std::vector<uint16_t> xb(static_cast<size_t>(M) * ldx);
    std::vector<double> xd(static_cast<size_t>(M) * p.K);
    for (int t = 0; t < M; ++t) {
      const float row_scale = 1.0f + static_cast<float>(t % 4);  // gates differ per token
      for (int k = 0; k < p.K; ++k) {
        xb[static_cast<size_t>(t) * ldx + k] = to_bits(row_scale * nd(rng), p.bf16);
        xd[static_cast<size_t>(t) * p.K + k] = from_bits(xb[static_cast<size_t>(t) * ldx + k], p.bf16);
      }
    }
    std::vector<double> yref, yec;
    reference(p, h, xd, M, yref, yec);
    void *dx = nullptr, *dy = nullptr, *dy0 = nullptr, *ws = nullptr;
    const size_t ybytes = static_cast<size_t>(M) * ldy * 2;
    const size_t wsb = w4a16_workspace_bytes(M, h.w, ec);
    CK(cudaMalloc(&dx, xb.size() * 2));
    CK(cudaMalloc(&dy, ybytes));
    CK(cudaMalloc(&dy0, ybytes));
    CK(cudaMalloc(&ws, wsb));
    CK(cudaMemcpy(dx, xb.data(), xb.size() * 2, cudaMemcpyHostToDevice));
    CK(w4a16_workspace_init(ws, wsb, nullptr));

    std::vector<Case> cases;
    const int tg = M <= 8 ? 1 : M <= 16 ? 2 : M <= 32 ? 4 : 8;
    for (EcMode m : {EcMode::kFused, EcMode::kSplit}) {
      if (!ec && m == EcMode::kSplit) continue;
      KernelConfig c;
      c.ec = m;
      c.tg = tg;
      cases.push_back({c});  // nt 1, 8 warps, no split-K
      c.nt = 8 / tg >= 2 ? 2 : 1;
      c.splits = 3;
      c.warps = 4;
      cases.push_back({c});
      c.nt = std::min(4, 8 / tg);
      c.splits = 2;
      c.warps = 8;
      cases.push_back({c});
    }
    if (tg <= 2)  // the bulk (TMA) weight stream: whole slice, split-K, 4 row blocks per block
      for (EcMode m : {EcMode::kFused, EcMode::kSplit}) {
        if (!ec && m == EcMode::kSplit) continue;
        KernelConfig c;
        c.bulk = 1;
        c.ec = m;
        c.tg = tg;
        cases.push_back({c});
        c.nt = 2;
        c.splits = 3;
        c.warps = 4;
        cases.push_back({c});
        c.nt = 4;
        c.splits = 2;
        c.warps = 8;
        cases.push_back({c});
      }
    if (M > 8 && M <= 16) {  // a decode tile smaller than M: the chunked path
      KernelConfig c;
      c.tg = 1;
      c.ec = EcMode::kFused;
      cases.push_back({c});
    }
    if (p.K % 8 == 0 && M > 8) {  // the batch kernel: each nt, 4 and 8 warps, split-K, fused and split EC
      const int btg = M <= 16 ? 2 : M <= 32 ? 4 : 8;
      for (EcMode m : {EcMode::kFused, EcMode::kSplit}) {
        if (!ec && m == EcMode::kSplit) continue;
        KernelConfig c;
        c.kernel = Kernel::kBatch;
        c.ec = m;
        c.tg = btg;
        c.nt = 2;
        cases.push_back({c});
        c.nt = 1;
        c.warps = 4;
        c.splits = 3;
        cases.push_back({c});
        c.nt = 4;
        c.warps = 8;
        c.splits = 2;
        cases.push_back({c});
      }
      if (M > 16) {  // a tile smaller than M: chunks of 16 tokens
        KernelConfig c;
        c.kernel = Kernel::kBatch;
        c.tg = 2;
        c.nt = 2;
        c.splits = 2;
        c.ec = EcMode::kFused;
        cases.push_back({c});
      }
    }
    if (p.K % 8 == 0 && M >= 16)
      for (int bm : {64, 128}) {
        KernelConfig c;
        c.kernel = Kernel::kPrefill;
        c.bm = bm;
        c.ec = EcMode::kSplit;
        cases.push_back({c});
        if (bm == 64 && M <= 64)  // split-K over one token tile (3 does not divide the units evenly)
          for (int splits : {3, 8}) {
            if (splits > (p.K + 127) / 128) continue;
            c.splits = splits;
            cases.push_back({c});
          }
      }
    for (int rows : {0, 48}) {  // whole matrix, and chunks of 48 rows (the last one partial)
      KernelConfig c;
      c.kernel = Kernel::kDequant;
      c.rows = rows;
      c.ec = EcMode::kSplit;
      cases.push_back({c});
    }
    cases.push_back({KernelConfig{}, true});
    cases.push_back({KernelConfig{}, true, true});

    // Plain W4 (no EC) once, to isolate the EC contribution.
    std::vector<uint16_t> y0(static_cast<size_t>(M) * ldy);
    if (ec) {
      CK(cudaMemset(dy0, 0xff, ybytes));
      CK(disp.run(act, dx, ldx, M, h.w, nullptr, dy0, ldy, ws, wsb, nullptr));
      CK(cudaDeviceSynchronize());
      CK(cudaMemcpy(y0.data(), dy0, ybytes, cudaMemcpyDeviceToHost));
    }
    const bool batch_default = w4a16_batch();
    for (const Case& cs : cases) {
      w4a16_set_batch(cs.use_dispatcher ? cs.batch_on : batch_default);
      const std::string cname = cs.use_dispatcher ? "dispatcher:" + disp.select(act, dx, ldx, M, h.w, ec).str()
                                                  : cs.cfg.str();
      SCOPED_TRACE(cname);
      // Twice: the workspace must come back zeroed. The second time three calls run back to
      // back without a host sync (programmatic dependent launch overlaps them).
      // The batch kernel's split-K adds in order: the W4 output is the same bits every run.
      // (Not with an EC: u = A x is summed over K with fp32 atomics, fused or split; the
      // device run of 2026-12-07 saw fused-EC outputs differ between runs, with and without
      // split-K.)
      std::vector<uint16_t> y_first;
      const bool same_bits = !ec && !cs.use_dispatcher && cs.cfg.kernel == Kernel::kBatch;
      for (int rep = 0; rep < 2; ++rep) {
        CK(cudaMemset(dy, 0xff, ybytes));  // poison: NaN in fp16 and bf16
        for (int call = 0; call < (rep ? 3 : 1); ++call) {
          cudaError_t e = cs.use_dispatcher ? disp.run(act, dx, ldx, M, h.w, ec, dy, ldy, ws, wsb, nullptr)
                          : cs.cfg.kernel == Kernel::kDequant
                              ? w4a16_gemm_dequant(act, dx, ldx, M, h.w, ec, dy, ldy, cs.cfg, blas, scratch,
                                                   scratch_bytes, ws, wsb, nullptr)
                              : w4a16_gemm(act, dx, ldx, M, h.w, ec, dy, ldy, cs.cfg, ws, wsb, nullptr);
          CK(e);
        }
        CK(cudaDeviceSynchronize());
        std::vector<uint16_t> y(static_cast<size_t>(M) * ldy);
        CK(cudaMemcpy(y.data(), dy, ybytes, cudaMemcpyDeviceToHost));
        if (same_bits && rep == 0) y_first = y;
        if (same_bits && rep == 1) ASSERT_TRUE(y == y_first) << "the batch kernel's output changed between runs";
        double worst = 0, worst_ec = 0;
        for (int t = 0; t < M; ++t) {
          double num = 0, den = 0, enum_ = 0, eden = 0;
          for (int n = 0; n < p.N; ++n) {
            const double v = from_bits(y[static_cast<size_t>(t) * ldy + n], p.bf16);
            ASSERT_TRUE(std::isfinite(v)) << "t=" << t << " n=" << n << " not written or NaN";
            const double r = yref[static_cast<size_t>(t) * p.N + n];
            num += (v - r) * (v - r);
            den += r * r;
            if (ec) {
              const double d = v - from_bits(y0[static_cast<size_t>(t) * ldy + n], p.bf16);
              const double re = yec[static_cast<size_t>(t) * p.N + n];
              enum_ += (d - re) * (d - re);
              eden += re * re;
            }
          }
          for (int n = p.N; n < ldy; ++n)
            ASSERT_EQ(y[static_cast<size_t>(t) * ldy + n], 0xffff) << "wrote past N at t=" << t << " n=" << n;
          const double rel = std::sqrt(num / den);
          ASSERT_LE(rel, 1e-2) << "token " << t;  // token by token
          worst = std::max(worst, rel);
          if (ec) {
            const double rel_ec = std::sqrt(enum_ / eden);
            ASSERT_LE(rel_ec, p.bf16 ? 6e-2 : 2e-2) << "EC term of token " << t;
            worst_ec = std::max(worst_ec, rel_ec);
          }
        }
        if (rep == 0)
          std::printf("  %-28s M=%-4d %-48s rel %.2e%s\n", name(p).c_str(), M, cname.c_str(), worst,
                      ec ? (" ec-rel " + std::to_string(worst_ec)).c_str() : "");
      }
    }
    w4a16_set_batch(batch_default);
    cudaFree(dx);
    cudaFree(dy);
    cudaFree(dy0);
    cudaFree(ws);
  }
  cudaFree(scratch);
  cublasDestroy(blas);
  w4_free(&h.w);
  if (ec) ec_free(&h.ec);
}

TEST(W4A16Gpu, OddShapesPerChannelF16) {
  REQUIRE_GPU();
  run_problem({333, 517, -1, false, false, 20}, {1, 3, 8, 13}, 1);
}
TEST(W4A16Gpu, Group128SymBf16) {
  REQUIRE_GPU();
  run_problem({1000, 1024, 128, true, true, 32}, {1, 16, 37, 64, 130}, 2);
}
TEST(W4A16Gpu, PerChannelSymF16Large) {
  REQUIRE_GPU();
  run_problem({2048, 4096, -1, true, false, 64}, {1, 5, 17, 200}, 3);
}
TEST(W4A16Gpu, Group128AsymBf16) {
  REQUIRE_GPU();
  run_problem({777, 384, 128, false, true, 16}, {2, 9, 33, 257, 520}, 4);
}
TEST(W4A16Gpu, Group256AsymF16NoEc) {
  REQUIRE_GPU();
  run_problem({300, 1000, 256, false, false, 0}, {4, 70}, 5);
}
TEST(W4A16Gpu, IdentityGateBf16OddK) {
  REQUIRE_GPU();
  Problem p{129, 259, -1, false, true, 7};
  p.gate = Gate::kIdentity;
  run_problem(p, {1, 6, 11}, 6);
}

// Calibration's full r x r gate (Gate::kFull) in every kernel and EC mode: fused epilogue,
// the in-place gate kernel before split, prefill and dequant; r not a multiple of 16 (the
// zero padding of G must keep padded coordinates at 0).
TEST(W4A16Gpu, FullGateF16OddShapes) {
  REQUIRE_GPU();
  Problem p{333, 517, -1, false, false, 20};
  p.gate = Gate::kFull;
  run_problem(p, {1, 3, 8, 13, 64}, 11);
}
TEST(W4A16Gpu, FullGateBf16Group128) {
  REQUIRE_GPU();
  Problem p{1000, 1024, 128, true, true, 64};
  p.gate = Gate::kFull;
  run_problem(p, {1, 16, 37, 130, 520}, 12);
}

TEST(W4A16Gpu, RejectsBadArguments) {
  REQUIRE_GPU();
  W4Matrix w;  // null pointers
  KernelConfig c;
  EXPECT_EQ(w4a16_gemm(Act::kF16, reinterpret_cast<void*>(16), 8, 1, w, nullptr, reinterpret_cast<void*>(16), 8, c,
                       reinterpret_cast<void*>(16), 1 << 20, nullptr),
            cudaErrorInvalidValue);
  KernelConfig bad;
  bad.nt = 3;
  EXPECT_FALSE(w4a16_config_ok(bad, nullptr, 8, 1, w, nullptr));
  KernelConfig parsed;
  ASSERT_TRUE(KernelConfig::parse("decode nt=2 tg=1 warps=4 splits=3 ec=split", &parsed));
  EXPECT_EQ(parsed.str(), "decode nt=2 tg=1 warps=4 splits=3 ec=split");
  ASSERT_TRUE(KernelConfig::parse("decode nt=4 tg=2 warps=8 splits=2 bulk=1 ec=fused", &parsed));
  EXPECT_EQ(parsed.str(), "decode nt=4 tg=2 warps=8 splits=2 bulk=1 ec=fused");
  KernelConfig bulk_tg4;  // the bulk stream exists for tg <= 2 only
  bulk_tg4.bulk = 1;
  bulk_tg4.tg = 4;
  EXPECT_FALSE(w4a16_config_ok(bulk_tg4, nullptr, 8, 32, w, nullptr));
  EXPECT_FALSE(KernelConfig::parse("decode nt=x", &parsed));
  ASSERT_TRUE(KernelConfig::parse("batch nt=4 tg=8 warps=4 splits=3 ec=fused", &parsed));
  EXPECT_EQ(parsed.kernel, Kernel::kBatch);
  EXPECT_EQ(parsed.str(), "batch nt=4 tg=8 warps=4 splits=3 ec=fused");
  KernelConfig batch_tg1 = parsed;  // the batch kernel's token tile is 16, 32 or 64
  batch_tg1.tg = 1;
  EXPECT_FALSE(w4a16_config_ok(batch_tg1, nullptr, 8, 32, w, nullptr));
  ASSERT_TRUE(KernelConfig::parse("dequant rows=4096 ec=split", &parsed));
  EXPECT_EQ(parsed.kernel, Kernel::kDequant);
  EXPECT_EQ(parsed.str(), "dequant rows=4096 ec=split");
  ASSERT_TRUE(KernelConfig::parse("dequant ec=split", &parsed));
  EXPECT_EQ(parsed.rows, 0);
  // kDequant needs cuBLAS: w4a16_gemm refuses it, and so does the dequant entry without a handle.
  EXPECT_EQ(w4a16_gemm(Act::kF16, reinterpret_cast<void*>(16), 8, 1, w, nullptr, reinterpret_cast<void*>(16), 8,
                       parsed, reinterpret_cast<void*>(16), 1 << 20, nullptr),
            cudaErrorInvalidValue);
  EXPECT_EQ(w4a16_gemm_dequant(Act::kF16, reinterpret_cast<void*>(16), 8, 1, w, nullptr, reinterpret_cast<void*>(16),
                               8, parsed, nullptr, reinterpret_cast<void*>(16), 1 << 20, nullptr, 0, nullptr),
            cudaErrorInvalidValue);
}

// The dispatcher's table survives a save/load round trip and is keyed by the GPU name.
TEST(W4A16Gpu, DispatcherAutotuneCache) {
  REQUIRE_GPU();
  Problem p{512, 1024, -1, false, false, 16};
  Host h;
  build(p, h, 9);
  const std::string path = ::testing::TempDir() + "spear_w4a16_cache_test.txt";
  std::remove(path.c_str());
  W4A16Dispatcher d(path);
  CK(d.init());
  const int M = 4;
  void *dx, *dy, *ws;
  const size_t wsb = w4a16_workspace_bytes(M, h.w, &h.ec);
  CK(cudaMalloc(&dx, M * p.K * 2));
  CK(cudaMemset(dx, 0x11, M * p.K * 2));
  CK(cudaMalloc(&dy, M * p.N * 2));
  CK(cudaMalloc(&ws, wsb));
  CK(w4a16_workspace_init(ws, wsb, nullptr));
  KernelConfig best;
  float us = 0;
  CK(d.autotune(Act::kF16, dx, p.K, M, h.w, &h.ec, dy, p.N, ws, wsb, nullptr, &best, &us, 5));
  EXPECT_GT(us, 0.f);
  ASSERT_TRUE(d.save());
  W4A16Dispatcher d2(path);
  CK(d2.init());
  EXPECT_EQ(d2.size(), 1u);
  bool cached = false;
  EXPECT_EQ(d2.select(Act::kF16, dx, p.K, M, h.w, &h.ec, &cached).str(), best.str());
  EXPECT_TRUE(cached);
  // M = 3 shares the bucket of 4.
  d2.select(Act::kF16, dx, p.K, 3, h.w, &h.ec, &cached);
  EXPECT_TRUE(cached);
  std::printf("  autotuned %s: %s (%.2f us), gpu '%s'\n", W4A16Dispatcher::key(Act::kF16, M, h.w, &h.ec).c_str(),
              best.str().c_str(), us, d.gpu_name().c_str());
  cudaFree(dx);
  cudaFree(dy);
  cudaFree(ws);
  w4_free(&h.w);
  ec_free(&h.ec);
  std::remove(path.c_str());
}

}  // namespace
}  // namespace spear::cuda
