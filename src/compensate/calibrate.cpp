#include "compensate/calibrate.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <functional>
#include <memory>

#include "compensate/diagnostic.h"
#include "compensate/ec_train.h"
#include "compensate/network.h"
#include "compensate/static_control.h"
#include "core/error.h"
#include "model/hf_quantized.h"

namespace spear {

namespace {

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// The modules of `s` with their ranks (rank_of[module], 0: skip), for fit_site.
std::vector<std::pair<Module, int64_t>> site_modules(int s, const std::function<int64_t(Module)>& rank_of) {
  std::vector<std::pair<Module, int64_t>> mods;
  for (Module m : kAllModules)
    if (static_cast<int>(module_site(m)) == s && rank_of(m) > 0) mods.push_back({m, rank_of(m)});
  return mods;
}

}  // namespace

std::string_view calib_objective_name(CalibObjective o) {
  switch (o) {
    case CalibObjective::Static: return "static";
    case CalibObjective::Block: return "block";
    case CalibObjective::E2e: return "e2e";
  }
  throw Error("calibrate: invalid CalibObjective " + std::to_string(static_cast<int>(o)));
}

CalibObjective parse_calib_objective(std::string_view s) {
  for (CalibObjective o : {CalibObjective::Static, CalibObjective::Block, CalibObjective::E2e})
    if (s == calib_objective_name(o)) return o;
  throw Error("unknown calibration objective '" + std::string(s) +
              "' (accepted: static, block, e2e)");
}

std::string_view static_refit_name(StaticRefit r) {
  switch (r) {
    case StaticRefit::Site: return "site";
    case StaticRefit::Layer: return "layer";
  }
  throw Error("calibrate: invalid StaticRefit " + std::to_string(static_cast<int>(r)));
}

StaticMode CalibrateOptions::resolved_static_mode() const {
  return static_mode.value_or(objective == CalibObjective::Static ? StaticMode::Qera : StaticMode::Rrr);
}

StaticRefit CalibrateOptions::resolved_static_refit() const {
  return static_refit.value_or(objective == CalibObjective::Static ? StaticRefit::Site : StaticRefit::Layer);
}

StaticRefit parse_static_refit(std::string_view s) {
  for (StaticRefit r : {StaticRefit::Site, StaticRefit::Layer})
    if (s == static_refit_name(r)) return r;
  throw Error("unknown static refit '" + std::string(s) + "' (accepted: site, layer)");
}

nlohmann::json placement_json(const std::vector<PlacementEntry>& p) {
  nlohmann::json j = nlohmann::json::array();
  for (const PlacementEntry& e : p)
    j.push_back({{"layer", e.layer},
                 {"module", std::string(module_name(e.module))},
                 {"rank", e.rank},
                 {"bytes", e.bytes},
                 {"restore_gain_kl", e.restore_gain},
                 {"captured", e.captured}});
  return j;
}

std::vector<PlacementEntry> placement_from_json(const nlohmann::json& j) {
  std::vector<PlacementEntry> p;
  SPEAR_CHECK(j.is_array(), "placement must be a JSON array");
  for (const auto& e : j) {
    PlacementEntry x;
    x.layer = e.at("layer").get<int64_t>();
    SPEAR_CHECK(parse_module_name(e.at("module").get<std::string>(), &x.module),
                "placement: unknown module " + e.at("module").get<std::string>());
    x.rank = e.at("rank").get<int64_t>();
    x.bytes = e.value("bytes", int64_t{0});
    x.restore_gain = e.value("restore_gain_kl", 0.0);
    x.captured = e.value("captured", 0.0);
    p.push_back(x);
  }
  return p;
}

std::vector<double> restore_gains_from_report(const nlohmann::json& report, int64_t layers) {
  SPEAR_CHECK(report.contains("module_gains") && report["module_gains"].is_array(),
              "calibration report has no module_gains (written by a run that searched its placement)");
  std::vector<double> g(layers * kNumModules, 0.0);
  std::vector<bool> seen(g.size(), false);
  for (const auto& e : report["module_gains"]) {
    Module m;
    SPEAR_CHECK(parse_module_name(e.at("module").get<std::string>(), &m), "module_gains: unknown module");
    const int64_t l = e.at("layer").get<int64_t>();
    SPEAR_CHECK(l >= 0 && l < layers, "module_gains: layer out of range");
    g[module_index(l, m)] = e.at("restore_gain_kl").get<double>();
    seen[module_index(l, m)] = true;
  }
  for (bool b : seen) SPEAR_CHECK(b, "module_gains: not every module of the model is listed");
  return g;
}

CalibrateResult calibrate(const std::string& dir, const SpearArtifact& quantized,
                          const CalibData& data, const CalibrateOptions& opt) {
  const auto t0 = std::chrono::steady_clock::now();
  SPEAR_CHECK(opt.budget > 0 && opt.budget < 1, "calibrate: --budget must be in (0, 1)");
  SPEAR_CHECK(opt.max_rank > 0, "calibrate: --max-rank must be positive");
  SPEAR_CHECK(opt.epochs >= 0 && opt.batch > 0, "calibrate: bad --epochs/--batch");
  SPEAR_CHECK(quantized.ec_count() == 0, "calibrate: the quantized artifact already has ECs; "
                                         "start from the output of `spear quantize`");
  check_base_matches_model(quantized, dir, "calibrate");
  const bool gated = opt.gate != GateKind::None;
  Network net = Network::load_fp(dir);
  net.set_quantized(quantized.weights);
  Runner run(net);
  const ModelConfig& c = net.cfg;
  const int64_t L = c.num_layers, T = data.ctx, nw = data.windows;
  SPEAR_CHECK(T <= c.max_position_embeddings, "calibrate: --calib-ctx exceeds the model's context");
  nlohmann::json rep;
  const int64_t qbytes = quantized.quant_model_bytes();
  const int64_t budget_bytes = static_cast<int64_t>(std::floor(opt.budget * static_cast<double>(qbytes)));
  auto log = [&](const char* fmt, auto... args) {
    if (!opt.verbose) return;
    std::fprintf(stderr, "spear calibrate [%5.0f s]: ", seconds_since(t0));
    std::fprintf(stderr, fmt, args...);
    std::fprintf(stderr, "\n");
  };

  // The backend of the forward-only phases (restoration gains, calibration KLs).
  std::unique_ptr<ForwardBackend> dev = opt.forward ? opt.forward(net) : nullptr;
  const CpuForward cpu_fwd(run);
  const ForwardBackend& fwd = dev ? *dev : static_cast<const ForwardBackend&>(cpu_fwd);
  // The static control's backend (statistics, fits, guard).
  const ForwardBackend& sfwd = dev && opt.static_on_device ? *dev : static_cast<const ForwardBackend&>(cpu_fwd);
  rep["device"] = std::string(fwd.device());
  rep["static_device"] = std::string(sfwd.device());
  if (dev)
    log("device %s: restoration gains, calibration KLs and e2e training (forward and backward; teacher "
        "targets recomputed there with --targets recompute)%s; block training and Adam on the CPU",
        std::string(fwd.device()).c_str(),
        &sfwd == dev.get() ? ", statistics, static fits and the static guard" : "; the static control on the CPU");

  // 1. Targets: the full-precision next-token distributions of every window.
  const TeacherTargets targets(run, data, opt.targets);
  rep["seconds_targets"] = seconds_since(t0);
  rep["targets"] = targets.describe();
  {
    const std::string mode(target_mode_name(opt.targets.mode));
    log("full-precision targets of %lld windows x %lld tokens: %s, %.1f MiB stored", (long long)nw,
        (long long)T, mode.c_str(), static_cast<double>(targets.stored_bytes()) / (1 << 20));
  }
  // The report's KLs are exact: top-K targets are replaced there by recomputed ones.
  std::optional<TeacherTargets> recomputed;
  if (opt.targets.mode == TargetMode::TopK) recomputed.emplace(run, data, TargetOptions{TargetMode::Recompute});
  const TeacherTargets& exact = recomputed ? *recomputed : targets;

  const int64_t P = std::max<int64_t>(1, std::min(opt.probe_windows, nw));
  const int64_t S = std::max<int64_t>(1, std::min(opt.stat_windows, nw));
  CalibrateResult res;
  std::vector<PlacementEntry> placement;
  int64_t ec_bytes = 0;
  if (!opt.init_ecs.empty()) {
    SPEAR_CHECK(static_cast<int64_t>(opt.init_ecs.size()) == L * kNumModules,
                "calibrate: the initial ECs do not match the model");
    res.static_ecs.assign(L * kNumModules, std::nullopt);
    for (int64_t i = 0; i < L * kNumModules; ++i) {
      if (!opt.init_ecs[i]) continue;
      ECParams p = *opt.init_ecs[i];
      SPEAR_CHECK(p.in == net.module_in(static_cast<Module>(i % kNumModules)) &&
                      p.out == net.module_out(static_cast<Module>(i % kNumModules)),
                  "calibrate: an initial EC does not match its module");
      p.gated = false;
      p.G.clear();
      p.c.clear();
      PlacementEntry e;
      e.layer = i / kNumModules;
      e.module = static_cast<Module>(i % kNumModules);
      e.rank = p.rank;
      e.bytes = ECParams::bytes_for(p.in, p.out, p.rank, gated);
      placement.push_back(e);
      ec_bytes += e.bytes;
      res.static_ecs[i] = std::move(p);
    }
    res.placement = placement;
    rep["init_from_ecs"] = true;
    log("starting from %zu given ECs, %lld bytes", placement.size(), (long long)ec_bytes);
  } else {
  // 2. Statistics and static fits of every module (quantized path without ECs).
  std::vector<StaticFit> fits(L * kNumModules);
  {
    const std::unique_ptr<ForwardBackend::Acts> xf = sfwd.embed(data.tokens.data(), S * T),  // (S*T, dim)
        xq = sfwd.copy_rows(*xf, 0, S * T);
    for (int64_t l = 0; l < L; ++l) {
      const auto mo = sfwd.layer_moments(l, *xf, *xq, S, T, nullptr, (1u << kNumSites) - 1);
      for (int s = 0; s < kNumSites; ++s) {
        const auto mods = site_modules(s, [&](Module) { return opt.max_rank; });
        std::vector<StaticFit> f = sfwd.fit_site(*mo, l, static_cast<Site>(s), mods, opt.damp, opt.resolved_static_mode());
        for (size_t i = 0; i < mods.size(); ++i) fits[module_index(l, mods[i].first)] = std::move(f[i]);
      }
    }
  }
  rep["seconds_static_fits"] = seconds_since(t0);
  log("static fits of %lld modules", (long long)L * kNumModules);

  // 3. Placement.
  if (!opt.fixed_placement.empty()) {
    placement = opt.fixed_placement;
    for (PlacementEntry& e : placement) {
      SPEAR_CHECK(e.layer >= 0 && e.layer < L, "placement: layer out of range");
      const StaticFit& f = fits[module_index(e.layer, e.module)];
      SPEAR_CHECK(e.rank > 0 && e.rank <= f.max_rank, "placement: rank out of range");
      e.bytes = ECParams::bytes_for(f.in, f.out, e.rank, gated);
      e.captured = f.captured(e.rank);
    }
  } else {
    // Restoration gains: KL drop when one module is back at full precision.
    double base_kl = 0;
    std::vector<double> gain = opt.restore_gains;
    if (gain.empty()) {
      gain = restoration_gains(fwd, data, targets, P, &base_kl);
      rep["probe_kl_w4"] = base_kl;
    } else {
      SPEAR_CHECK(static_cast<int64_t>(gain.size()) == L * kNumModules,
                  "calibrate: the restoration gains given do not match the model");
      rep["restore_gains_reused"] = true;
    }
    rep["seconds_restore_gains"] = seconds_since(t0);
    log("restoration gains measured (probe KL of the quantized model %.5f)", base_kl);
    // Greedy rank steps by gain per byte.
    std::vector<int64_t> rank(L * kNumModules, 0);
    int64_t used = 0;
    for (;;) {
      int64_t best = -1;
      double best_ratio = 0;
      int64_t best_cost = 0;
      for (int64_t i = 0; i < L * kNumModules; ++i) {
        const StaticFit& f = fits[i];
        if (rank[i] >= f.max_rank) continue;
        const int64_t cost = ECParams::bytes_for(f.in, f.out, rank[i] + 1, gated) -
                             (rank[i] ? ECParams::bytes_for(f.in, f.out, rank[i], gated) : 0);
        if (used + cost > budget_bytes) continue;
        const double g = gain[i] * (f.captured(rank[i] + 1) - f.captured(rank[i]));
        const double ratio = g / static_cast<double>(cost);
        if (ratio > best_ratio) {
          best_ratio = ratio;
          best = i;
          best_cost = cost;
        }
      }
      if (best < 0) break;
      ++rank[best];
      used += best_cost;
    }
    for (int64_t i = 0; i < L * kNumModules; ++i) {
      if (!rank[i]) continue;
      const StaticFit& f = fits[i];
      PlacementEntry e;
      e.layer = i / kNumModules;
      e.module = static_cast<Module>(i % kNumModules);
      e.rank = rank[i];
      e.bytes = ECParams::bytes_for(f.in, f.out, rank[i], gated);
      e.restore_gain = gain[i];
      e.captured = f.captured(rank[i]);
      placement.push_back(e);
    }
    nlohmann::json gj = nlohmann::json::array();
    for (int64_t i = 0; i < L * kNumModules; ++i)
      gj.push_back({{"layer", i / kNumModules},
                    {"module", std::string(module_name(static_cast<Module>(i % kNumModules)))},
                    {"restore_gain_kl", gain[i]},
                    {"error_energy", fits[i].target_energy},
                    {"captured_r8", fits[i].captured(8)}});
    rep["module_gains"] = gj;
  }
  for (const PlacementEntry& e : placement) ec_bytes += e.bytes;
  log("placement: %zu ECs, %lld bytes of a %lld-byte budget", placement.size(), (long long)ec_bytes,
      (long long)budget_bytes);

  // 4. Static control at the placement: refit layer after layer on quantized-path inputs
  //    that already carry the earlier layers' static ECs.
  res.placement = placement;
  res.static_ecs.assign(L * kNumModules, std::nullopt);
  std::vector<int64_t> rank_of(L * kNumModules, 0);
  for (const PlacementEntry& e : placement) rank_of[module_index(e.layer, e.module)] = e.rank;
  if (opt.sequential_static && !placement.empty()) {
    const std::unique_ptr<ForwardBackend::Acts> xf = sfwd.embed(data.tokens.data(), S * T),  // (S*T, dim)
        xq = sfwd.copy_rows(*xf, 0, S * T);
    auto fit_site = [&](int64_t l, int s, const ForwardBackend::Moments& mo) {
      const auto mods = site_modules(s, [&](Module m) { return rank_of[module_index(l, m)]; });
      if (mods.empty()) return;
      const std::vector<StaticFit> f = sfwd.fit_site(mo, l, static_cast<Site>(s), mods, opt.damp, opt.resolved_static_mode());
      for (size_t i = 0; i < mods.size(); ++i)
        res.static_ecs[module_index(l, mods[i].first)] = ec_from_fit(f[i], mods[i].second, false);
    };
    for (int64_t l = 0; l < L; ++l) {
      unsigned used_sites = 0;
      for (Module m : kAllModules)
        if (rank_of[module_index(l, m)]) used_sites |= 1u << static_cast<int>(module_site(m));
      if (used_sites && opt.resolved_static_refit() == StaticRefit::Site) {
        // Site after site in forward order: each site's statistics come from a pass that
        // already carries the ECs fitted at the earlier sites of this layer, so that (for
        // example) O is not also fitted to the attention drift that Q/K/V's ECs remove.
        for (int s = 0; s < kNumSites; ++s) {
          if (!(used_sites & (1u << s))) continue;
          const auto xf_s = sfwd.copy_rows(*xf, 0, S * T), xq_s = sfwd.copy_rows(*xq, 0, S * T);
          fit_site(l, s, *sfwd.layer_moments(l, *xf_s, *xq_s, S, T, &res.static_ecs, 1u << s));
        }
      } else if (used_sites) {
        // One pass without this layer's ECs for all of its sites (the earlier scheme).
        const auto xf_s = sfwd.copy_rows(*xf, 0, S * T), xq_s = sfwd.copy_rows(*xq, 0, S * T);
        const auto mo = sfwd.layer_moments(l, *xf_s, *xq_s, S, T, &res.static_ecs, used_sites);
        for (int s = 0; s < kNumSites; ++s)
          if (used_sites & (1u << s)) fit_site(l, s, *mo);
      }
      // Both streams leave this layer; the quantized one through the ECs just fitted.
      for (int64_t w = 0; w < S; ++w) {
        sfwd.layer_forward(fp_view(net, l), l, *xf, w * T, 1, T);
        sfwd.layer_forward(q_view(net, l, &res.static_ecs), l, *xq, w * T, 1, T);
      }
    }
  } else {
    for (const PlacementEntry& e : placement) {
      const int64_t i = module_index(e.layer, e.module);
      res.static_ecs[i] = ec_from_fit(fits[i], e.rank, false);
    }
  }
  }
  for (auto& e : res.static_ecs)
    if (e) e->round_to_fp16();
  // Training starts from the closed form itself, whatever the guard below chooses.
  const std::vector<std::optional<ECParams>> closed_form = res.static_ecs;
  // Guard of the static control: the closed forms lower the KL to the full-precision model
  // but can raise the loss on real text (docs/RESULTS.md, issue 11). Scale every B by the
  // α of {0, ¼, ½, ¾, 1} with the lowest next-token NLL on held-out calibration windows (the
  // `guard_windows` after the statistics windows); α = 0 is the quantized model itself, so
  // the static control is never worse than it there.
  if (opt.init_ecs.empty() && opt.guard_windows > 0 && !placement.empty()) {
    const int64_t h0 = S, h1 = std::min(nw, S + opt.guard_windows);
    if (h1 > h0) {
      std::vector<std::optional<ECParams>> none(L * kNumModules), scaled;
      double best = mean_nll(sfwd, data, none, h0, h1), alpha = 0;
      nlohmann::json gj = nlohmann::json::array();
      gj.push_back({{"alpha", 0.0}, {"nll", best}});
      for (double a : {0.25, 0.5, 0.75, 1.0}) {
        scaled = closed_form;
        for (auto& e : scaled)
          if (e)
            for (float& v : e->B) v = static_cast<float>(v * a);
        const double nll = mean_nll(sfwd, data, scaled, h0, h1);
        gj.push_back({{"alpha", a}, {"nll", nll}});
        if (nll < best) {
          best = nll;
          alpha = a;
        }
      }
      for (auto& e : res.static_ecs)
        if (e) {
          for (float& v : e->B) v = static_cast<float>(v * alpha);
          e->round_to_fp16();
        }
      rep["static_guard"] = {{"windows", {h0, h1}}, {"alpha", alpha}, {"nll", gj}};
      log("static guard: alpha %.2f (held-out NLL %.5f; quantized %.5f, closed form %.5f)", alpha, best,
          gj[0]["nll"].get<double>(), gj[4]["nll"].get<double>());
    } else {
      rep["static_guard"] = "skipped: no calibration windows after the statistics windows";
      log("static guard skipped: --calib-windows must exceed --stat-windows");
    }
  }
  rep["seconds_static"] = seconds_since(t0);
  const int64_t kl_windows = std::max<int64_t>(1, std::min(opt.report_windows, nw));
  {
    std::vector<std::optional<ECParams>> none(L * kNumModules);
    rep["calib_kl_w4"] = mean_kl(fwd, data, exact, none, kl_windows);
    rep["calib_kl_static"] = mean_kl(fwd, data, exact, res.static_ecs, kl_windows);
  }
  log("static control: calibration KL %.5f (quantized %.5f)", rep["calib_kl_static"].get<double>(),
      rep["calib_kl_w4"].get<double>());

  // 5. Train from the static control (the closed form, before the guard's scaling).
  // (--objective static: nothing trains, and what is reported is the guarded control.)
  res.trained_ecs = opt.objective == CalibObjective::Static ? res.static_ecs : closed_form;
  for (auto& e : res.trained_ecs)
    if (e && gated) {
      e->gated = true;
      e->G.assign(e->rank * e->rank, 0.0f);
      e->c.assign(e->rank, 0.0f);
    }
  TrainOptions to;
  to.epochs = opt.epochs;
  to.batch = opt.batch;
  to.lr = opt.lr;
  to.lr_gate = opt.lr_gate;
  to.gate = opt.gate;
  to.verbose = opt.verbose;
  const auto t_train = std::chrono::steady_clock::now();
  if (!placement.empty() && opt.objective == CalibObjective::E2e) {
    // On the forward backend's device: the CPU Runner (CpuGrad), or the GPU (GpuGrad).
    const std::unique_ptr<GradBackend> grad = fwd.gradients();
    rep["training"] = train_e2e(*grad, data, targets, res.trained_ecs, to);
  } else if (!placement.empty() && opt.objective == CalibObjective::Block) {
    rep["training"] = train_block(run, data, res.trained_ecs, to);
  }
  for (auto& e : res.trained_ecs)
    if (e) e->round_to_fp16();
  rep["seconds_training"] = seconds_since(t_train);
  rep["calib_kl_trained"] = mean_kl(fwd, data, exact, res.trained_ecs, kl_windows);
  const std::string objective(calib_objective_name(opt.objective));
  log("trained (%s): calibration KL %.5f", objective.c_str(), rep["calib_kl_trained"].get<double>());

  rep["placement"] = placement_json(placement);
  rep["budget"] = opt.budget;
  rep["budget_bytes"] = budget_bytes;
  rep["ec_bytes"] = ec_bytes;
  rep["quant_model_bytes"] = qbytes;
  rep["settings"] = {{"objective", objective},
                     {"static_mode", std::string(static_mode_name(opt.resolved_static_mode()))},
                     {"gated", gated},
                     {"gate", std::string(gate_kind_name(opt.gate))},
                     {"static_refit", std::string(static_refit_name(opt.resolved_static_refit()))},
                     {"max_rank", opt.max_rank},
                     {"damp", opt.damp},           {"probe_windows", P},
                     {"epochs", opt.epochs},       {"batch", opt.batch},
                     {"lr", opt.lr},               {"lr_gate", opt.lr_gate},
                     {"sequential_static", opt.sequential_static},
                     {"stat_windows", S},          {"guard_windows", opt.guard_windows},          {"report_windows", kl_windows},
                     {"targets", std::string(target_mode_name(opt.targets.mode))},
                     {"target_top_k", targets.top_k()}};
  rep["calibration_data"] = data.meta;
  rep["seconds"] = seconds_since(t0);
  res.report = rep;
  return res;
}

SpearArtifact with_ecs(const SpearArtifact& base, const std::vector<std::optional<ECParams>>& ecs,
                       const nlohmann::json& calib_meta) {
  SpearArtifact a = base;
  const int64_t L = a.config().num_layers;
  SPEAR_CHECK(static_cast<int64_t>(ecs.size()) == L * kNumModules, "with_ecs: EC table does not match the model");
  for (int64_t l = 0; l < L; ++l)
    for (Module m : kAllModules) a.at(l, m).ec = ecs[module_index(l, m)];
  a.meta["calibration"] = calib_meta;
  return a;
}

}  // namespace spear
