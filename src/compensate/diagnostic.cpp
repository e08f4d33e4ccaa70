#include "compensate/diagnostic.h"

#include "compensate/forward_backend.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <numeric>

#include <cblas.h>

#include "compensate/ec_train.h"
#include "compensate/network.h"
#include "core/error.h"
#include "model/hf_quantized.h"

namespace spear {

namespace {

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// Weighted linear CKA of X, Y (N, p) and (N, q) given weights w (N) with Σw > 0.
double weighted_cka(const float* X, const float* Y, int64_t N, int64_t p, int64_t q,
                    const std::vector<double>& w) {
  double ws = 0;
  for (double v : w) ws += v;
  std::vector<float> Xc(N * p), Yc(N * q);  // √w-scaled, weighted-centred copies
  auto centre = [&](const float* A, int64_t n, std::vector<float>& out) {
    std::vector<double> mu(n, 0.0);
    for (int64_t t = 0; t < N; ++t)
      for (int64_t i = 0; i < n; ++i) mu[i] += w[t] * A[t * n + i];
    for (double& m : mu) m /= ws;
    for (int64_t t = 0; t < N; ++t) {
      const double s = std::sqrt(w[t] / ws);
      for (int64_t i = 0; i < n; ++i) out[t * n + i] = static_cast<float>((A[t * n + i] - mu[i]) * s);
    }
  };
  centre(X, p, Xc);
  centre(Y, q, Yc);
  auto gram_norm2 = [&](const std::vector<float>& A, int64_t a, const std::vector<float>& B,
                        int64_t b) {
    std::vector<float> G(a * b);  // (a, b) = Aᵀ B
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, a, b, N, 1.0f, A.data(), a, B.data(), b,
                0.0f, G.data(), b);
    double s = 0;
    for (float v : G) s += static_cast<double>(v) * v;
    return s;
  };
  const double xy = gram_norm2(Xc, p, Yc, q), xx = gram_norm2(Xc, p, Xc, p),
               yy = gram_norm2(Yc, q, Yc, q);
  return (xx > 0 && yy > 0) ? xy / std::sqrt(xx * yy) : 0.0;
}

double quantile(std::vector<float> v, double q) {
  if (v.empty()) return 0;
  const size_t k = std::min(v.size() - 1, static_cast<size_t>(q * static_cast<double>(v.size() - 1) + 0.5));
  std::nth_element(v.begin(), v.begin() + k, v.end());
  return v[k];
}

}  // namespace

double spearman(const std::vector<double>& a, const std::vector<double>& b) {
  SPEAR_CHECK(a.size() == b.size() && a.size() > 1, "spearman: need two equal-length series");
  auto ranks = [](const std::vector<double>& v) {
    std::vector<size_t> idx(v.size());
    std::iota(idx.begin(), idx.end(), 0);
    std::sort(idx.begin(), idx.end(), [&](size_t i, size_t j) { return v[i] < v[j]; });
    std::vector<double> r(v.size());
    for (size_t i = 0; i < idx.size();) {
      size_t j = i;
      while (j + 1 < idx.size() && v[idx[j + 1]] == v[idx[i]]) ++j;
      for (size_t k = i; k <= j; ++k) r[idx[k]] = 0.5 * static_cast<double>(i + j);
      i = j + 1;
    }
    return r;
  };
  std::vector<double> ra = ranks(a), rb = ranks(b);
  const double n = static_cast<double>(a.size());
  double ma = std::accumulate(ra.begin(), ra.end(), 0.0) / n, mb = std::accumulate(rb.begin(), rb.end(), 0.0) / n;
  double sab = 0, saa = 0, sbb = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    sab += (ra[i] - ma) * (rb[i] - mb);
    saa += (ra[i] - ma) * (ra[i] - ma);
    sbb += (rb[i] - mb) * (rb[i] - mb);
  }
  return (saa > 0 && sbb > 0) ? sab / std::sqrt(saa * sbb) : 0.0;
}

