// Error Compensators: the training-mode forward matches the engine's forward, the
// hand-written gradients match finite differences, training lowers its objective, a
// gate at its neutral point reproduces the static control, and the static control is
// the least-squares optimum it claims to be. Also: the option enums' spellings.
#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "compensate/calibrate.h"
#include "compensate/diagnostic.h"
#include "model/ec_layer.h"
#include "compensate/ec_train.h"
#include "compensate/grad_backend.h"
#include "compensate/forward_backend.h"
#include "compensate/network.h"
#include "compensate/quantize_model.h"
#include "compensate/static_control.h"
#include "core/error.h"
#include "core/linalg.h"
#include "model/kv_cache.h"
#include "model/llama.h"
#include "quant/quantized_linear_layer.h"
#include "quant/rtn.h"
#include "random_network.h"
#include "runtime/calib_device.h"

namespace spear {
namespace {

using test::randn;

ModelConfig tiny_config() {
  ModelConfig c;
  c.vocab_size = 37;
  c.hidden_size = 16;
  c.intermediate_size = 24;
  c.num_layers = 2;
  c.num_heads = 4;
  c.num_kv_heads = 2;
  c.head_dim = 4;
  c.max_position_embeddings = 32;
  c.rms_norm_eps = 1e-5;
  c.tie_word_embeddings = false;
  return c;
}

// A random network whose quantized path is 3-bit RTN of its weights.
Network random_network(uint64_t seed) { return test::random_network(tiny_config(), seed, 0.5f); }

ECParams random_ec(int64_t in, int64_t out, int64_t r, bool gated, std::mt19937_64& g) {
  ECParams p;
  p.in = in;
  p.out = out;
  p.rank = r;
  p.gated = gated;
  p.A = randn(r * in, g, 0.3f);
  p.B = randn(out * r, g, 0.3f);
  if (gated) {
    p.G = randn(r * r, g, 0.3f);
    p.c = randn(r, g, 0.3f);
  }
  return p;
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

// The training-mode forward (quantized path with ECs) against the engine's LlamaModel
// built from the same weights with ECLinear modules.
TEST(Compensate, TrainingForwardMatchesEngine) {
  Network n = random_network(1);
  const ModelConfig& c = n.cfg;
  std::mt19937_64 g(2);
  std::vector<std::optional<ECParams>> ecs(c.num_layers * kNumModules);
  ecs[module_index(0, Module::Q)] = random_ec(n.module_in(Module::Q), n.module_out(Module::Q), 3, true, g);
  ecs[module_index(1, Module::Down)] = random_ec(n.module_in(Module::Down), n.module_out(Module::Down), 2, true, g);
  std::vector<LayerWeights> layers(c.num_layers);
  for (int64_t l = 0; l < c.num_layers; ++l) {
    layers[l].attn_norm = n.q[l].attn_norm;
    layers[l].ffn_norm = n.q[l].ffn_norm;
    for (Module m : kAllModules) {
      std::unique_ptr<Linear> lin =
          std::make_unique<DenseLinear>(n.module_out(m), n.module_in(m), n.q[l].W[m]);
      if (ecs[module_index(l, m)]) lin = std::make_unique<ECLinear>(std::move(lin), *ecs[module_index(l, m)]);
      layers[l].modules[m] = std::move(lin);
    }
  }
  LlamaModel model(c, n.embed, std::move(layers), n.final_norm, n.head);
  CalibData d = random_data(c, 1, 12, 3);
  ContiguousKVCache kv(c.num_layers, 12, c.kv_dim());
  std::vector<float> ref = model.forward(d.tokens.data(), 12, kv, 0, true);
  Runner run(n);
  std::vector<float> got(12 * c.vocab_size);
  run.forward(d.tokens.data(), 1, 12, true, &ecs, got.data());
  for (size_t i = 0; i < ref.size(); ++i) ASSERT_NEAR(got[i], ref[i], 1e-4) << i;
}

// The analytic gradients of the mean KL over the B windows of d, one pass as train_e2e
// does it.
std::vector<ECGrad> e2e_grads(const Network& n, const Runner& run, const CalibData& d,
                              const TeacherTargets& targets,
                              const std::vector<std::optional<ECParams>>& ecs) {
  const ModelConfig& c = n.cfg;
  const int64_t T = d.ctx, B = d.windows, V = c.vocab_size;
  std::vector<ECGrad> grads(ecs.size());
  for (size_t i = 0; i < ecs.size(); ++i)
    if (ecs[i]) grads[i].zero_like(*ecs[i]);
  for (int64_t w = 0; w < B; ++w) {
    std::vector<LayerCache> caches(c.num_layers);
    std::vector<float> x(T * c.hidden_size), dx(T * c.hidden_size), logits(T * V), rstd;
    run.embed(d.window(w), T, x.data());
    for (int64_t l = 0; l < c.num_layers; ++l)
      run.layer_forward(q_view(n, l, &ecs), l, x.data(), 1, T, &caches[l]);
    run.head_forward(x.data(), T, logits.data(), &rstd);
    targets.window(w).kl(logits.data(), 1.0f / (B * T), logits.data());
    run.head_backward(x.data(), rstd, logits.data(), T, dx.data());
    for (int64_t l = c.num_layers - 1; l >= 0; --l) {
      PerModule<ECGrad*> gp;
      for (Module m : kAllModules)
        if (ecs[module_index(l, m)]) gp[m] = &grads[module_index(l, m)];
      run.layer_backward(q_view(n, l, &ecs), l, caches[l], dx.data(), 1, T, gp);
    }
  }
  return grads;
}

// Central finite differences of `loss` against the analytic gradients, every `stride`-th
// entry of each EC tensor for which want(ec, tensor, entry) holds. Returns the count.
template <class Loss, class Want>
int check_grads(std::vector<std::optional<ECParams>>& ecs, const std::vector<ECGrad>& grads,
                Loss loss, Want want, size_t stride) {
  int checked = 0;
  for (size_t i = 0; i < ecs.size(); ++i) {
    if (!ecs[i]) continue;
    std::vector<float>* params[4] = {&ecs[i]->A, &ecs[i]->B, &ecs[i]->G, &ecs[i]->c};
    const std::vector<float>* gr[4] = {&grads[i].A, &grads[i].B, &grads[i].G, &grads[i].c};
    for (int k = 0; k < 4; ++k)
      for (size_t j = 0; j < params[k]->size(); j += stride) {
        if (!want(*ecs[i], k, j)) continue;
        float& p = (*params[k])[j];
        const float keep = p, h = 2e-3f;
        p = keep + h;
        const double lp = loss();
        p = keep - h;
        const double lm = loss();
        p = keep;
        const double fd = (lp - lm) / (2 * h);
        const double an = (*gr[k])[j];
        EXPECT_NEAR(an, fd, 2e-3 + 0.03 * std::fabs(fd)) << "EC " << i << " tensor " << k << " #" << j;
        ++checked;
      }
  }
  return checked;
}

// Analytic gradients of the end-to-end KL against central finite differences.
TEST(Compensate, GradientsMatchFiniteDifferences) {
  Network n = random_network(4);
  const ModelConfig& c = n.cfg;
  std::mt19937_64 g(5);
  std::vector<std::optional<ECParams>> ecs(c.num_layers * kNumModules);
  for (Module m : {Module::Q, Module::K, Module::O, Module::Up, Module::Down})
    ecs[module_index(0, m)] = random_ec(n.module_in(m), n.module_out(m), 2, true, g);
  ecs[module_index(1, Module::V)] =
      random_ec(n.module_in(Module::V), n.module_out(Module::V), 2, true, g);
  ecs[module_index(1, Module::Gate)] =
      random_ec(n.module_in(Module::Gate), n.module_out(Module::Gate), 3, false, g);
  const int64_t T = 7, B = 2;
  CalibData d = random_data(c, B, T, 6);
  Runner run(n);
  const TeacherTargets targets(run, d, TargetOptions{TargetMode::Dense});
  auto loss = [&]() {
    return mean_kl(run, d, targets, ecs, B);  // mean over B*T positions
  };
  std::vector<ECGrad> grads = e2e_grads(n, run, d, targets, ecs);
  const int checked =
      check_grads(ecs, grads, loss, [](const ECParams&, int, size_t) { return true; }, 3);
  EXPECT_GT(checked, 50);
}

// CpuGrad (train_e2e's GradBackend on the CPU, and CpuForward::gradients()) is the
// reference loop above bit for bit, over two steps (buffers reused between them).
TEST(Compensate, CpuGradIsTheReferenceLoop) {
  Network n = random_network(8);
  const ModelConfig& c = n.cfg;
  std::mt19937_64 g(9);
  std::vector<std::optional<ECParams>> ecs(c.num_layers * kNumModules);
  ecs[module_index(0, Module::Q)] = random_ec(n.module_in(Module::Q), n.module_out(Module::Q), 2, true, g);
  ecs[module_index(1, Module::Down)] = random_ec(n.module_in(Module::Down), n.module_out(Module::Down), 3, false, g);
  const CalibData d = random_data(c, 2, 9, 10);
  Runner run(n);
  const TeacherTargets targets(run, d, TargetOptions{TargetMode::Recompute});
  const std::vector<ECGrad> ref = e2e_grads(n, run, d, targets, ecs);
  const CpuForward fwd(run);
  const std::unique_ptr<GradBackend> gb = fwd.gradients();
  EXPECT_EQ(gb->device(), "cpu");
  for (int step = 0; step < 2; ++step) {
    std::vector<ECGrad> got(ecs.size());
    gb->begin_step(ecs);
    double kl = 0;
    if (step == 0)
      for (int64_t w = 0; w < d.windows; ++w) kl += gb->add_window(d, targets, w, 1.0f / (d.windows * d.ctx));
    else
      gb->add_windows(d, targets, 0, d.windows, 1.0f / (d.windows * d.ctx), &kl);  // train_e2e's call
    gb->end_step(got);
    EXPECT_NEAR(kl / (d.windows * d.ctx), mean_kl(run, d, targets, ecs, d.windows), 1e-12);
    for (size_t i = 0; i < ecs.size(); ++i) {
      if (!ecs[i]) continue;
      EXPECT_EQ(got[i].A, ref[i].A) << i;
      EXPECT_EQ(got[i].B, ref[i].B) << i;
      EXPECT_EQ(got[i].G, ref[i].G) << i;
      EXPECT_EQ(got[i].c, ref[i].c) << i;
    }
  }
}

// The diagonal gate (--gate diag): G diagonal, its off-diagonal gradients dropped by
// restrict_gate_grads; what remains matches finite differences of the diagonal model,
// and γ_j = 1 + tanh(g_j z_j + c_j) = 2·sigmoid(2 g_j z_j + 2 c_j), the GPU kernel's form.
TEST(Compensate, DiagonalGateGradientsMatchFiniteDifferences) {
  Network n = random_network(21);
  const ModelConfig& c = n.cfg;
  std::mt19937_64 g(22);
  std::vector<std::optional<ECParams>> ecs(c.num_layers * kNumModules);
  auto diag_ec = [&](Module m, int64_t r) {
    ECParams p = random_ec(n.module_in(m), n.module_out(m), r, true, g);
    for (int64_t i = 0; i < r; ++i)
      for (int64_t j = 0; j < r; ++j)
        if (i != j) p.G[i * r + j] = 0.0f;
    for (int64_t i = 0; i < r; ++i) p.G[i * r + i] *= 3.0f;  // well inside tanh's curve
    return p;
  };
  for (Module m : {Module::Q, Module::O, Module::Gate, Module::Down})
    ecs[module_index(0, m)] = diag_ec(m, 3);
  ecs[module_index(1, Module::K)] = diag_ec(Module::K, 2);
  ecs[module_index(1, Module::Up)] = diag_ec(Module::Up, 4);
  const int64_t T = 7, B = 2;
  CalibData d = random_data(c, B, T, 23);
  Runner run(n);
  const TeacherTargets targets(run, d, TargetOptions{TargetMode::Dense});
  auto loss = [&]() { return mean_kl(run, d, targets, ecs, B); };
  std::vector<ECGrad> grads = e2e_grads(n, run, d, targets, ecs);
  // The full gradient has off-diagonal G entries; the diagonal gate drops exactly those.
  double offdiag = 0;
  for (size_t i = 0; i < ecs.size(); ++i)
    if (ecs[i])
      for (int64_t a = 0; a < ecs[i]->rank; ++a)
        for (int64_t b = 0; b < ecs[i]->rank; ++b)
          if (a != b) offdiag += std::fabs(grads[i].G[a * ecs[i]->rank + b]);
  EXPECT_GT(offdiag, 0.0);
  std::vector<ECGrad> full = grads;
  restrict_gate_grads(grads, GateKind::Diag);
  for (size_t i = 0; i < ecs.size(); ++i) {
    if (!ecs[i]) continue;
    const int64_t r = ecs[i]->rank;
    for (int64_t a = 0; a < r; ++a)
      for (int64_t b = 0; b < r; ++b)
        EXPECT_EQ(grads[i].G[a * r + b], a == b ? full[i].G[a * r + b] : 0.0f);
    EXPECT_EQ(grads[i].A, full[i].A);
    EXPECT_EQ(grads[i].c, full[i].c);
  }
  // Every A/B/c entry (stride 2) and every diagonal g_j against finite differences.
  const int checked = check_grads(
      ecs, grads, loss,
      [](const ECParams& p, int k, size_t j) {
        return k != 2 || static_cast<int64_t>(j) / p.rank == static_cast<int64_t>(j) % p.rank;
      },
      2);
  EXPECT_GT(checked, 60);
  // γ of a diagonal G, through the engine's ec_codes, against both closed forms.
  const ECParams& p = *ecs[module_index(0, Module::Q)];
  std::vector<float> x = randn(4 * p.in, g, 1.0f), z(4 * p.rank), s(4 * p.rank), gam(4 * p.rank);
  ec_codes(p, x.data(), 4, z.data(), s.data(), gam.data());
  for (int64_t m = 0; m < 4; ++m)
    for (int64_t j = 0; j < p.rank; ++j) {
      const double a = p.G[j * p.rank + j] * z[m * p.rank + j] + p.c[j];
      EXPECT_NEAR(gam[m * p.rank + j], 1.0 + std::tanh(a), 1e-5);
      EXPECT_NEAR(gam[m * p.rank + j], 2.0 / (1.0 + std::exp(-2.0 * a)), 1e-5);
    }
}

// Training with --gate diag from the neutral gate keeps G diagonal and lowers the KL;
// --gate full moves the off-diagonal entries too.
TEST(Compensate, DiagonalGateTrainingStaysDiagonal) {
  Network n = random_network(24);
  const ModelConfig& c = n.cfg;
  std::mt19937_64 g(25);
  std::vector<std::optional<ECParams>> start(c.num_layers * kNumModules);
  for (Module m : kAllModules) {
    ECParams p = random_ec(n.module_in(m), n.module_out(m), 3, true, g);
    for (float& v : p.B) v *= 0.01f;
    std::fill(p.G.begin(), p.G.end(), 0.0f);
    std::fill(p.c.begin(), p.c.end(), 0.0f);
    start[static_cast<int>(m)] = p;
  }
  CalibData d = random_data(c, 4, 16, 26);
  Runner run(n);
  const TeacherTargets targets(run, d, TargetOptions{TargetMode::Dense});
  const double before = mean_kl(run, d, targets, start, 4);
  for (GateKind gk : {GateKind::Diag, GateKind::Full}) {
    std::vector<std::optional<ECParams>> ecs = start;
    TrainOptions o;
    o.epochs = 20;
    o.batch = 2;
    o.lr = 0.05;
    o.gate = gk;
    o.verbose = false;
    train_e2e(run, d, targets, ecs, o);
    double off = 0, diag = 0;
    for (const auto& e : ecs)
      if (e)
        for (int64_t a = 0; a < e->rank; ++a)
          for (int64_t b = 0; b < e->rank; ++b)
            (a == b ? diag : off) += std::fabs(e->G[a * e->rank + b]);
    EXPECT_GT(diag, 0.0);
    if (gk == GateKind::Diag)
      EXPECT_EQ(off, 0.0);
    else
      EXPECT_GT(off, 0.0);
    EXPECT_LT(mean_kl(run, d, targets, ecs, 4), 0.8 * before) << gate_kind_name(gk);
  }
}

TEST(Compensate, GateAtNeutralPointIsTheStaticControl) {
  std::mt19937_64 g(7);
  ECParams p = random_ec(10, 6, 3, false, g);
  ECParams q = p;
  q.gated = true;
  q.G.assign(9, 0.0f);
  q.c.assign(3, 0.0f);
  std::vector<float> x = randn(5 * 10, g, 1.0f), y1(5 * 6, 0.0f), y2(5 * 6, 0.0f);
  ec_add(p, x.data(), 5, y1.data());
  ec_add(q, x.data(), 5, y2.data());
  for (size_t i = 0; i < y1.size(); ++i) EXPECT_FLOAT_EQ(y1[i], y2[i]);
  // And the static control itself is B·A x.
  for (int64_t m = 0; m < 5; ++m)
    for (int64_t o = 0; o < 6; ++o) {
      double ref = 0;
      for (int64_t k = 0; k < 3; ++k) {
        double z = 0;
        for (int64_t i = 0; i < 10; ++i) z += p.A[k * 10 + i] * x[m * 10 + i];
        ref += p.B[o * 3 + k] * z;
      }
      EXPECT_NEAR(y1[m * 6 + o], ref, 1e-4);
    }
}

// Reduced-rank regression: at full rank it is ordinary least squares of the target on
// x_q (the residual is orthogonal to the inputs), and captured() is exact.
TEST(Compensate, StaticControlIsLeastSquaresOptimum) {
  std::mt19937_64 g(8);
  const int64_t in = 6, out = 5, N = 400;
  std::vector<float> W = randn(out * in, g, 1.0f), Q = W;
  for (float& v : Q) v += std::normal_distribution<float>(0, 0.1f)(g);
  std::vector<float> xf = randn(N * in, g, 1.0f), xq = xf;
  for (float& v : xq) v += std::normal_distribution<float>(0, 0.05f)(g);
  SiteStats st;
  st.reset(in);
  st.add(xf.data(), xq.data(), N);
  Whitening wh = whiten(st, 1e-9);
  StaticFit f = fit_static(W.data(), Q.data(), out, in, st, wh, in, StaticMode::Rrr);
  ECParams ec = ec_from_fit(f, std::min(in, out), false);
  // residual r = W xf - Q xq - C xq must be orthogonal to xq
  std::vector<double> corr(out * in, 0.0);
  double e0 = 0, e1 = 0;
  for (int64_t t = 0; t < N; ++t) {
    std::vector<float> y(out, 0.0f);
    ec_add(ec, &xq[t * in], 1, y.data());
    for (int64_t o = 0; o < out; ++o) {
      double e = 0;
      for (int64_t i = 0; i < in; ++i) e += W[o * in + i] * xf[t * in + i] - Q[o * in + i] * xq[t * in + i];
      e0 += e * e;
      const double r = e - y[o];
      e1 += r * r;
      for (int64_t i = 0; i < in; ++i) corr[o * in + i] += r * xq[t * in + i];
    }
  }
  for (double v : corr) EXPECT_NEAR(v / N, 0.0, 1e-4);
  EXPECT_NEAR(f.target_energy, e0 / N, 1e-3 * e0 / N);
  EXPECT_NEAR(f.captured(out), 1.0 - e1 / e0, 1e-3);
  EXPECT_LT(e1, e0);
}

// QERA: C = SVD_r(ΔW R^½) R^-½ minimises ‖(ΔW − C) R^½‖_F over rank-r C. Checked in
// float64 against another route (R = UᵀU by Cholesky, the SVD of ΔW Uᵀ by the
// eigenvectors of its Gram matrix, C = SVD_r(ΔW Uᵀ) U^-ᵀ), against the Eckart–Young
// bound, and against random rank-r perturbations of the solution.
TEST(Compensate, QeraIsTheWeightedLowRankOptimum) {
  std::mt19937_64 g(31);
  const int64_t in = 7, out = 5, N = 600, r = 2;
  std::vector<float> W = randn(out * in, g, 1.0f), Q = W;
  for (float& v : Q) v += std::normal_distribution<float>(0, 0.2f)(g);
  // Correlated, anisotropic inputs: x = u · Mix with per-coordinate scales.
  std::vector<float> mix = randn(in * in, g, 1.0f), u = randn(N * in, g, 1.0f), x(N * in, 0.0f);
  for (int64_t t = 0; t < N; ++t)
    for (int64_t j = 0; j < in; ++j) {
      double a = 0;
      for (int64_t k = 0; k < in; ++k) a += u[t * in + k] * (0.3 + k) * mix[k * in + j];
      x[t * in + j] = static_cast<float>(a);
    }
  SiteStats st;
  st.reset(in);
  st.add(x.data(), x.data(), N);
  std::vector<double> R(in * in), dW(out * in);
  for (int64_t i = 0; i < in * in; ++i) R[i] = st.Rqq[i] / N;
  for (int64_t i = 0; i < out * in; ++i) dW[i] = static_cast<double>(W[i]) - Q[i];
  // f(C) = tr((ΔW − C) R (ΔW − C)ᵀ)
  auto objective_in = [&](const std::vector<double>& C, const std::vector<double>& Rm) {
    double f = 0;
    for (int64_t o = 0; o < out; ++o)
      for (int64_t i = 0; i < in; ++i)
        for (int64_t j = 0; j < in; ++j)
          f += (dW[o * in + i] - C[o * in + i]) * Rm[i * in + j] * (dW[o * in + j] - C[o * in + j]);
    return f;
  };
  auto objective = [&](const std::vector<double>& C) { return objective_in(C, R); };
  auto product = [&](const std::vector<float>& Bm, const std::vector<float>& Am) {
    std::vector<double> C(out * in, 0.0);  // B (out, r) · A (r, in)
    for (int64_t o = 0; o < out; ++o)
      for (int64_t k = 0; k < r; ++k)
        for (int64_t i = 0; i < in; ++i) C[o * in + i] += static_cast<double>(Bm[o * r + k]) * Am[k * in + i];
    return C;
  };
  // The other route for a weighting Rm: Rm = Uᵀ U, C_ref = SVD_r(ΔW Uᵀ) U^-ᵀ; `tail`
  // receives the Eckart–Young bound Σ_{i>r} σ_i²(ΔW Uᵀ).
  auto reference = [&](const std::vector<double>& Rm, double* tail) {
    std::vector<double> U = Rm;
    cholesky_upper(U, in);
    std::vector<double> M2(out * in, 0.0);  // ΔW Uᵀ
    for (int64_t o = 0; o < out; ++o)
      for (int64_t i = 0; i < in; ++i)
        for (int64_t k = 0; k < in; ++k) M2[o * in + i] += dW[o * in + k] * U[i * in + k];
    std::vector<double> Gm(in * in, 0.0), ev, vecs;
    for (int64_t i = 0; i < in; ++i)
      for (int64_t j = 0; j < in; ++j)
        for (int64_t o = 0; o < out; ++o) Gm[i * in + j] += M2[o * in + i] * M2[o * in + j];
    sym_eig(Gm, in, ev, vecs);  // ascending
    *tail = 0;
    for (int64_t k = 0; k < in - r; ++k) *tail += std::max(ev[k], 0.0);
    std::vector<double> P(in * in, 0.0);  // V_r V_rᵀ
    for (int64_t k = in - r; k < in; ++k)
      for (int64_t i = 0; i < in; ++i)
        for (int64_t j = 0; j < in; ++j) P[i * in + j] += vecs[k * in + i] * vecs[k * in + j];
    std::vector<double> CUt(out * in, 0.0);  // C_ref Uᵀ = M2 P
    for (int64_t o = 0; o < out; ++o)
      for (int64_t j = 0; j < in; ++j)
        for (int64_t i = 0; i < in; ++i) CUt[o * in + j] += M2[o * in + i] * P[i * in + j];
    std::vector<double> Cref(out * in, 0.0);
    for (int64_t o = 0; o < out; ++o)
      for (int64_t j = in - 1; j >= 0; --j) {
        // (c Uᵀ)_j = Σ_{k ≥ j} c_k U[j][k]: back substitution from the last column.
        double s = CUt[o * in + j];
        for (int64_t k = j + 1; k < in; ++k) s -= Cref[o * in + k] * U[j * in + k];
        Cref[o * in + j] = s / U[j * in + j];
      }
    return Cref;
  };
  auto rel_dist = [&](const std::vector<double>& C, const std::vector<double>& Cref) {
    double cn = 0, dn = 0;
    for (int64_t i = 0; i < out * in; ++i) {
      cn += Cref[i] * Cref[i];
      dn += (C[i] - Cref[i]) * (C[i] - Cref[i]);
    }
    return std::sqrt(dn / cn);
  };
  Whitening wh = whiten(st, 0.0);
  StaticFit f = fit_static(W.data(), Q.data(), out, in, st, wh, r, StaticMode::Qera);
  ECParams ec = ec_from_fit(f, r, false);
  const std::vector<double> C = product(ec.B, ec.A);
  double tail = 0;
  const std::vector<double> Cref = reference(R, &tail);
  const double f_ours = objective(C), f_ref = objective(Cref), f0 = objective(std::vector<double>(out * in, 0.0));
  EXPECT_NEAR(f_ref, tail, 1e-9 * f0);
  EXPECT_NEAR(f_ours, f_ref, 1e-5 * f0);
  EXPECT_LT(rel_dist(C, Cref), 1e-4);
  EXPECT_NEAR(f.target_energy, f0, 1e-9 * f0);
  EXPECT_NEAR(f.captured(r), 1.0 - f_ref / f0, 1e-5);
  // Damped: the optimum for R + λI, λ = damp · tr(R)/in (QERA's form with the damped R in
  // both places; before issue 11 "qera" used ΔW R (R+λI)^-½, which is not this optimum).
  {
    const double damp = 0.3;
    double tr = 0;
    for (int64_t i = 0; i < in; ++i) tr += R[i * in + i];
    std::vector<double> Rd = R;
    for (int64_t i = 0; i < in; ++i) Rd[i * in + i] += damp * tr / in;
    Whitening whd = whiten(st, damp);
    ECParams ecd = ec_from_fit(fit_static(W.data(), Q.data(), out, in, st, whd, r, StaticMode::Qera), r, false);
    double tail_d = 0;
    const std::vector<double> Cd = product(ecd.B, ecd.A), Cdref = reference(Rd, &tail_d);
    EXPECT_LT(rel_dist(Cd, Cdref), 1e-4);
    EXPECT_NEAR(objective_in(Cd, Rd), tail_d, 1e-5 * objective_in(std::vector<double>(out * in, 0.0), Rd));
  }
  // No rank-r neighbour does better.
  for (int trial = 0; trial < 50; ++trial) {
    std::vector<float> A2 = ec.A, B2 = ec.B;
    for (float& v : A2) v *= 1.0f + std::normal_distribution<float>(0, 0.05f)(g);
    for (float& v : B2) v += std::normal_distribution<float>(0, 0.05f)(g);
    EXPECT_GE(objective(product(B2, A2)), f_ours - 1e-6 * f0);
  }
  // And it is not the unweighted truncated SVD of ΔW (R matters on these inputs).
  Whitening flat;
  flat.in = in;
  flat.R_half.assign(in * in, 0.0);
  flat.R_inv_half.assign(in * in, 0.0);
  for (int64_t i = 0; i < in; ++i) flat.R_half[i * in + i] = flat.R_inv_half[i * in + i] = 1.0;
  StaticFit plain = fit_static(W.data(), Q.data(), out, in, st, flat, r, StaticMode::Qera);
  ECParams pe = ec_from_fit(plain, r, false);
  EXPECT_GT(objective(product(pe.B, pe.A)), f_ours * 1.01);
}

// mean_nll (the static guard's criterion) is the mean next-token NLL of the real tokens,
// with the ECs in place: a direct computation from the forward's logits.
TEST(Compensate, MeanNllIsTheNextTokenLoss) {
  Network n = random_network(41);
  const ModelConfig& c = n.cfg;
  std::mt19937_64 g(42);
  std::vector<std::optional<ECParams>> ecs(c.num_layers * kNumModules);
  ecs[module_index(1, Module::Down)] =
      random_ec(n.module_in(Module::Down), n.module_out(Module::Down), 2, true, g);
  const int64_t T = 9, V = c.vocab_size;
  CalibData d = random_data(c, 3, T, 43);
  Runner run(n);
  double ref = 0;
  std::vector<float> logits(T * V);
  for (int64_t w = 1; w < 3; ++w) {
    run.forward(d.window(w), 1, T, true, &ecs, logits.data());
    for (int64_t t = 0; t + 1 < T; ++t) {
      double m = -1e30, s = 0;
      for (int64_t v = 0; v < V; ++v) m = std::max(m, static_cast<double>(logits[t * V + v]));
      for (int64_t v = 0; v < V; ++v) s += std::exp(logits[t * V + v] - m);
      ref += m + std::log(s) - logits[t * V + d.window(w)[t + 1]];
    }
  }
  ref /= 2.0 * (T - 1);
  EXPECT_NEAR(mean_nll(run, d, ecs, 1, 3), ref, 1e-5 * std::fabs(ref));
  std::vector<std::optional<ECParams>> none(ecs.size());
  EXPECT_NE(mean_nll(run, d, none, 1, 3), mean_nll(run, d, ecs, 1, 3));
}

TEST(Compensate, E2ETrainingLowersItsObjective) {
  Network n = random_network(9);
  const ModelConfig& c = n.cfg;
  std::mt19937_64 g(10);
  std::vector<std::optional<ECParams>> ecs(c.num_layers * kNumModules);
  for (Module m : kAllModules) {
    ECParams p = random_ec(n.module_in(m), n.module_out(m), 2, true, g);
    for (float& v : p.B) v *= 0.01f;  // start close to the plain quantized model
    std::fill(p.G.begin(), p.G.end(), 0.0f);
    std::fill(p.c.begin(), p.c.end(), 0.0f);
    ecs[static_cast<int>(m)] = p;
  }
  CalibData d = random_data(c, 4, 16, 11);
  Runner run(n);
  const TeacherTargets targets(run, d, TargetOptions{TargetMode::Dense});
  const double before = mean_kl(run, d, targets, ecs, 4);
  TrainOptions o;
  o.epochs = 30;
  o.batch = 2;
  o.lr = 0.05;
  o.verbose = false;
  train_e2e(run, d, targets, ecs, o);
  const double after = mean_kl(run, d, targets, ecs, 4);
  EXPECT_LT(after, 0.8 * before) << before << " -> " << after;
}

TEST(Compensate, BlockTrainingLowersItsObjective) {
  Network n = random_network(12);
  const ModelConfig& c = n.cfg;
  std::mt19937_64 g(13);
  std::vector<std::optional<ECParams>> ecs(c.num_layers * kNumModules);
  for (Module m : {Module::O, Module::Down}) {
    ECParams p = random_ec(n.module_in(m), n.module_out(m), 2, true, g);
    for (float& v : p.B) v *= 0.01f;
    ecs[7 + static_cast<int>(m)] = p;
  }
  CalibData d = random_data(c, 4, 16, 14);
  Runner run(n);
  TrainOptions o;
  o.epochs = 1;
  o.verbose = false;
  nlohmann::json first = train_block(run, d, ecs, o);
  o.epochs = 40;
  nlohmann::json more = train_block(run, d, ecs, o);
  EXPECT_LT(more["layers"][1]["relative_mse"].get<double>(),
            first["layers"][1]["relative_mse"].get<double>());
}

TEST(Compensate, ECLayerChecksShapes) {
  std::mt19937_64 g(15);
  ECParams p = random_ec(8, 4, 2, true, g);
  p.A.pop_back();
  EXPECT_THROW(p.check(), Error);
  ECParams q = random_ec(8, 4, 2, true, g);
  QuantScheme s;
  std::vector<float> w = randn(5 * 8, g, 1.0f);
  EXPECT_THROW(ECLinear(std::make_unique<QuantizedLinearLayer>(quantize_rtn(w.data(), 5, 8, s)), q),
               Error);
}

// The spellings are the CLI's flags and the artifacts' metadata: they must round-trip,
// and a wrong one must be an Error that lists the accepted values.
TEST(Compensate, OptionEnumsRoundTripTheirSpellings) {
  for (QuantMethod m : {QuantMethod::Rtn, QuantMethod::Gptq})
    EXPECT_EQ(parse_quant_method(quant_method_name(m)), m);
  for (CalibObjective o : {CalibObjective::Static, CalibObjective::Block, CalibObjective::E2e})
    EXPECT_EQ(parse_calib_objective(calib_objective_name(o)), o);
  for (StaticMode m : {StaticMode::Rrr, StaticMode::Qera})
    EXPECT_EQ(parse_static_mode(static_mode_name(m)), m);
  for (GateKind k : {GateKind::Full, GateKind::Diag, GateKind::None})
    EXPECT_EQ(parse_gate_kind(gate_kind_name(k)), k);
  for (StaticRefit k : {StaticRefit::Site, StaticRefit::Layer})
    EXPECT_EQ(parse_static_refit(static_refit_name(k)), k);
  EXPECT_EQ(quant_method_name(QuantMethod::Gptq), "gptq");
  EXPECT_EQ(calib_objective_name(CalibObjective::E2e), "e2e");
  EXPECT_EQ(static_mode_name(StaticMode::Qera), "qera");
  auto message = [](auto parse, const char* s) {
    try {
      parse(s);
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("(no error)");
  };
  EXPECT_NE(message(parse_quant_method, "RTN").find("rtn, gptq"), std::string::npos);
  EXPECT_NE(message(parse_calib_objective, "").find("static, block, e2e"), std::string::npos);
  EXPECT_NE(message(parse_static_mode, "svd").find("'svd'"), std::string::npos);
  EXPECT_NE(message(parse_gate_kind, "tanh").find("full, diag, none"), std::string::npos);
}

// The static control's defaults follow the objective (calibrate.h): training starts from
// rrr refitted layer by layer, --objective static answers with qera refitted site by site;
// a value given explicitly wins either way.
TEST(Compensate, StaticControlDefaultsFollowTheObjective) {
  CalibrateOptions o;
  for (CalibObjective obj : {CalibObjective::E2e, CalibObjective::Block}) {
    o.objective = obj;
    EXPECT_EQ(o.resolved_static_mode(), StaticMode::Rrr);
    EXPECT_EQ(o.resolved_static_refit(), StaticRefit::Layer);
  }
  o.objective = CalibObjective::Static;
  EXPECT_EQ(o.resolved_static_mode(), StaticMode::Qera);
  EXPECT_EQ(o.resolved_static_refit(), StaticRefit::Site);
  o.static_mode = StaticMode::Rrr;
  o.static_refit = StaticRefit::Layer;
  EXPECT_EQ(o.resolved_static_mode(), StaticMode::Rrr);
  EXPECT_EQ(o.resolved_static_refit(), StaticRefit::Layer);
  o.objective = CalibObjective::E2e;
  o.static_mode = StaticMode::Qera;
  o.static_refit = StaticRefit::Site;
  EXPECT_EQ(o.resolved_static_mode(), StaticMode::Qera);
  EXPECT_EQ(o.resolved_static_refit(), StaticRefit::Site);
}

// --device of calibrate / diagnose: cpu is the Runner itself (no backend object); cuda
// without a usable GPU (or in a build without CUDA) is an error that says so.
TEST(CalibDevice, CpuIsTheRunnerAndCudaWithoutAGpuIsAClearError) {
  EXPECT_FALSE(calib_forward_factory(Device::Cpu));
  std::string why;
  if (device_available(Device::Cuda, &why)) GTEST_SKIP() << "a CUDA device is present here";
  try {
    calib_forward_factory(Device::Cuda);
    ADD_FAILURE() << "--device cuda without a GPU did not throw";
  } catch (const Error& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("--device cuda"), std::string::npos) << m;
  }
}

// The CPU backend of the forward-only algorithms is the Runner overload, bit for bit.
TEST(CalibDevice, CpuForwardIsTheRunner) {
  const Network n = random_network(77);
  Runner run(n);
  const CpuForward fwd(run);
  CalibData data;
  data.windows = 2;
  data.ctx = 8;
  std::mt19937_64 g(5);
  for (int64_t i = 0; i < data.windows * data.ctx; ++i)
    data.tokens.push_back(static_cast<int32_t>(g() % static_cast<uint64_t>(n.cfg.vocab_size)));
  const TeacherTargets targets(run, data, TargetOptions{});
  const std::vector<std::optional<ECParams>> none(n.cfg.num_layers * kNumModules);
  const double a = mean_kl(run, data, targets, none, 2);
  EXPECT_EQ(mean_kl(fwd, data, targets, none, 2), a);
  EXPECT_GT(a, 0.0);
  // The Runner-only forward it replaced: Runner::forward + the window's KL.
  std::vector<float> logits(data.ctx * n.cfg.vocab_size);
  double ref = 0;
  for (int64_t w = 0; w < 2; ++w) {
    run.forward(data.window(w), 1, data.ctx, true, &none, logits.data());
    ref += targets.window(w).kl(logits.data(), 0.0f, nullptr);
  }
  EXPECT_EQ(a, ref / static_cast<double>(2 * data.ctx));
}

// restoration_gains through ForwardBackend gives, bit for bit, what the Runner-only code
// before it did (kept here as the reference).
TEST(CalibDevice, RestorationGainsThroughTheBackendAreTheRunnerOnes) {
  const Network n = random_network(78);
  Runner run(n);
  const int64_t L = n.cfg.num_layers, D = n.cfg.hidden_size, V = n.cfg.vocab_size, T = 8, P = 2;
  CalibData data;
  data.windows = 3;
  data.ctx = T;
  std::mt19937_64 g(6);
  for (int64_t i = 0; i < data.windows * T; ++i)
    data.tokens.push_back(static_cast<int32_t>(g() % static_cast<uint64_t>(V)));
  for (TargetMode mode : {TargetMode::Recompute, TargetMode::Dense}) {
    TargetOptions to;
    to.mode = mode;
    const TeacherTargets targets(run, data, to);
    double base = 0;
    const std::vector<double> gain = restoration_gains(run, data, targets, P, &base);
    // The reference: the loop of before, on Runner directly.
    std::vector<std::vector<float>> in(L);
    std::vector<float> x(P * T * D);
    run.embed(data.tokens.data(), P * T, x.data());
    for (int64_t l = 0; l < L; ++l) {
      in[l] = x;
      for (int64_t w = 0; w < P; ++w) run.layer_forward(q_view(n, l, nullptr), l, &x[w * T * D], 1, T, nullptr);
    }
    std::vector<double> kl_sum(1 + L * kNumModules, 0.0);
    std::vector<float> xw, logits(T * V);
    for (int64_t w = 0; w < P; ++w) {
      const TargetWindow tw = targets.window(w);
      auto kl_from = [&](int64_t l0, const LayerView* first) {
        xw.assign(in[l0].begin() + w * T * D, in[l0].begin() + (w + 1) * T * D);
        for (int64_t l = l0; l < L; ++l)
          run.layer_forward(l == l0 && first ? *first : q_view(n, l, nullptr), l, xw.data(), 1, T, nullptr);
        run.head_forward(xw.data(), T, logits.data(), nullptr);
        return tw.kl(logits.data(), 0.0f, nullptr);
      };
      kl_sum[0] += kl_from(0, nullptr);
      for (int64_t l = 0; l < L; ++l)
        for (Module m : kAllModules) {
          LayerView lv = q_view(n, l, nullptr);
          lv.W[m] = n.fp[l].W[m].data();
          kl_sum[1 + module_index(l, m)] += kl_from(l, &lv);
        }
    }
    const double nrows = static_cast<double>(P * T);
    EXPECT_EQ(base, kl_sum[0] / nrows);
    ASSERT_EQ(gain.size(), static_cast<size_t>(L * kNumModules));
    for (int64_t i = 0; i < L * kNumModules; ++i)
      EXPECT_EQ(gain[i], std::max(0.0, kl_sum[0] / nrows - kl_sum[1 + i] / nrows)) << i;
  }
}

}  // namespace
}  // namespace spear
