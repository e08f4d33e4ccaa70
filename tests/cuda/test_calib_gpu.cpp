// The calibration forward on the GPU (calib_gpu/GpuRunner, issue 12) against the CPU
// Runner (compensate/network.h) on models/stories260K-hf (GQA: 8 heads over 4 KV heads):
// every layer's output from the same input, the logits of the whole model, the KL on the
// device, mean_kl and the restoration gains; the full-precision path, the RTN W4 path and
// the W4 path with random ECs of every gate kind. The GPU runs fp32 with plain (non-TF32)
// cuBLAS SGEMM, so the tolerances are float rounding (1e-5 relative per layer), far below
// what an off-by-one RoPE position or causal mask gives (several percent).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "calib_gpu/gpu_runner.h"
#include "compensate/diagnostic.h"
#include "compensate/ec_train.h"
#include "compensate/forward_backend.h"
#include "compensate/network.h"
#include "compensate/quantize_model.h"
#include "compensate/target_kl.h"
#include "compensate/teacher_targets.h"
#include "core/error.h"
#include "cuda/gpu_test_util.h"
#include "random_network.h"
#include "test_paths.h"

namespace spear {
namespace {

using calib_gpu::GpuRunner;

const std::string kModel = std::string(SPEAR_SOURCE_DIR) + "/models/stories260K-hf";

// The FP network with its RTN W4 (per channel, asymmetric: the repository's default) path.
const Network& stories_net() {
  static const Network* n = [] {
    auto* net = new Network(Network::load_fp(kModel));
    QuantizeOptions qo;
    qo.verbose = false;
    net->set_quantized(quantize_model(kModel, qo).weights);
    return net;
  }();
  return *n;
}

std::vector<int32_t> random_tokens(int64_t n, int64_t vocab, uint64_t seed) {
  std::mt19937_64 g(seed);
  std::uniform_int_distribution<int32_t> d(0, static_cast<int32_t>(vocab - 1));
  std::vector<int32_t> t(n);  // (n)
  for (auto& v : t) v = d(g);
  return t;
}

using test::randn;

enum class Gate { None, Diag, Full };

// Random ECs on every module of every layer (ranks 1..8 cycling), large enough to move
// the outputs visibly: B·A about 10% of the module's scale, gates far from γ ≡ 1.
std::vector<std::optional<ECParams>> random_ecs(const Network& n, Gate gate, uint64_t seed) {
  std::mt19937_64 g(seed);
  const int64_t L = n.cfg.num_layers;
  std::vector<std::optional<ECParams>> ecs(L * kNumModules);
  for (int64_t l = 0; l < L; ++l)
    for (Module m : kAllModules) {
      ECParams p;
      p.in = n.module_in(m);
      p.out = n.module_out(m);
      p.rank = 1 + (module_index(l, m) * 3) % 8;
      p.gated = gate != Gate::None;
      p.A = randn(p.rank * p.in, g, 1.0f / std::sqrt(static_cast<float>(p.in)));
      p.B = randn(p.out * p.rank, g, 0.1f / std::sqrt(static_cast<float>(p.rank)));
      if (p.gated) {
        p.G = randn(p.rank * p.rank, g, 0.5f);
        if (gate == Gate::Diag)
          for (int64_t i = 0; i < p.rank; ++i)
            for (int64_t j = 0; j < p.rank; ++j)
              if (i != j) p.G[i * p.rank + j] = 0.0f;
        p.c = randn(p.rank, g, 0.5f);
      }
      ecs[module_index(l, m)] = std::move(p);
    }
  return ecs;
}

struct Diff {
  double rel_l2 = 0, rel_max = 0;  // ‖a − b‖ / ‖b‖, max|a − b| / max|b|
};
Diff diff(const std::vector<float>& a, const std::vector<float>& b) {
  EXPECT_EQ(a.size(), b.size());
  double d2 = 0, b2 = 0, dmax = 0, bmax = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    const double d = static_cast<double>(a[i]) - b[i];
    d2 += d * d;
    b2 += static_cast<double>(b[i]) * b[i];
    dmax = std::max(dmax, std::abs(d));
    bmax = std::max(bmax, std::abs(static_cast<double>(b[i])));
  }
  return {std::sqrt(d2 / std::max(b2, 1e-300)), dmax / std::max(bmax, 1e-300)};
}

std::vector<float> download(const float* dev, int64_t n) {
  std::vector<float> h(n);  // (n)
  EXPECT_EQ(cudaMemcpy(h.data(), dev, n * sizeof(float), cudaMemcpyDeviceToHost), cudaSuccess);
  return h;
}

float* device_copy(const std::vector<float>& h) {
  float* d = nullptr;
  EXPECT_EQ(cudaMalloc(&d, h.size() * sizeof(float)), cudaSuccess);
  EXPECT_EQ(cudaMemcpy(d, h.data(), h.size() * sizeof(float), cudaMemcpyHostToDevice), cudaSuccess);
  // From pageable memory cudaMemcpy may return before the DMA lands, and the runner's
  // non-blocking stream does not wait for the legacy default stream.
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  return d;
}

// Every layer from the CPU's input (so errors do not compound), B windows of T tokens;
// also the chained stream after the last layer.
void check_layers(bool quantized, const std::vector<std::optional<ECParams>>* ecs, const char* what) {
  const Network& n = stories_net();
  Runner cpu(n);
  GpuRunner gpu(n);
  const int64_t B = 3, T = 96, D = n.cfg.hidden_size, rows = B * T;
  const std::vector<int32_t> tok = random_tokens(rows, n.cfg.vocab_size, 7);
  std::vector<float> x(rows * D);  // (rows, dim) CPU stream
  cpu.embed(tok.data(), rows, x.data());
  float* xd = nullptr;  // (rows, dim) GPU stream
  ASSERT_EQ(cudaMalloc(&xd, rows * D * sizeof(float)), cudaSuccess);
  gpu.embed_dev(tok.data(), rows, xd);
  ASSERT_EQ(cudaStreamSynchronize(gpu.stream()), cudaSuccess);
  EXPECT_EQ(diff(download(xd, rows * D), x).rel_max, 0.0) << what << ": embeddings";
  float* chained = device_copy(x);  // (rows, dim) the GPU's own stream through all layers
  for (int64_t l = 0; l < n.cfg.num_layers; ++l) {
    const LayerView lv = quantized ? q_view(n, l, ecs) : fp_view(n, l);
    ASSERT_EQ(cudaMemcpy(xd, x.data(), rows * D * sizeof(float), cudaMemcpyHostToDevice), cudaSuccess);
    gpu.layer_forward_dev(lv, l, xd, B, T);
    gpu.layer_forward_dev(lv, l, chained, B, T);
    cpu.layer_forward(lv, l, x.data(), B, T, nullptr);
    ASSERT_EQ(cudaStreamSynchronize(gpu.stream()), cudaSuccess);
    const Diff d = diff(download(xd, rows * D), x);
    EXPECT_LT(d.rel_l2, 1e-5) << what << ": layer " << l;
    EXPECT_LT(d.rel_max, 1e-4) << what << ": layer " << l;
  }
  const Diff d = diff(download(chained, rows * D), x);
  EXPECT_LT(d.rel_l2, 5e-5) << what << ": after all layers, chained";
  EXPECT_LT(d.rel_max, 5e-4) << what << ": after all layers, chained";
  cudaFree(xd);
  cudaFree(chained);
}

TEST(CalibGpu, LayerOutputsMatchCpuFullPrecision) {
  REQUIRE_GPU();
  check_layers(false, nullptr, "fp");
}

TEST(CalibGpu, LayerOutputsMatchCpuQuantized) {
  REQUIRE_GPU();
  check_layers(true, nullptr, "rtn w4");
}

TEST(CalibGpu, LayerOutputsMatchCpuQuantizedWithEcs) {
  REQUIRE_GPU();
  const Network& n = stories_net();
  for (Gate g : {Gate::None, Gate::Diag, Gate::Full}) {
    const auto ecs = random_ecs(n, g, 11 + static_cast<int>(g));
    const char* name = g == Gate::None ? "w4 + ungated ECs" : g == Gate::Diag ? "w4 + diag-gate ECs" : "w4 + full-gate ECs";
    check_layers(true, &ecs, name);
  }
}

// The ECs do change the outputs (so the comparisons above test the EC path at all).
TEST(CalibGpu, EcsMoveTheOutputs) {
  REQUIRE_GPU();
  const Network& n = stories_net();
  GpuRunner gpu(n);
  const int64_t T = 64, V = n.cfg.vocab_size;
  const std::vector<int32_t> tok = random_tokens(T, V, 3);
  std::vector<float> a(T * V), b(T * V), c(T * V);  // (T, V)
  const auto full = random_ecs(n, Gate::Full, 5);
  auto ungated = full;
  for (auto& e : ungated) {
    e->gated = false;
    e->G.clear();
    e->c.clear();
  }
  gpu.forward(tok.data(), 1, T, true, nullptr, a.data());
  gpu.forward(tok.data(), 1, T, true, &ungated, b.data());
  gpu.forward(tok.data(), 1, T, true, &full, c.data());
  EXPECT_GT(diff(b, a).rel_l2, 1e-3);
  EXPECT_GT(diff(c, b).rel_l2, 1e-3);  // the gate matters
}

TEST(CalibGpu, LogitsAndKlMatchCpu) {
  REQUIRE_GPU();
  const Network& n = stories_net();
  Runner cpu(n);
  GpuRunner gpu(n);
  const int64_t B = 2, T = 128, V = n.cfg.vocab_size, rows = B * T;
  const std::vector<int32_t> tok = random_tokens(rows, V, 21);
  const auto ecs = random_ecs(n, Gate::Full, 23);
  std::vector<float> fp_c(rows * V), fp_g(rows * V), q_c(rows * V), q_g(rows * V);  // (rows, V)
  cpu.forward(tok.data(), B, T, false, nullptr, fp_c.data());
  gpu.forward(tok.data(), B, T, false, nullptr, fp_g.data());
  cpu.forward(tok.data(), B, T, true, &ecs, q_c.data());
  gpu.forward(tok.data(), B, T, true, &ecs, q_g.data());
  Diff d = diff(fp_g, fp_c);
  EXPECT_LT(d.rel_l2, 5e-5) << "fp logits";
  EXPECT_LT(d.rel_max, 5e-4) << "fp logits";
  d = diff(q_g, q_c);
  EXPECT_LT(d.rel_l2, 5e-5) << "w4 + EC logits";
  EXPECT_LT(d.rel_max, 5e-4) << "w4 + EC logits";

  // The KL on the device from the same logits as the CPU's (isolates the kernels).
  std::vector<float> ref(rows * V);  // (rows, V) CPU log-probs of the FP logits
  log_softmax_rows(fp_c.data(), rows, V, ref.data());
  const double kl_cpu = kl_rows(q_c.data(), ref.data(), rows, V, 0.0f, nullptr);
  float* zd = device_copy(q_c);
  float* lpd = device_copy(fp_c);
  double* kd = nullptr;
  ASSERT_EQ(cudaMalloc(&kd, rows * sizeof(double)), cudaSuccess);
  gpu.log_softmax_dev(lpd, rows);
  gpu.kl_rows_dev(zd, lpd, rows, kd);
  ASSERT_EQ(cudaStreamSynchronize(gpu.stream()), cudaSuccess);
  const Diff dl = diff(download(lpd, rows * V), ref);
  EXPECT_LT(dl.rel_max, 1e-6) << "log-softmax";
  std::vector<double> kr(rows);  // (rows)
  ASSERT_EQ(cudaMemcpy(kr.data(), kd, rows * sizeof(double), cudaMemcpyDeviceToHost), cudaSuccess);
  double kl_gpu = 0;
  for (double v : kr) {
    EXPECT_GE(v, -1e-9);
    kl_gpu += v;
  }
  EXPECT_GT(kl_cpu, 1e-4 * rows);  // the ECs are far from the FP model: a KL worth comparing
  EXPECT_NEAR(kl_gpu, kl_cpu, 1e-6 * kl_cpu) << "KL of the same logits";
  // And the KL of the GPU's own logits against its own targets.
  float* qd = device_copy(q_g);
  float* fd = device_copy(fp_g);
  gpu.log_softmax_dev(fd, rows);
  gpu.kl_rows_dev(qd, fd, rows, kd);
  ASSERT_EQ(cudaStreamSynchronize(gpu.stream()), cudaSuccess);  // a non-blocking stream
  ASSERT_EQ(cudaMemcpy(kr.data(), kd, rows * sizeof(double), cudaMemcpyDeviceToHost), cudaSuccess);
  kl_gpu = 0;
  for (double v : kr) kl_gpu += v;
  EXPECT_NEAR(kl_gpu, kl_cpu, 5e-4 * kl_cpu) << "KL, all on the GPU";
  cudaFree(zd);
  cudaFree(lpd);
  cudaFree(qd);
  cudaFree(fd);
  cudaFree(kd);
}

// The streamed-weights mode (one layer per path on the device) gives the resident mode's
// logits.
TEST(CalibGpu, StreamedWeightsMatchResident) {
  REQUIRE_GPU();
  const Network& n = stories_net();
  GpuRunner resident(n);
  GpuRunner streamed(n, 0, 0.0);
  EXPECT_TRUE(resident.weights_resident());
  EXPECT_FALSE(streamed.weights_resident());
  const int64_t T = 80, V = n.cfg.vocab_size;
  const std::vector<int32_t> tok = random_tokens(2 * T, V, 31);
  const auto ecs = random_ecs(n, Gate::Diag, 33);
  std::vector<float> a(2 * T * V), b(2 * T * V);  // (2T, V)
  for (bool q : {false, true}) {
    resident.forward(tok.data(), 2, T, q, q ? &ecs : nullptr, a.data());
    streamed.forward(tok.data(), 2, T, q, q ? &ecs : nullptr, b.data());
    EXPECT_LT(diff(b, a).rel_max, 1e-6) << (q ? "quantized" : "fp");
  }
}

CalibData calib_data(int64_t windows, int64_t T, int64_t V) {
  CalibData d;
  d.windows = windows;
  d.ctx = T;
  d.tokens = random_tokens(windows * T, V, 41);
  return d;
}

// mean_kl and the restoration gains, written once against ForwardBackend, on the GPU and
// on the CPU: recompute targets (FP forward on the device) and dense targets (host).
TEST(CalibGpu, MeanKlAndRestorationGainsMatchCpu) {
  REQUIRE_GPU();
  const Network& n = stories_net();
  Runner cpu(n);
  GpuRunner gpu(n);
  const CpuForward cpu_fwd(cpu);
  const int64_t L = n.cfg.num_layers;
  const CalibData data = calib_data(3, 64, n.cfg.vocab_size);
  const auto ecs = random_ecs(n, Gate::Full, 51);
  const std::vector<std::optional<ECParams>> none(L * kNumModules);
  for (TargetMode mode : {TargetMode::Recompute, TargetMode::Dense}) {
    TargetOptions to;
    to.mode = mode;
    const TeacherTargets targets(cpu, data, to);
    const std::string m(target_mode_name(mode));
    for (const auto* e : {&none, &ecs}) {
      const double kc = mean_kl(cpu, data, targets, *e, 3);
      const double kg = mean_kl(gpu, data, targets, *e, 3);
      EXPECT_GT(kc, 0.0);
      EXPECT_NEAR(kg, kc, 5e-4 * kc) << m << (e == &ecs ? ", with ECs" : ", w4");
      // The CPU backend is the Runner overload, bit for bit.
      EXPECT_EQ(mean_kl(cpu_fwd, data, targets, *e, 3), kc);
    }
    double base_c = 0, base_g = 0;
    const std::vector<double> gc = restoration_gains(cpu, data, targets, 2, &base_c);
    const std::vector<double> gg = restoration_gains(gpu, data, targets, 2, &base_g);
    EXPECT_NEAR(base_g, base_c, 5e-4 * base_c) << m;
    ASSERT_EQ(gg.size(), gc.size());
    double gmax = 0;
    for (double v : gc) gmax = std::max(gmax, v);
    EXPECT_GT(gmax, 0.0);
    for (size_t i = 0; i < gc.size(); ++i) {
      // Each gain is a difference of two KLs: its error is that of the KLs (≤ 5e-4 of base).
      EXPECT_NEAR(gg[i], gc[i], 5e-4 * base_c + 1e-9) << m << ": module " << i;
    }
  }
}

TEST(CalibGpu, ForeignWeightsAndMixedViews) {
  // A LayerView whose pointers are neither path's (a scaled copy) is uploaded for the call.
  REQUIRE_GPU();
  const Network& n = stories_net();
  Runner cpu(n);
  GpuRunner gpu(n);
  const int64_t T = 48, D = n.cfg.hidden_size;
  std::vector<float> scaled = n.q[1].W[Module::Up];
  for (float& v : scaled) v *= 1.5f;
  FrozenLayer norms = n.fp[1];
  for (float& v : norms.ffn_norm) v *= 0.9f;
  LayerView lv = q_view(n, 1, nullptr);
  lv.W[Module::Up] = scaled.data();
  lv.W[Module::K] = n.fp[1].W[Module::K].data();  // one FP module (a restoration probe)
  lv.norms = &norms;
  const std::vector<int32_t> tok = random_tokens(T, n.cfg.vocab_size, 61);
  std::vector<float> x(T * D);  // (T, dim)
  cpu.embed(tok.data(), T, x.data());
  float* xd = device_copy(x);
  gpu.layer_forward_dev(lv, 1, xd, 1, T);
  cpu.layer_forward(lv, 1, x.data(), 1, T, nullptr);
  ASSERT_EQ(cudaStreamSynchronize(gpu.stream()), cudaSuccess);
  EXPECT_LT(diff(download(xd, T * D), x).rel_l2, 1e-5);
  cudaFree(xd);
}

// B·A (out, in) of the first r directions of a fit, in double.
std::vector<double> product(const StaticFit& f, int64_t r) {
  std::vector<double> c(f.out * f.in, 0.0);  // (out, in)
  for (int64_t i = 0; i < f.out; ++i)
    for (int64_t k = 0; k < r; ++k)
      for (int64_t j = 0; j < f.in; ++j)
        c[i * f.in + j] += static_cast<double>(f.B[i * f.max_rank + k]) * f.A[k * f.in + j];
  return c;
}

double rel_l2(const std::vector<double>& a, const std::vector<double>& b) {
  double d2 = 0, b2 = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    d2 += (a[i] - b[i]) * (a[i] - b[i]);
    b2 += b[i] * b[i];
  }
  return std::sqrt(d2 / std::max(b2, 1e-300));
}