std::vector<double> restoration_gains(const ForwardBackend& fwd, const CalibData& data,
                                      const TeacherTargets& targets, int64_t windows,
                                      double* base_kl) {
  using Acts = ForwardBackend::Acts;
  const Network& net = fwd.net();
  const int64_t L = net.cfg.num_layers, T = data.ctx;
  const int64_t P = std::max<int64_t>(1, std::min(windows, data.windows));
  SPEAR_CHECK(targets.windows() == data.windows, "restoration_gains: the targets are of other windows");
  // The quantized stream at every layer's input, so that restoring a module in layer l
  // only re-runs layers l..L-1.
  std::vector<std::unique_ptr<Acts>> in(L);  // (P*T, dim) per layer
  std::unique_ptr<Acts> x = fwd.embed(data.tokens.data(), P * T);
  for (int64_t l = 0; l < L; ++l) {
    in[l] = fwd.copy_rows(*x, 0, P * T);
    for (int64_t w = 0; w < P; ++w) fwd.layer_forward(q_view(net, l, nullptr), l, *x, w * T, 1, T);
  }
  x.reset();
  // Σ over windows of the KL: [0] the quantized model, [1 + i] module i restored. Windows
  // are the outer loop (each window's targets are fetched once); every sum still adds its
  // windows in order, so the values do not depend on the loop order.
  std::vector<double> kl_sum(1 + L * kNumModules, 0.0);
  for (int64_t w = 0; w < P; ++w) {
    const std::unique_ptr<ForwardBackend::WindowTargets> tw = fwd.window_targets(data, targets, w);
    auto kl_from = [&](int64_t l0, const LayerView* first) {
      std::unique_ptr<Acts> xw = fwd.copy_rows(*in[l0], w * T, T);  // (T, dim)
      for (int64_t l = l0; l < L; ++l)
        fwd.layer_forward(l == l0 && first ? *first : q_view(net, l, nullptr), l, *xw, 0, 1, T);
      return fwd.window_kl(*xw, 0, T, *tw);
    };
    kl_sum[0] += kl_from(0, nullptr);
    for (int64_t l = 0; l < L; ++l)
      for (Module m : kAllModules) {
        LayerView lv = q_view(net, l, nullptr);
        lv.W[m] = net.fp[l].W[m].data();
        kl_sum[1 + module_index(l, m)] += kl_from(l, &lv);
      }
  }
  const double n = static_cast<double>(P * T);
  const double base = kl_sum[0] / n;
  if (base_kl) *base_kl = base;
  std::vector<double> gain(L * kNumModules, 0.0);
  for (int64_t i = 0; i < L * kNumModules; ++i) gain[i] = std::max(0.0, base - kl_sum[1 + i] / n);
  return gain;
}

std::vector<double> restoration_gains(const Runner& run, const CalibData& data,
                                      const TeacherTargets& targets, int64_t windows,
                                      double* base_kl) {
  return restoration_gains(CpuForward(run), data, targets, windows, base_kl);
}

