#include "compensate/forward_backend.h"

#include <utility>
#include <vector>

#include "compensate/target_kl.h"
#include "core/error.h"

namespace spear {

namespace {

struct CpuActs final : ForwardBackend::Acts {
  std::vector<float> x;  // (rows, dim)
};

struct CpuMoments final : ForwardBackend::Moments {
  SiteStats st[kNumSites];
};

struct CpuTargets final : ForwardBackend::WindowTargets {
  explicit CpuTargets(TargetWindow w) : tw(std::move(w)) {}
  TargetWindow tw;
};

const CpuActs& cpu(const ForwardBackend::Acts& a) {
  const auto* p = dynamic_cast<const CpuActs*>(&a);
  SPEAR_CHECK(p, "CpuForward: activations of another backend");
  return *p;
}

}  // namespace

std::unique_ptr<ForwardBackend::Acts> CpuForward::embed(const int32_t* tokens, int64_t rows) const {
  auto a = std::make_unique<CpuActs>();
  a->rows = rows;
  a->x.resize(rows * run_.net().cfg.hidden_size);
  run_.embed(tokens, rows, a->x.data());
  return a;
}

std::unique_ptr<ForwardBackend::Acts> CpuForward::copy_rows(const Acts& x, int64_t row0,
                                                            int64_t rows) const {
  const CpuActs& s = cpu(x);
  const int64_t D = run_.net().cfg.hidden_size;
  SPEAR_CHECK(row0 >= 0 && rows >= 0 && row0 + rows <= s.rows, "CpuForward: rows out of range");
  auto a = std::make_unique<CpuActs>();
  a->rows = rows;
  a->x.assign(s.x.begin() + row0 * D, s.x.begin() + (row0 + rows) * D);
  return a;
}

void CpuForward::layer_forward(const LayerView& lv, int64_t layer, Acts& x, int64_t row0, int64_t B,
                               int64_t T) const {
  CpuActs& a = const_cast<CpuActs&>(cpu(x));
  SPEAR_CHECK(row0 >= 0 && row0 + B * T <= a.rows, "CpuForward: rows out of range");
  run_.layer_forward(lv, layer, &a.x[row0 * run_.net().cfg.hidden_size], B, T, nullptr);
}

std::unique_ptr<ForwardBackend::WindowTargets> CpuForward::window_targets(
    const CalibData& data, const TeacherTargets& targets, int64_t w) const {
  return std::make_unique<CpuTargets>(targets.window(w));
}

double CpuForward::window_kl(const Acts& x, int64_t row0, int64_t T, const WindowTargets& t) const {
  const CpuActs& a = cpu(x);
  const auto* ct = dynamic_cast<const CpuTargets*>(&t);
  SPEAR_CHECK(ct, "CpuForward: targets of another backend");
  SPEAR_CHECK(row0 >= 0 && row0 + T <= a.rows, "CpuForward: rows out of range");
  const int64_t D = run_.net().cfg.hidden_size, V = run_.net().cfg.vocab_size;
  std::vector<float> logits(T * V);  // (T, V)
  run_.head_forward(&a.x[row0 * D], T, logits.data(), nullptr);
  return ct->tw.kl(logits.data(), 0.0f, nullptr);
}

double CpuForward::window_nll(const Acts& x, int64_t row0, int64_t T, const int32_t* tokens) const {
  const CpuActs& a = cpu(x);
  SPEAR_CHECK(row0 >= 0 && row0 + T <= a.rows, "CpuForward: rows out of range");
  const int64_t D = run_.net().cfg.hidden_size, V = run_.net().cfg.vocab_size;
  std::vector<float> logits(T * V);  // (T, V), log-probabilities in place
  run_.head_forward(&a.x[row0 * D], T, logits.data(), nullptr);
  log_softmax_rows(logits.data(), T, V, logits.data());
  double nll = 0;
  for (int64_t t = 0; t + 1 < T; ++t) nll -= logits[t * V + tokens[t + 1]];
  return nll;
}

std::unique_ptr<ForwardBackend::Moments> CpuForward::layer_moments(
    int64_t l, Acts& xf_a, Acts& xq_a, int64_t nw, int64_t T, const std::vector<std::optional<ECParams>>* ecs,
    unsigned sites) const {
  const Network& net = run_.net();
  const int64_t D = net.cfg.hidden_size;
  CpuActs& xf = const_cast<CpuActs&>(cpu(xf_a));
  CpuActs& xq = const_cast<CpuActs&>(cpu(xq_a));
  SPEAR_CHECK(nw * T <= xf.rows && nw * T <= xq.rows, "CpuForward: rows out of range");
  auto mo = std::make_unique<CpuMoments>();
  mo->sites = sites;
  for (int s = 0; s < kNumSites; ++s)
    if (sites & (1u << s)) mo->st[s].reset(site_width(net.cfg, static_cast<Site>(s)));
  std::vector<float> fsite[kNumSites];  // (T, width) the FP inputs of this window
  SiteTap keep = [&](Site s, const float* x, int64_t rows, int64_t cols) {
    if (sites & (1u << static_cast<int>(s))) fsite[static_cast<int>(s)].assign(x, x + rows * cols);
  };
  SiteTap pair = [&](Site s, const float* x, int64_t rows, int64_t) {
    if (sites & (1u << static_cast<int>(s)))
      mo->st[static_cast<int>(s)].add(fsite[static_cast<int>(s)].data(), x, rows);
  };
  for (int64_t w = 0; w < nw; ++w) {
    run_.layer_forward(fp_view(net, l), l, &xf.x[w * T * D], 1, T, nullptr, keep);
    run_.layer_forward(q_view(net, l, ecs), l, &xq.x[w * T * D], 1, T, nullptr, pair);
  }
  mo->tokens = nw * T;
  return mo;
}

std::vector<StaticFit> CpuForward::fit_site(const Moments& mo, int64_t l, Site s,
                                            const std::vector<std::pair<Module, int64_t>>& mods, double damp,
                                            StaticMode mode) const {
  const auto* cm = dynamic_cast<const CpuMoments*>(&mo);
  SPEAR_CHECK(cm, "CpuForward: moments of another backend");
  const int si = static_cast<int>(s);
  SPEAR_CHECK(mo.sites & (1u << si), "CpuForward: no moments at this site");
  const Network& net = run_.net();
  const Whitening wh = whiten(cm->st[si], damp);
  std::vector<StaticFit> fits;
  for (const auto& [m, rank] : mods) {
    SPEAR_CHECK(module_site(m) == s, "CpuForward: a module of another site");
    fits.push_back(fit_static(net.fp[l].W[m].data(), net.q[l].W[m].data(), net.module_out(m), net.module_in(m),
                              cm->st[si], wh, rank, mode));
  }
  return fits;
}

}  // namespace spear