// The static control's statistics and fits (layer_moments, fit_site) on the GPU against
// the CPU backend: every site and module of two layers (the second from the streams the
// first left, with random ECs on the quantized path), both modes. Eigenvectors are unique
// only up to sign and, at a near-degenerate σ², up to a rotation within their span, so the
// comparison is of σ², the target energy and the product B·A at ranks where σ² has a gap;
// the first direction's A row where it is isolated (the sign convention of finish_static_fit).
TEST(CalibGpu, StaticFitsMatchCpu) {
  REQUIRE_GPU();
  const Network& n = stories_net();
  Runner cpu(n);
  GpuRunner gpu(n);
  const CpuForward cf(cpu);
  const int64_t nw = 3, T = 64;
  const std::vector<int32_t> tok = random_tokens(nw * T, n.cfg.vocab_size, 81);
  const auto ecs = random_ecs(n, Gate::Full, 83);
  auto xf_c = cf.embed(tok.data(), nw * T), xq_c = cf.copy_rows(*xf_c, 0, nw * T);
  auto xf_g = gpu.embed(tok.data(), nw * T), xq_g = gpu.copy_rows(*xf_g, 0, nw * T);
  const unsigned all = (1u << kNumSites) - 1;
  int compared = 0;
  for (int64_t l = 0; l < 2; ++l) {
    const auto* e = l == 0 ? nullptr : &ecs;
    const auto mc = cf.layer_moments(l, *xf_c, *xq_c, nw, T, e, all);
    const auto mg = gpu.layer_moments(l, *xf_g, *xq_g, nw, T, e, all);
    EXPECT_EQ(mg->tokens, nw * T);
    for (int s = 0; s < kNumSites; ++s) {
      std::vector<std::pair<Module, int64_t>> mods;
      for (Module m : kAllModules)
        if (static_cast<int>(module_site(m)) == s) mods.push_back({m, 6});
      for (StaticMode mode : {StaticMode::Qera, StaticMode::Rrr}) {
        const auto fc = cf.fit_site(*mc, l, static_cast<Site>(s), mods, 0.01, mode);
        const auto fg = gpu.fit_site(*mg, l, static_cast<Site>(s), mods, 0.01, mode);
        ASSERT_EQ(fg.size(), mods.size());
        for (size_t i = 0; i < mods.size(); ++i) {
          const std::string what = "layer " + std::to_string(l) + " " + std::string(module_name(mods[i].first)) +
                                   " " + std::string(static_mode_name(mode));
          const StaticFit &c = fc[i], &g = fg[i];
          ASSERT_EQ(g.max_rank, c.max_rank) << what;
          ASSERT_GT(c.target_energy, 0.0) << what;
          EXPECT_NEAR(g.target_energy, c.target_energy, 1e-4 * c.target_energy) << what;
          for (int64_t k = 0; k < c.max_rank; ++k)
            EXPECT_NEAR(g.sigma2[k], c.sigma2[k], 1e-4 * c.sigma2[0]) << what << ": sigma2 " << k;
          // Ranks r whose last σ² is separated from the next (relative gap 1%).
          for (int64_t r = 1; r < c.max_rank; ++r) {
            if (c.sigma2[r - 1] - c.sigma2[r] < 1e-2 * c.sigma2[0]) continue;
            EXPECT_LT(rel_l2(product(g, r), product(c, r)), 1e-3) << what << ": B·A at rank " << r;
            ++compared;
          }
          if (c.max_rank > 1 && c.sigma2[0] - c.sigma2[1] > 1e-2 * c.sigma2[0]) {
            double d = 0, a = 0;
            for (int64_t j = 0; j < c.in; ++j) {
              d = std::max(d, static_cast<double>(std::abs(g.A[j] - c.A[j])));
              a = std::max(a, static_cast<double>(std::abs(c.A[j])));
            }
            EXPECT_LT(d, 1e-3 * a) << what << ": A's first row (sign included)";
          }
        }
      }
    }
  }
  EXPECT_GT(compared, 20) << "too few ranks with a σ² gap to compare";
  // window_nll and mean_nll (the static guard) on the GPU.
  CalibData d;
  d.windows = nw;
  d.ctx = T;
  d.tokens = tok;
  const int64_t L = n.cfg.num_layers;
  const std::vector<std::optional<ECParams>> none(L * kNumModules);
  for (const auto* e : {&none, &ecs}) {
    const double nc = mean_nll(cf, d, *e, 0, nw), ng = mean_nll(gpu, d, *e, 0, nw);
    EXPECT_GT(nc, 0.0);
    EXPECT_NEAR(ng, nc, 1e-5 * nc) << (e == &ecs ? "with ECs" : "w4");
    EXPECT_EQ(nc, mean_nll(cpu, d, *e, 0, nw)) << "the Runner overload is the CPU backend's";
  }
}

}  // namespace
}  // namespace spear
