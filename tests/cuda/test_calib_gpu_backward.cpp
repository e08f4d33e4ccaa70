// The calibration backward pass on the GPU (calib_gpu: GpuRunner::layer_backward_dev,
// head_backward_dev, the KL gradient, GpuGrad) against the CPU Runner's hand-written
// backward (compensate/network.cpp), which test_compensate checks against finite
// differences. A random tiny Llama (3 layers, GQA 4 heads over 2 KV heads, head_dim 16)
// with a 3-bit RTN quantized path and ECs of every gate kind (full r×r G, diagonal G,
// ungated) on some modules: every input gradient and EC gradient of every layer, the head,
// the KL gradient, whole e2e gradients for each teacher-target mode, finite differences of
// the GPU's own loss, a few Adam steps of train_e2e, and calibrate() end to end on
// stories260K. fp32 with plain (non-TF32) cuBLAS SGEMM on the GPU, so the tolerances are
// float rounding in a different summation order (relative 1e-4).
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdlib>
#include <fstream>
#include <cmath>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "calib_gpu/gpu_grad.h"
#include "calib_gpu/gpu_runner.h"
#include "compensate/calibrate.h"
#include "compensate/ec_train.h"
#include "compensate/grad_backend.h"
#include "compensate/network.h"
#include "compensate/quantize_model.h"
#include "compensate/target_kl.h"
#include "compensate/teacher_targets.h"
#include "cuda/gpu_test_util.h"
#include "quant/rtn.h"
#include "random_network.h"
#include "test_paths.h"