Diagnosis diagnose(const std::string& dir, const SpearArtifact& quantized, const CalibData& data,
                   const DiagnoseOptions& opt) {
  const auto t0 = std::chrono::steady_clock::now();
  check_base_matches_model(quantized, dir, "diagnose");
  Network net = Network::load_fp(dir);
  net.set_quantized(quantized.weights);
  Runner run(net);
  // The forward-only measurements (the quantized model's KL, the restoration gains) run on
  // opt.forward's backend where one is given (--device cuda), else on the CPU.
  std::unique_ptr<ForwardBackend> gpu = opt.forward ? opt.forward(net) : nullptr;
  const CpuForward cpu_fwd(run);
  const ForwardBackend& fwd = gpu ? *gpu : static_cast<const ForwardBackend&>(cpu_fwd);
  const ModelConfig& c = net.cfg;
  const int64_t L = c.num_layers, D = c.hidden_size, T = data.ctx, nw = data.windows, N = nw * T;
  Diagnosis d;
  d.tokens = N;
  // The entropy weighting is computed from the full distributions whatever the mode.
  std::vector<double> entropy;  // (N)
  const TeacherTargets targets(run, data, opt.targets, &entropy);
  for (double& h : entropy) h = std::max(h, 1e-6);
  d.targets = targets.describe();
  {
    std::vector<std::optional<ECParams>> none(L * kNumModules);
    if (opt.targets.mode == TargetMode::TopK) {
      // The reported KL is exact: against the recomputed full distributions.
      const TeacherTargets exact(run, data, {TargetMode::Recompute});
      d.kl_w4 = mean_kl(fwd, data, exact, none, nw);
    } else {
      d.kl_w4 = mean_kl(fwd, data, targets, none, nw);
    }
  }
  if (opt.verbose) std::fprintf(stderr, "diagnose: targets and KL of the quantized model (%.0f s)\n", seconds_since(t0));
  std::vector<float> xf(N * D), xq;  // (N, dim) both residual streams
  run.embed(data.tokens.data(), N, xf.data());
  xq = xf;
  d.modules.resize(L * kNumModules);
  for (int64_t l = 0; l < L; ++l) {
    std::vector<float> sf[kNumSites], sq[kNumSites];  // (N, width) site inputs, all tokens
    auto tap_into = [&](std::vector<float>* dst) {
      return SiteTap([dst](Site s, const float* x, int64_t rows, int64_t cols) {
        dst[static_cast<int>(s)].insert(dst[static_cast<int>(s)].end(), x, x + rows * cols);
      });
    };
    for (int64_t w = 0; w < nw; ++w) {
      run.layer_forward(fp_view(net, l), l, &xf[w * T * D], 1, T, nullptr, tap_into(sf));
      run.layer_forward(q_view(net, l, nullptr), l, &xq[w * T * D], 1, T, nullptr, tap_into(sq));
    }
    for (Module m : kAllModules) {
      const int s = static_cast<int>(module_site(m));
      const int64_t in = net.module_in(m), out = net.module_out(m);
      std::vector<float> yf(N * out), yq(N * out);  // (N, out)
      matmul_nt(sf[s].data(), net.fp[l].W[m].data(), yf.data(), N, in, out);
      matmul_nt(sq[s].data(), net.q[l].W[m].data(), yq.data(), N, in, out);
      ModuleDiagnosis& md = d.modules[module_index(l, m)];
      md.layer = l;
      md.module = m;
      double ref = 0;
      std::vector<double> err(N);
      for (int64_t t = 0; t < N; ++t) {
        double e = 0, r = 0;
        for (int64_t o = 0; o < out; ++o) {
          const double a = yf[t * out + o], b = yq[t * out + o];
          e += (a - b) * (a - b);
          r += a * a;
        }
        err[t] = e;
        ref += r;
      }
      ref /= static_cast<double>(N);
      md.token_err.resize(N);
      double mean = 0, sq2 = 0;
      for (int64_t t = 0; t < N; ++t) {
        md.token_err[t] = static_cast<float>(err[t] / std::max(ref, 1e-30));
        mean += md.token_err[t];
        sq2 += static_cast<double>(md.token_err[t]) * md.token_err[t];
      }
      mean /= static_cast<double>(N);
      md.err_mean = mean;
      md.err_cv = mean > 0 ? std::sqrt(std::max(0.0, sq2 / N - mean * mean)) / mean : 0;
      md.err_p50 = quantile(md.token_err, 0.5);
      md.err_p90 = quantile(md.token_err, 0.9);
      md.err_p99 = quantile(md.token_err, 0.99);
      md.err_max = *std::max_element(md.token_err.begin(), md.token_err.end());
      const std::vector<double> ones(N, 1.0);
      std::vector<double> errw(N);
      for (int64_t t = 0; t < N; ++t) errw[t] = err[t] + 1e-30;
      const std::vector<double>* ws[3] = {&ones, &entropy, &errw};
      for (int k = 0; k < 3; ++k)
        md.damage[k] = 1.0 - weighted_cka(yf.data(), yq.data(), N, out, out, *ws[k]);
    }
    if (opt.verbose) std::fprintf(stderr, "diagnose: layer %lld/%lld (%.0f s)\n", (long long)l + 1, (long long)L, seconds_since(t0));
  }
  if (opt.validate) {
    std::vector<double> gain = restoration_gains(fwd, data, targets, opt.probe_windows, nullptr);
    for (size_t i = 0; i < gain.size(); ++i) d.modules[i].restore_gain = gain[i];
    double best = -2;
    for (int k = 0; k < 3; ++k) {
      std::vector<double> dmg(gain.size());
      for (size_t i = 0; i < gain.size(); ++i) dmg[i] = d.modules[i].damage[k];
      d.spearman[k] = spearman(dmg, gain);
      if (d.spearman[k] > best) {
        best = d.spearman[k];
        d.best_weighting = kWeightings[k];
      }
    }
    if (opt.verbose) std::fprintf(stderr, "diagnose: restoration gains (%.0f s)\n", seconds_since(t0));
  }
  d.seconds = seconds_since(t0);
  return d;
}

