#include "compensate/ec_train.h"

#include <chrono>
#include <cmath>
#include <cstdio>
#include <memory>
#include <string>

#include "core/error.h"

namespace spear {

namespace {
double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}
// Cosine decay from 1 to 0.1 over the run: large early steps, a quiet end.
double schedule(int64_t step, int64_t total) {
  if (total <= 1) return 1.0;
  const double p = static_cast<double>(step) / static_cast<double>(total - 1);
  return 0.1 + 0.9 * 0.5 * (1.0 + std::cos(M_PI * p));
}
}  // namespace

std::string_view gate_kind_name(GateKind g) {
  switch (g) {
    case GateKind::Full: return "full";
    case GateKind::Diag: return "diag";
    case GateKind::None: return "none";
  }
  throw Error("invalid GateKind " + std::to_string(static_cast<int>(g)));
}

GateKind parse_gate_kind(std::string_view s) {
  for (GateKind g : {GateKind::Full, GateKind::Diag, GateKind::None})
    if (s == gate_kind_name(g)) return g;
  throw Error("unknown gate '" + std::string(s) + "' (accepted: full, diag, none)");
}

void restrict_gate_grads(std::vector<ECGrad>& grads, GateKind gate) {
  if (gate != GateKind::Diag) return;
  for (ECGrad& g : grads) {
    const int64_t r2 = static_cast<int64_t>(g.G.size());
    const int64_t r = static_cast<int64_t>(g.c.size());
    if (!r2) continue;
    SPEAR_CHECK(r * r == r2, "restrict_gate_grads: G is not r x r");
    for (int64_t i = 0; i < r; ++i)
      for (int64_t j = 0; j < r; ++j)
        if (i != j) g.G[i * r + j] = 0.0f;
  }
}

ECAdam::ECAdam(const std::vector<std::optional<ECParams>>& ecs, double lr_rel, double lr_gate) {
  slots_.resize(ecs.size());
  auto rms = [](const std::vector<float>& v) {
    double s = 0;
    for (float f : v) s += static_cast<double>(f) * f;
    return v.empty() ? 0.0 : std::sqrt(s / static_cast<double>(v.size()));
  };
  for (size_t i = 0; i < ecs.size(); ++i) {
    if (!ecs[i]) continue;
    const ECParams& p = *ecs[i];
    const std::vector<float>* t[4] = {&p.A, &p.B, &p.G, &p.c};
    slots_[i].resize(4);
    for (int k = 0; k < 4; ++k) {
      slots_[i][k].m.assign(t[k]->size(), 0.0f);
      slots_[i][k].v.assign(t[k]->size(), 0.0f);
      // A zero-initialised factor (rank beyond the signal) gets a small absolute step.
      slots_[i][k].lr = k < 2 ? lr_rel * std::max(rms(*t[k]), 1e-4) : lr_gate;
    }
  }
}

void ECAdam::step(std::vector<std::optional<ECParams>>& ecs, const std::vector<ECGrad>& grads,
                  double lr_scale) {
  ++t_;
  const double b1 = 0.9, b2 = 0.999, eps = 1e-12;
  const double c1 = 1.0 - std::pow(b1, static_cast<double>(t_));
  const double c2 = 1.0 - std::pow(b2, static_cast<double>(t_));
  for (size_t i = 0; i < ecs.size(); ++i) {
    if (!ecs[i]) continue;
    ECParams& p = *ecs[i];
    std::vector<float>* t[4] = {&p.A, &p.B, &p.G, &p.c};
    const std::vector<float>* g[4] = {&grads[i].A, &grads[i].B, &grads[i].G, &grads[i].c};
    for (int k = 0; k < 4; ++k) {
      Slot& s = slots_[i][k];
      const double lr = s.lr * lr_scale;
      for (size_t j = 0; j < t[k]->size(); ++j) {
        const double gj = (*g[k])[j];
        s.m[j] = static_cast<float>(b1 * s.m[j] + (1 - b1) * gj);
        s.v[j] = static_cast<float>(b2 * s.v[j] + (1 - b2) * gj * gj);
        const double mh = s.m[j] / c1, vh = s.v[j] / c2;
        (*t[k])[j] -= static_cast<float>(lr * mh / (std::sqrt(vh) + eps));
      }
    }
  }
}