namespace spear {
namespace {

using calib_gpu::GpuGrad;
using calib_gpu::GpuRunner;

using test::randn;

ModelConfig tiny_config() {
  ModelConfig c;
  c.vocab_size = 97;
  c.hidden_size = 64;
  c.intermediate_size = 96;
  c.num_layers = 3;
  c.num_heads = 4;
  c.num_kv_heads = 2;  // GQA: two query heads per KV head
  c.head_dim = 16;
  c.max_position_embeddings = 512;
  c.rms_norm_eps = 1e-5;
  return c;
}

// A random network whose quantized path is 3-bit RTN of its weights (as test_compensate's).
const Network& tiny_net() {
  static const Network* net = new Network(test::random_network(tiny_config(), 1234, 0.3f));
  return *net;
}

enum class Gate { None, Diag, Full };

ECParams random_ec(const Network& n, Module m, int64_t r, Gate gate, std::mt19937_64& g) {
  ECParams p;
  p.in = n.module_in(m);
  p.out = n.module_out(m);
  p.rank = r;
  p.gated = gate != Gate::None;
  p.A = randn(r * p.in, g, 1.0f / std::sqrt(static_cast<float>(p.in)));
  p.B = randn(p.out * r, g, 0.2f / std::sqrt(static_cast<float>(r)));
  if (p.gated) {
    p.G = randn(r * r, g, 0.5f);
    if (gate == Gate::Diag)
      for (int64_t i = 0; i < r; ++i)
        for (int64_t j = 0; j < r; ++j)
          if (i != j) p.G[i * r + j] = 0.0f;
    p.c = randn(r, g, 0.5f);
  }
  return p;
}

// ECs on some modules of every layer, every gate kind on every layer's mix of sites.
std::vector<std::optional<ECParams>> test_ecs(const Network& n, uint64_t seed) {
  std::mt19937_64 g(seed);
  std::vector<std::optional<ECParams>> ecs(n.cfg.num_layers * kNumModules);
  auto put = [&](int64_t l, Module m, int64_t r, Gate gate) { ecs[module_index(l, m)] = random_ec(n, m, r, gate, g); };
  put(0, Module::Q, 3, Gate::Full);
  put(0, Module::K, 2, Gate::Diag);
  put(0, Module::V, 2, Gate::None);
  put(0, Module::O, 4, Gate::Full);
  put(1, Module::Gate, 3, Gate::Diag);
  put(1, Module::Up, 2, Gate::None);
  put(1, Module::Down, 5, Gate::Full);
  put(2, Module::Q, 2, Gate::None);
  put(2, Module::V, 3, Gate::Full);
  put(2, Module::O, 2, Gate::Diag);
  put(2, Module::Down, 3, Gate::Diag);
  return ecs;
}

// got against ref: ‖got − ref‖ ≤ tol·‖ref‖ and max|got − ref| ≤ 10·tol·max|ref|; the
// message names the largest error, where it is and both values.
void expect_close(const std::vector<float>& got, const std::vector<float>& ref, double tol,
                  const std::string& what) {
  ASSERT_EQ(got.size(), ref.size()) << what << ": sizes differ";
  double d2 = 0, r2 = 0, dmax = 0, rmax = 0;
  size_t imax = 0;
  bool finite = true;
  for (size_t i = 0; i < ref.size(); ++i) {
    finite = finite && std::isfinite(got[i]);
    const double d = std::abs(static_cast<double>(got[i]) - ref[i]);
    d2 += d * d;
    r2 += static_cast<double>(ref[i]) * ref[i];
    if (d > dmax) {
      dmax = d;
      imax = i;
    }
    rmax = std::max(rmax, std::abs(static_cast<double>(ref[i])));
  }
  const double rel = std::sqrt(d2) / std::max(std::sqrt(r2), 1e-300);
  std::ostringstream msg;
  msg << what << " (" << ref.size() << " values): relative L2 error " << rel << ", max abs error " << dmax
      << " at [" << imax << "] (gpu " << (ref.empty() ? 0.0f : got[imax]) << ", cpu "
      << (ref.empty() ? 0.0f : ref[imax]) << "), max |cpu| " << rmax;
  EXPECT_TRUE(finite) << msg.str() << ": non-finite GPU values";
  if (ref.empty()) return;
  EXPECT_GT(rmax, 0.0) << msg.str() << ": the reference is all zero (nothing tested)";
  EXPECT_LE(rel, tol) << msg.str();
  EXPECT_LE(dmax, 10 * tol * rmax) << msg.str();
}

void expect_grads_close(const std::vector<ECGrad>& got, const std::vector<ECGrad>& ref,
                        const std::vector<std::optional<ECParams>>& ecs, double tol, const std::string& what) {
  ASSERT_EQ(got.size(), ref.size());
  for (size_t i = 0; i < ecs.size(); ++i) {
    if (!ecs[i]) continue;
    const std::string name = what + ": EC " + std::to_string(i) + " (layer " + std::to_string(i / kNumModules) +
                             ", module " + std::to_string(i % kNumModules) + ", rank " +
                             std::to_string(ecs[i]->rank) + (ecs[i]->gated ? ", gated" : ", ungated") + ")";
    expect_close(got[i].A, ref[i].A, tol, name + " dA");
    expect_close(got[i].B, ref[i].B, tol, name + " dB");
    expect_close(got[i].G, ref[i].G, tol, name + " dG");
    expect_close(got[i].c, ref[i].c, tol, name + " dc");
  }
}

void expect_params_close(const std::vector<std::optional<ECParams>>& got,
                         const std::vector<std::optional<ECParams>>& ref, double tol, const std::string& what) {
  ASSERT_EQ(got.size(), ref.size());
  for (size_t i = 0; i < ref.size(); ++i) {
    ASSERT_EQ(got[i].has_value(), ref[i].has_value()) << what << ": EC " << i;
    if (!ref[i]) continue;
    const std::string name = what + ": EC " + std::to_string(i);
    expect_close(got[i]->A, ref[i]->A, tol, name + " A");
    expect_close(got[i]->B, ref[i]->B, tol, name + " B");
    expect_close(got[i]->G, ref[i]->G, tol, name + " G");
    expect_close(got[i]->c, ref[i]->c, tol, name + " c");
  }
}

CalibData random_data(const ModelConfig& c, int64_t windows, int64_t T, uint64_t seed) {
  std::mt19937_64 g(seed);
  std::uniform_int_distribution<int32_t> d(0, static_cast<int32_t>(c.vocab_size - 1));
  CalibData cd;
  cd.windows = windows;
  cd.ctx = T;
  cd.tokens.resize(windows * T);
  for (int32_t& t : cd.tokens) t = d(g);
  return cd;
}

std::vector<ECGrad> zero_grads(const std::vector<std::optional<ECParams>>& ecs) {
  std::vector<ECGrad> g(ecs.size());
  for (size_t i = 0; i < ecs.size(); ++i)
    if (ecs[i]) g[i].zero_like(*ecs[i]);
  return g;
}

// Every layer's backward from the CPU's input to that layer, B windows of T tokens, on the
// full-precision path and on the quantized path with the test ECs: dL/d(input) and every
// EC gradient.
void check_layer_backward(int64_t B, int64_t T) {
  const Network& n = tiny_net();
  Runner cpu(n);
  GpuRunner gpu(n);
  const int64_t D = n.cfg.hidden_size, rows = B * T;
  const auto ecs = test_ecs(n, 7);
  const CalibData d = random_data(n.cfg, B, T, 8);
  std::mt19937_64 g(9);
  for (bool quantized : {false, true}) {
    std::vector<float> x(rows * D);  // (rows, dim) the CPU stream, the input of layer l
    cpu.embed(d.tokens.data(), rows, x.data());
    for (int64_t l = 0; l < n.cfg.num_layers; ++l) {
      const LayerView lv = quantized ? q_view(n, l, &ecs) : fp_view(n, l);
      const std::vector<float> dy = randn(rows * D, g, 1.0f);  // (rows, dim) dL/d(output)
      std::vector<ECGrad> gc = zero_grads(ecs), gg = zero_grads(ecs);
      PerModule<ECGrad*> pc, pg;
      for (Module m : kAllModules)
        if (lv.ec[m]) {
          pc[m] = &gc[module_index(l, m)];
          pg[m] = &gg[module_index(l, m)];
        }
      std::vector<float> dx_g = dy;  // (rows, dim)
      gpu.layer_backward(lv, l, x.data(), dx_g.data(), B, T, pg);
      LayerCache cache;
      std::vector<float> out = x;  // (rows, dim)
      cpu.layer_forward(lv, l, out.data(), B, T, &cache);
      std::vector<float> dx_c = dy;  // (rows, dim)
      cpu.layer_backward(lv, l, cache, dx_c.data(), B, T, pc);
      const std::string what = std::string(quantized ? "w3 + ECs" : "fp") + ", B " + std::to_string(B) + " T " +
                               std::to_string(T) + ", layer " + std::to_string(l);
      expect_close(dx_g, dx_c, 1e-4, what + ": dL/d(layer input)");
      std::vector<std::optional<ECParams>> layer_ecs(ecs.size());
      for (Module m : kAllModules)
        if (lv.ec[m]) layer_ecs[module_index(l, m)] = *lv.ec[m];
      expect_grads_close(gg, gc, layer_ecs, 1e-4, what);
      x = std::move(out);
    }
  }
}

TEST(CalibGpuBackward, LayerBackwardMatchesCpu) {
  REQUIRE_GPU();
  check_layer_backward(2, 24);
}

// A window long enough that the dK/dV kernel stages its (head, query) pairs in several
// rounds (2 heads × 300 queries > 512 for the first keys).
TEST(CalibGpuBackward, LayerBackwardMatchesCpuLongWindow) {
  REQUIRE_GPU();
  check_layer_backward(1, 300);
}

TEST(CalibGpuBackward, HeadBackwardMatchesCpu) {
  REQUIRE_GPU();
  const Network& n = tiny_net();
  Runner cpu(n);
  GpuRunner gpu(n);
  const int64_t rows = 40, D = n.cfg.hidden_size, V = n.cfg.vocab_size;
  std::mt19937_64 g(21);
  const std::vector<float> x = randn(rows * D, g, 1.5f);   // (rows, dim)
  const std::vector<float> dl = randn(rows * V, g, 0.1f);  // (rows, vocab)
  std::vector<float> logits(rows * V), rstd, dx_c(rows * D), dx_g(rows * D);
  cpu.head_forward(x.data(), rows, logits.data(), &rstd);
  cpu.head_backward(x.data(), rstd, dl.data(), rows, dx_c.data());
  gpu.head_backward(x.data(), dl.data(), rows, dx_g.data());
  expect_close(dx_g, dx_c, 1e-4, "head backward dL/dx");
}

TEST(CalibGpuBackward, KlGradientMatchesCpu) {
  REQUIRE_GPU();
  const Network& n = tiny_net();
  GpuRunner gpu(n);
  const int64_t rows = 33, V = n.cfg.vocab_size;
  const float scale = 1.0f / 66.0f;
  std::mt19937_64 g(31);
  const std::vector<float> z = randn(rows * V, g, 2.0f);  // (rows, V) student logits
  std::vector<float> ref = randn(rows * V, g, 2.0f);      // (rows, V) teacher log-probs
  log_softmax_rows(ref.data(), rows, V, ref.data());
  std::vector<float> dl_c(rows * V);  // (rows, V)
  const double kl_c = kl_rows(z.data(), ref.data(), rows, V, scale, dl_c.data());
  calib_gpu::DevBuf zd, rd, dld, kd;
  calib_gpu::upload(zd, z.data(), rows * V, gpu.stream());
  calib_gpu::upload(rd, ref.data(), rows * V, gpu.stream());
  kd.ensure(rows * sizeof(double));
  for (bool in_place : {false, true}) {
    float* out = in_place ? zd.f() : dld.floats(rows * V);
    gpu.kl_grad_rows_dev(zd.f(), rd.f(), rows, scale, kd.d(), out);
    std::vector<float> dl_g(rows * V);  // (rows, V)
    std::vector<double> kr(rows);       // (rows)
    ASSERT_EQ(cudaMemcpyAsync(dl_g.data(), out, rows * V * sizeof(float), cudaMemcpyDeviceToHost, gpu.stream()),
              cudaSuccess);
    ASSERT_EQ(cudaMemcpyAsync(kr.data(), kd.d(), rows * sizeof(double), cudaMemcpyDeviceToHost, gpu.stream()),
              cudaSuccess);
    ASSERT_EQ(cudaStreamSynchronize(gpu.stream()), cudaSuccess);
    double kl_g = 0;
    for (double v : kr) kl_g += v;
    EXPECT_GT(kl_c, 0.1);
    EXPECT_NEAR(kl_g, kl_c, 1e-9 * kl_c) << (in_place ? "in place" : "separate output");
    expect_close(dl_g, dl_c, 1e-5, in_place ? "dKL/dlogits, in place" : "dKL/dlogits");
  }
}

// The gradients of one Adam step's batch (3 windows), whole model, on the GPU (GpuGrad,
// window by window and as one batch) and on the CPU (CpuGrad, train_e2e's reference loop),
// for every teacher-target mode.
TEST(CalibGpuBackward, E2eGradientsMatchCpu) {
  REQUIRE_GPU();
  const Network& n = tiny_net();
  Runner cpu(n);
  GpuRunner gpu(n);
  const auto ecs = test_ecs(n, 41);
  const CalibData d = random_data(n.cfg, 3, 40, 42);
  for (TargetMode mode : {TargetMode::Recompute, TargetMode::Dense, TargetMode::TopK}) {
    TargetOptions to;
    to.mode = mode;
    to.top_k = 16;
    const TeacherTargets targets(cpu, d, to);
    const std::string what = "e2e gradients, targets " + std::string(target_mode_name(mode));
    CpuGrad cg(cpu);
    const std::unique_ptr<GradBackend> gg = gpu.gradients();
    ASSERT_EQ(gg->device(), "cuda");
    const float scale = 1.0f / static_cast<float>(d.windows * d.ctx);
    std::vector<ECGrad> rc(ecs.size()), rg(ecs.size());
    cg.begin_step(ecs);
    gg->begin_step(ecs);
    double kc = 0, kg = 0;
    for (int64_t w = 0; w < d.windows; ++w) {
      kc += cg.add_window(d, targets, w, scale);
      kg += gg->add_window(d, targets, w, scale);
    }
    cg.end_step(rc);
    gg->end_step(rg);
    EXPECT_GT(kc, 0.0) << what;
    EXPECT_NEAR(kg, kc, 1e-4 * kc) << what << ": the batch's KL";
    expect_grads_close(rg, rc, ecs, 1e-4, what + ", window by window");
    // The same step as one batch of 3 windows (train_e2e's call).
    std::vector<ECGrad> rb(ecs.size());
    double kb = 0;
    gg->begin_step(ecs);
    gg->add_windows(d, targets, 0, d.windows, scale, &kb);
    gg->end_step(rb);
    EXPECT_NEAR(kb, kc, 1e-4 * kc) << what << ": the batch's KL, batched";
    expect_grads_close(rb, rc, ecs, 1e-4, what + ", batched");
  }
}

// Streamed weights (one layer per path on the device, reloaded as the backward walks the
// layers down) give the resident mode's gradients.
TEST(CalibGpuBackward, StreamedWeightsGiveTheSameGradients) {
  REQUIRE_GPU();
  const Network& n = tiny_net();
  Runner cpu(n);
  GpuRunner resident(n);
  GpuRunner streamed(n, 0, 0.0);
  ASSERT_TRUE(resident.weights_resident());
  ASSERT_FALSE(streamed.weights_resident());
  const auto ecs = test_ecs(n, 81);
  const CalibData d = random_data(n.cfg, 2, 32, 82);
  TargetOptions to;
  to.mode = TargetMode::Recompute;
  const TeacherTargets targets(cpu, d, to);
  std::vector<ECGrad> gr(ecs.size()), gs(ecs.size());
  double kr = 0, ks = 0;
  for (const GpuRunner* r : {&resident, &streamed}) {
    const std::unique_ptr<GradBackend> gb = r->gradients();
    gb->begin_step(ecs);
    gb->add_windows(d, targets, 0, d.windows, 0.01f, r == &resident ? &kr : &ks);
    gb->end_step(r == &resident ? gr : gs);
  }
  EXPECT_NEAR(ks, kr, 1e-9 * kr);
  expect_grads_close(gs, gr, ecs, 1e-6, "streamed against resident weights");
}

// The GPU's gradient against central finite differences of the GPU's own mean KL
// (mean_kl on the GpuRunner), every 5th entry of every EC tensor.
TEST(CalibGpuBackward, GradientsMatchFiniteDifferences) {
  REQUIRE_GPU();
  const Network& n = tiny_net();
  Runner cpu(n);
  GpuRunner gpu(n);
  auto ecs = test_ecs(n, 51);
  const CalibData d = random_data(n.cfg, 2, 24, 52);
  TargetOptions to;
  to.mode = TargetMode::Recompute;
  const TeacherTargets targets(cpu, d, to);
  const std::unique_ptr<GradBackend> gb = gpu.gradients();
  std::vector<ECGrad> grads(ecs.size());
  gb->begin_step(ecs);
  for (int64_t w = 0; w < d.windows; ++w) gb->add_window(d, targets, w, 1.0f / static_cast<float>(d.windows * d.ctx));
  gb->end_step(grads);
  int checked = 0;
  for (size_t i = 0; i < ecs.size(); ++i) {
    if (!ecs[i]) continue;
    std::vector<float>* params[4] = {&ecs[i]->A, &ecs[i]->B, &ecs[i]->G, &ecs[i]->c};
    const std::vector<float>* gr[4] = {&grads[i].A, &grads[i].B, &grads[i].G, &grads[i].c};
    for (int k = 0; k < 4; ++k)
      for (size_t j = 0; j < params[k]->size(); j += 5) {
        float& p = (*params[k])[j];
        const float keep = p, h = 2e-3f;
        p = keep + h;
        const double lp = mean_kl(gpu, d, targets, ecs, d.windows);
        p = keep - h;
        const double lm = mean_kl(gpu, d, targets, ecs, d.windows);
        p = keep;
        const double fd = (lp - lm) / (2 * h);
        EXPECT_NEAR((*gr[k])[j], fd, 2e-4 + 0.03 * std::fabs(fd))
            << "EC " << i << " tensor " << "ABGc"[k] << " #" << j;
        ++checked;
      }
  }
  EXPECT_GT(checked, 50);
}

// A few Adam steps of train_e2e (2 epochs of 2 steps) on each device from the same ECs:
// the same parameters, for the full and the diagonal gate.
TEST(CalibGpuBackward, AdamStepsMatchCpu) {
  REQUIRE_GPU();
  const Network& n = tiny_net();
  Runner cpu(n);
  GpuRunner gpu(n);
  const CalibData d = random_data(n.cfg, 4, 32, 61);
  TargetOptions to;
  to.mode = TargetMode::Recompute;
  const TeacherTargets targets(cpu, d, to);
  for (GateKind gate : {GateKind::Full, GateKind::Diag}) {
    TrainOptions o;
    o.epochs = 2;
    o.batch = 2;
    o.gate = gate;
    o.verbose = false;
    const auto start = test_ecs(n, 62);
    auto ec_cpu = start, ec_gpu = start;
    CpuGrad cg(cpu);
    const std::unique_ptr<GradBackend> gg = gpu.gradients();
    const nlohmann::json lc = train_e2e(cg, d, targets, ec_cpu, o);
    const nlohmann::json lg = train_e2e(*gg, d, targets, ec_gpu, o);
    EXPECT_EQ(lg["device"], "cuda");
    EXPECT_EQ(lc["device"], "cpu");
    const std::string what = "after 4 Adam steps, gate " + std::string(gate_kind_name(gate));
    for (size_t e = 0; e < lc["epochs"].size(); ++e)
      EXPECT_NEAR(lg["epochs"][e]["train_kl"].get<double>(), lc["epochs"][e]["train_kl"].get<double>(),
                  1e-4 * lc["epochs"][e]["train_kl"].get<double>())
          << what << ": epoch " << e << " KL";
    expect_params_close(ec_gpu, ec_cpu, 1e-4, what);
    // Training moved the parameters (so the comparison is of something).
    double moved = 0;
    for (size_t i = 0; i < start.size(); ++i)
      if (start[i])
        for (size_t j = 0; j < start[i]->A.size(); ++j) moved = std::max(moved, static_cast<double>(std::abs(start[i]->A[j] - ec_cpu[i]->A[j])));
    EXPECT_GT(moved, 1e-4) << what;
  }
}

// calibrate() on stories260K with the GPU backend: the e2e training runs there (report
// "training.device"), from the CPU run's placement, and ends at the CPU run's ECs within
// float rounding (then fp16 rounding of both) and the same calibration KLs.
TEST(CalibGpuBackward, CalibrateTrainsOnTheGpuLikeTheCpu) {
  REQUIRE_GPU();
  const std::string model = std::string(SPEAR_SOURCE_DIR) + "/models/stories260K-hf";
  QuantizeOptions qo;
  qo.verbose = false;
  const SpearArtifact w4 = quantize_model(model, qo);
  const CalibData d = random_data(w4.weights.config, 6, 64, 71);
  CalibrateOptions o;
  o.budget = 0.05;
  o.stat_windows = 4;
  o.guard_windows = 0;
  o.probe_windows = 1;
  o.report_windows = 2;
  o.epochs = 2;
  o.batch = 2;
  o.verbose = false;
  const CalibrateResult rc = calibrate(model, w4, d, o);
  ASSERT_GT(rc.placement.size(), 0u);
  o.fixed_placement = rc.placement;
  const CalibrateResult rc2 = calibrate(model, w4, d, o);  // the CPU from a fixed placement
  o.forward = calib_gpu::gpu_forward_factory();
  const CalibrateResult rg = calibrate(model, w4, d, o);
  EXPECT_EQ(rg.report["device"], "cuda");
  EXPECT_EQ(rg.report["training"]["device"], "cuda");
  EXPECT_EQ(rc2.report["training"]["device"], "cpu");
  // fp16 rounding at the end can move an entry by one half-precision step (2^-11 relative).
  expect_params_close(rg.trained_ecs, rc2.trained_ecs, 2e-3, "calibrate, trained ECs");
  const double kc = rc2.report["calib_kl_trained"].get<double>(), kg = rg.report["calib_kl_trained"].get<double>();
  EXPECT_NEAR(kg, kc, 2e-3 * kc) << "calibrate: trained calibration KL";
  EXPECT_LT(kg, rg.report["calib_kl_w4"].get<double>());
}

// calibrate() with the static control on the GPU too (static_on_device), at the CPU run's
// placement: the statistics, both static fits (the sequential refit through earlier ECs
// included) and the guard there give the CPU run's static control within float rounding.
TEST(CalibGpuBackward, StaticControlOnTheGpuLikeTheCpu) {
  REQUIRE_GPU();
  const std::string model = std::string(SPEAR_SOURCE_DIR) + "/models/stories260K-hf";
  QuantizeOptions qo;
  qo.verbose = false;
  const SpearArtifact w4 = quantize_model(model, qo);
  const CalibData d = random_data(w4.weights.config, 8, 64, 73);
  auto product = [](const ECParams& p) {
    std::vector<float> ba(p.out * p.in, 0.0f);  // (out, in) B·A
    for (int64_t o = 0; o < p.out; ++o)
      for (int64_t k = 0; k < p.rank; ++k)
        for (int64_t j = 0; j < p.in; ++j) ba[o * p.in + j] += p.B[o * p.rank + k] * p.A[k * p.in + j];
    return ba;
  };
  for (StaticMode mode : {StaticMode::Qera, StaticMode::Rrr})
    for (int64_t guard : {0, 2}) {
      CalibrateOptions o;
      o.budget = 0.05;
      o.stat_windows = 4;
      o.guard_windows = guard;
      o.probe_windows = 1;
      o.report_windows = 2;
      o.objective = CalibObjective::Static;
      o.static_mode = mode;
      o.verbose = false;
      const CalibrateResult rc = calibrate(model, w4, d, o);
      ASSERT_GT(rc.placement.size(), 0u);
      o.fixed_placement = rc.placement;  // the gains differ by float rounding: no ties to break
      o.forward = calib_gpu::gpu_forward_factory();
      o.static_on_device = true;
      const CalibrateResult rg = calibrate(model, w4, d, o);
      const std::string what = std::string(static_mode_name(mode)) + ", guard windows " + std::to_string(guard);
      EXPECT_EQ(rg.report["static_device"], "cuda") << what;
      EXPECT_EQ(rc.report["static_device"], "cpu") << what;
      const double kc = rc.report["calib_kl_static"].get<double>(), kg = rg.report["calib_kl_static"].get<double>();
      EXPECT_NEAR(kg, kc, 1e-3 * kc) << what << ": calibration KL of the static control";
      if (guard) {
        ASSERT_TRUE(rc.report["static_guard"].is_object()) << what;
        EXPECT_EQ(rg.report["static_guard"]["alpha"], rc.report["static_guard"]["alpha"]) << what;
        const auto& nc = rc.report["static_guard"]["nll"];
        const auto& ng = rg.report["static_guard"]["nll"];
        ASSERT_EQ(ng.size(), nc.size()) << what;
        for (size_t k = 0; k < nc.size(); ++k)
          EXPECT_NEAR(ng[k]["nll"].get<double>(), nc[k]["nll"].get<double>(), 1e-5 * nc[k]["nll"].get<double>())
              << what << ": guard NLL at alpha " << nc[k]["alpha"];
        continue;
      }
      // The closed forms: B·A of each EC (the fit at its rank; A and B alone are unique only
      // where every σ² of the rank is isolated), each rounded to fp16 at the end on both sides.
      ASSERT_EQ(rg.static_ecs.size(), rc.static_ecs.size());
      for (size_t i = 0; i < rc.static_ecs.size(); ++i) {
        ASSERT_EQ(rg.static_ecs[i].has_value(), rc.static_ecs[i].has_value()) << what << ": EC " << i;
        if (!rc.static_ecs[i]) continue;
        ASSERT_EQ(rg.static_ecs[i]->rank, rc.static_ecs[i]->rank);
        expect_close(product(*rg.static_ecs[i]), product(*rc.static_ecs[i]), 1e-2,
                     what + ": B·A of EC " + std::to_string(i));
      }
    }
}

// `spear calibrate --device cuda` through the CLI: the report says the e2e training ran
// on the GPU, and the trained KL is below the quantized model's.
TEST(CalibGpuBackward, CliCalibrateDeviceCudaTrainsOnTheGpu) {
  REQUIRE_GPU();
  const test::TempDir dir("calib_gpu_backward_cli");
  const std::string model = test::tiny_model_dir(), w4 = dir / "w4.spear", ec = dir / "ec.spear",
                    rep = dir / "rep.json", log = dir / "stderr.txt";
  const std::string data = test::data_dir() + "/tinystories/tinystories_val.txt";
  const std::string cli = test::cli_path();
  ASSERT_EQ(std::system((cli + " quantize --model " + model + " --out " + w4 + " >/dev/null 2>&1").c_str()), 0);
  const int rc = std::system((cli + " calibrate --device cuda --model " + model + " --quantized " + w4 +
                              " --calib " + data +
                              " --calib-offset 300000 --calib-ctx 256 --calib-windows 6 --budget 0.05 --epochs 2"
                              " --out " + ec + " --report-json " + rep + " >/dev/null 2>" + log)
                                 .c_str());
  std::ifstream lf(log);
  const std::string err((std::istreambuf_iterator<char>(lf)), std::istreambuf_iterator<char>());
  ASSERT_EQ(rc, 0) << "spear calibrate --device cuda failed; its stderr:\n" << err;
  const nlohmann::json r = nlohmann::json::parse(std::ifstream(rep));
  EXPECT_EQ(r["device"], "cuda") << err;
  EXPECT_EQ(r["training"]["device"], "cuda") << err;
  EXPECT_NE(err.find("spear e2e [cuda]: epoch 2/2"), std::string::npos) << err;
  EXPECT_LT(r["calib_kl_trained"].get<double>(), r["calib_kl_w4"].get<double>()) << err;
}

}  // namespace
}  // namespace spear