namespace {
// White → orange → dark red, t in [0, 1].
std::string heat_colour(double t) {
  t = std::clamp(t, 0.0, 1.0);
  const int r = static_cast<int>(255 - 75 * t), g = static_cast<int>(250 - 230 * t),
            b = static_cast<int>(240 - 220 * t);
  char buf[16];
  std::snprintf(buf, sizeof buf, "#%02x%02x%02x", r, g, b);
  return buf;
}
}  // namespace

std::string heatmap_svg(const Diagnosis& d, int weighting, int64_t L) {
  const int cw = 90, ch = 26, left = 70, top = 50;
  const int W = left + kNumModules * cw + 20, H = top + static_cast<int>(L) * ch + 50;
  double mx = 0;
  for (const ModuleDiagnosis& m : d.modules) mx = std::max(mx, m.damage[weighting]);
  std::string s;
  char buf[512];
  std::snprintf(buf, sizeof buf,
                "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%d\" height=\"%d\" "
                "font-family=\"sans-serif\" font-size=\"11\">\n<rect width=\"100%%\" height=\"100%%\" fill=\"white\"/>\n"
                "<text x=\"%d\" y=\"20\" font-size=\"14\">Quantization damage (1 - CKA, %s-weighted) per layer and module</text>\n",
                W, H, left, kWeightings[weighting]);
  s += buf;
  for (Module mod : kAllModules) {
    const int m = static_cast<int>(mod);  // the column
    std::string name(module_name(mod));
    name = name.substr(name.find('.') + 1);
    std::snprintf(buf, sizeof buf, "<text x=\"%d\" y=\"%d\" text-anchor=\"middle\">%s</text>\n",
                  left + m * cw + cw / 2, top - 8, name.c_str());
    s += buf;
  }
  for (int64_t l = 0; l < L; ++l) {
    std::snprintf(buf, sizeof buf, "<text x=\"%d\" y=\"%d\" text-anchor=\"end\">layer %lld</text>\n",
                  left - 6, top + static_cast<int>(l) * ch + ch / 2 + 4, (long long)l);
    s += buf;
    for (Module mod : kAllModules) {
      const int m = static_cast<int>(mod);  // the column
      const double v = d.modules[module_index(l, mod)].damage[weighting];
      std::snprintf(buf, sizeof buf,
                    "<rect x=\"%d\" y=\"%d\" width=\"%d\" height=\"%d\" fill=\"%s\" stroke=\"#888\"/>"
                    "<text x=\"%d\" y=\"%d\" text-anchor=\"middle\">%.4f</text>\n",
                    left + m * cw, top + static_cast<int>(l) * ch, cw, ch,
                    heat_colour(mx > 0 ? v / mx : 0).c_str(), left + m * cw + cw / 2,
                    top + static_cast<int>(l) * ch + ch / 2 + 4, v);
      s += buf;
    }
  }
  std::snprintf(buf, sizeof buf, "<text x=\"%d\" y=\"%d\">darkest = %.4f; %lld calibration tokens</text>\n</svg>\n",
                left, top + static_cast<int>(L) * ch + 25, mx, (long long)d.tokens);
  s += buf;
  return s;
}