double mean_kl(const ForwardBackend& fwd, const CalibData& data, const TeacherTargets& targets,
               const std::vector<std::optional<ECParams>>& ecs, int64_t windows) {
  const Network& net = fwd.net();
  const int64_t T = data.ctx;
  SPEAR_CHECK(targets.windows() == data.windows, "mean_kl: the targets are of other windows");
  windows = std::min(windows, data.windows);
  double kl = 0;
  for (int64_t w = 0; w < windows; ++w) {
    std::unique_ptr<ForwardBackend::Acts> x = fwd.embed(data.window(w), T);  // (T, dim)
    for (int64_t l = 0; l < net.cfg.num_layers; ++l) fwd.layer_forward(q_view(net, l, &ecs), l, *x, 0, 1, T);
    kl += fwd.window_kl(*x, 0, T, *fwd.window_targets(data, targets, w));
  }
  return kl / static_cast<double>(windows * T);
}

double mean_kl(const Runner& run, const CalibData& data, const TeacherTargets& targets,
               const std::vector<std::optional<ECParams>>& ecs, int64_t windows) {
  return mean_kl(CpuForward(run), data, targets, ecs, windows);
}

double mean_nll(const ForwardBackend& fwd, const CalibData& data,
                const std::vector<std::optional<ECParams>>& ecs, int64_t w0, int64_t w1) {
  const Network& net = fwd.net();
  const int64_t T = data.ctx;
  w1 = std::min(w1, data.windows);
  SPEAR_CHECK(w0 >= 0 && w1 > w0 && T > 1, "mean_nll: empty window range");
  double nll = 0;
  for (int64_t w = w0; w < w1; ++w) {
    std::unique_ptr<ForwardBackend::Acts> x = fwd.embed(data.window(w), T);  // (T, dim)
    for (int64_t l = 0; l < net.cfg.num_layers; ++l) fwd.layer_forward(q_view(net, l, &ecs), l, *x, 0, 1, T);
    nll += fwd.window_nll(*x, 0, T, data.window(w));
  }
  return nll / static_cast<double>((w1 - w0) * (T - 1));
}

double mean_nll(const Runner& run, const CalibData& data,
                const std::vector<std::optional<ECParams>>& ecs, int64_t w0, int64_t w1) {
  return mean_nll(CpuForward(run), data, ecs, w0, w1);
}

nlohmann::json train_e2e(GradBackend& grad, const CalibData& data, const TeacherTargets& targets,
                         std::vector<std::optional<ECParams>>& ecs, const TrainOptions& opt) {
  SPEAR_CHECK(targets.windows() == data.windows, "train_e2e: the targets are of other windows");
  const auto t0 = std::chrono::steady_clock::now();
  const int64_t T = data.ctx, nw = data.windows;
  const int64_t batch = std::max<int64_t>(1, std::min(opt.batch, nw));
  const int64_t steps_per_epoch = (nw + batch - 1) / batch, total = steps_per_epoch * opt.epochs;
  const std::string device(grad.device());
  ECAdam adam(ecs, opt.lr, opt.lr_gate);
  std::vector<ECGrad> grads(ecs.size());
  nlohmann::json log = nlohmann::json::array();
  int64_t step = 0;
  for (int64_t ep = 0; ep < opt.epochs; ++ep) {
    double ep_kl = 0;
    for (int64_t s = 0; s < steps_per_epoch; ++s, ++step) {
      const int64_t w0 = s * batch, w1 = std::min(nw, w0 + batch);
      const float scale = 1.0f / static_cast<float>((w1 - w0) * T);
      grad.begin_step(ecs);
      grad.add_windows(data, targets, w0, w1, scale, &ep_kl);
      grad.end_step(grads);
      restrict_gate_grads(grads, opt.gate);
      adam.step(ecs, grads, schedule(step, total));
    }
    const double kl = ep_kl / static_cast<double>(nw * T);
    log.push_back({{"epoch", ep + 1}, {"train_kl", kl}, {"seconds", seconds_since(t0)}});
    if (opt.verbose)
      std::fprintf(stderr, "spear e2e%s: epoch %lld/%lld  mean KL on calibration windows %.5f  (%.0f s)\n",
                   device == "cpu" ? "" : (" [" + device + "]").c_str(), (long long)ep + 1,
                   (long long)opt.epochs, kl, seconds_since(t0));
  }
  return {{"objective", "e2e"}, {"device", device}, {"epochs", log}, {"steps", total},
          {"seconds", seconds_since(t0)}};
}