std::string histogram_svg(const Diagnosis& d, const std::vector<size_t>& which) {
  const int bins = 40, left = 60, top = 40, pw = 600, ph = 260;
  const double lo = -6, hi = 2;  // log10 of the relative per-token error
  static const char* colours[] = {"#c0392b", "#2471a3", "#229954", "#7d3c98", "#d68910"};
  std::vector<std::vector<double>> h(which.size(), std::vector<double>(bins, 0.0));
  double mx = 0;
  for (size_t k = 0; k < which.size(); ++k) {
    const auto& e = d.modules[which[k]].token_err;
    for (float v : e) {
      const double lv = std::log10(std::max(static_cast<double>(v), 1e-12));
      const int b = std::clamp(static_cast<int>((lv - lo) / (hi - lo) * bins), 0, bins - 1);
      h[k][b] += 1.0 / static_cast<double>(e.size());
    }
    for (double v : h[k]) mx = std::max(mx, v);
  }
  std::string s;
  char buf[512];
  std::snprintf(buf, sizeof buf,
                "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%d\" height=\"%d\" "
                "font-family=\"sans-serif\" font-size=\"11\">\n<rect width=\"100%%\" height=\"100%%\" fill=\"white\"/>\n"
                "<text x=\"%d\" y=\"20\" font-size=\"14\">Per-token relative output error |y_fp - y_q|^2 / mean |y_fp|^2</text>\n"
                "<line x1=\"%d\" y1=\"%d\" x2=\"%d\" y2=\"%d\" stroke=\"black\"/>\n",
                left + pw + 220, top + ph + 60, left, left, top + ph, left + pw, top + ph);
  s += buf;
  for (int t = static_cast<int>(lo); t <= static_cast<int>(hi); ++t) {
    const int x = left + static_cast<int>((t - lo) / (hi - lo) * pw);
    std::snprintf(buf, sizeof buf, "<text x=\"%d\" y=\"%d\" text-anchor=\"middle\">1e%d</text>\n", x,
                  top + ph + 16, t);
    s += buf;
  }
  std::snprintf(buf, sizeof buf, "<text x=\"%d\" y=\"%d\" text-anchor=\"middle\">relative error (log scale); y: share of tokens</text>\n",
                left + pw / 2, top + ph + 36);
  s += buf;
  for (size_t k = 0; k < which.size(); ++k) {
    std::string pts;
    for (int b = 0; b < bins; ++b) {
      const double x0 = left + static_cast<double>(b) / bins * pw, x1 = left + static_cast<double>(b + 1) / bins * pw;
      const double y = top + ph - (mx > 0 ? h[k][b] / mx : 0) * ph;
      std::snprintf(buf, sizeof buf, "%.1f,%.1f %.1f,%.1f ", x0, y, x1, y);
      pts += buf;
    }
    const ModuleDiagnosis& m = d.modules[which[k]];
    std::snprintf(buf, sizeof buf,
                  "<polyline fill=\"none\" stroke=\"%s\" stroke-width=\"1.5\" points=\"%s\"/>\n"
                  "<text x=\"%d\" y=\"%d\" fill=\"%s\">layer %lld %s (cv %.2f)</text>\n",
                  colours[k % 5], pts.c_str(), left + pw + 10, top + 14 + 16 * static_cast<int>(k),
                  colours[k % 5], (long long)m.layer, std::string(module_name(m.module)).c_str(), m.err_cv);
    s += buf;
  }
  s += "</svg>\n";
  return s;
}

nlohmann::json diagnosis_json(const Diagnosis& d) {
  nlohmann::json mods = nlohmann::json::array();
  for (const ModuleDiagnosis& m : d.modules)
    mods.push_back({{"layer", m.layer},
                    {"module", std::string(module_name(m.module))},
                    {"damage_uniform", m.damage[0]},
                    {"damage_entropy", m.damage[1]},
                    {"damage_error", m.damage[2]},
                    {"err_mean", m.err_mean},
                    {"err_cv", m.err_cv},
                    {"err_p50", m.err_p50},
                    {"err_p90", m.err_p90},
                    {"err_p99", m.err_p99},
                    {"err_max", m.err_max},
                    {"restore_gain_kl", m.restore_gain}});
  return {{"modules", mods},
          {"spearman_vs_restore_gain",
           {{"uniform", d.spearman[0]}, {"entropy", d.spearman[1]}, {"error", d.spearman[2]}}},
          {"best_weighting", d.best_weighting},
          {"kl_w4", d.kl_w4},
          {"targets", d.targets},
          {"tokens", d.tokens},
          {"seconds", d.seconds}};
}

}  // namespace spear