nlohmann::json train_e2e(const Runner& run, const CalibData& data, const TeacherTargets& targets,
                         std::vector<std::optional<ECParams>>& ecs, const TrainOptions& opt) {
  CpuGrad grad(run);
  return train_e2e(grad, data, targets, ecs, opt);
}

nlohmann::json train_block(const Runner& run, const CalibData& data,
                           std::vector<std::optional<ECParams>>& ecs, const TrainOptions& opt) {
  const auto t0 = std::chrono::steady_clock::now();
  const Network& net = run.net();
  const int64_t L = net.cfg.num_layers, D = net.cfg.hidden_size, T = data.ctx, nw = data.windows;
  const int64_t batch = std::max<int64_t>(1, std::min(opt.batch, nw));
  std::vector<float> xf(nw * T * D), xq(nw * T * D);  // (windows*T, dim) both residual streams
  run.embed(data.tokens.data(), nw * T, xf.data());
  xq = xf;
  nlohmann::json log = nlohmann::json::array();
  LayerCache cache;
  std::vector<float> y(T * D), dy(T * D);  // (T, dim)
  for (int64_t l = 0; l < L; ++l) {
    // Target: the full-precision layer output on the full-precision input.
    std::vector<float> target = xf;
    for (int64_t w = 0; w < nw; ++w)
      run.layer_forward(fp_view(net, l), l, &target[w * T * D], 1, T, nullptr);
    bool any = false;
    for (Module m : kAllModules) any = any || ecs[module_index(l, m)].has_value();
    double last = 0;
    if (any) {
      std::vector<std::optional<ECParams>> sub(ecs.size());  // only this layer's ECs train
      for (Module m : kAllModules) sub[module_index(l, m)] = ecs[module_index(l, m)];
      ECAdam adam(sub, opt.lr, opt.lr_gate);
      std::vector<ECGrad> grads(ecs.size());
      const int64_t spe = (nw + batch - 1) / batch, total = spe * opt.epochs;
      int64_t step = 0;
      for (int64_t ep = 0; ep < opt.epochs; ++ep) {
        double loss = 0;
        for (int64_t s = 0; s < spe; ++s, ++step) {
          for (Module m : kAllModules)
            if (sub[module_index(l, m)]) grads[module_index(l, m)].zero_like(*sub[module_index(l, m)]);
          const int64_t w0 = s * batch, w1 = std::min(nw, w0 + batch);
          for (int64_t w = w0; w < w1; ++w) {
            std::copy_n(&xq[w * T * D], T * D, y.data());
            run.layer_forward(q_view(net, l, &sub), l, y.data(), 1, T, &cache);
            const float* tg = &target[w * T * D];
            double norm = 0;
            for (int64_t i = 0; i < T * D; ++i) norm += static_cast<double>(tg[i]) * tg[i];
            const float sc = static_cast<float>(1.0 / (norm * static_cast<double>(w1 - w0)));
            for (int64_t i = 0; i < T * D; ++i) {
              const float e = y[i] - tg[i];
              loss += static_cast<double>(e) * e / norm;
              dy[i] = 2.0f * e * sc;
            }
            PerModule<ECGrad*> g;
            for (Module m : kAllModules)
              if (sub[module_index(l, m)]) g[m] = &grads[module_index(l, m)];
            run.layer_backward(q_view(net, l, &sub), l, cache, dy.data(), 1, T, g);
          }
          restrict_gate_grads(grads, opt.gate);
          adam.step(sub, grads, schedule(step, total));
        }
        last = loss / static_cast<double>(nw);
      }
      for (Module m : kAllModules) ecs[module_index(l, m)] = sub[module_index(l, m)];
    }
    // Advance both streams: the quantized one through the trained layer.
    for (int64_t w = 0; w < nw; ++w)
      run.layer_forward(q_view(net, l, &ecs), l, &xq[w * T * D], 1, T, nullptr);
    xf = std::move(target);
    log.push_back({{"layer", l}, {"relative_mse", last}, {"seconds", seconds_since(t0)}});
    if (opt.verbose && any)
      std::fprintf(stderr, "spear block: layer %lld/%lld  relative output MSE %.6f  (%.0f s)\n",
                   (long long)l + 1, (long long)L, last, seconds_since(t0));
  }
  return {{"objective", "block"}, {"layers", log}, {"seconds", seconds_since(t0)}};
}

}  // namespace spear
