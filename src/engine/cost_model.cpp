#include "engine/cost_model.h"
#include "engine/step_model.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <map>
#include <memory>
#include <random>

#include "core/error.h"
#include "engine/paged_kv.h"
#include "model/llama.h"

namespace spear {

// ---- EC inventory -------------------------------------------------------------

int64_t EcInventory::total_rank_work() const {
  int64_t w = 0;
  for (const EcModule& m : modules) w += m.rank * (m.in + m.out);
  return w;
}

EcInventory ec_inventory(const LlamaWeights& w) {
  EcInventory inv;
  for (int64_t l = 0; l < w.config.num_layers; ++l)
    for (Module m : kAllModules)
      if (const int64_t r = w.at(l, m).ec_rank(); r > 0) {
        const ModuleShape s = module_shape(w.config, m);
        inv.modules.push_back({s.in, s.out, r});
      }
  return inv;
}

EcInventory ec_inventory(const LlamaModel& model) {
  EcInventory inv;
  for (int64_t l = 0; l < model.config().num_layers; ++l)
    for (Module m : kAllModules) {
      const Linear& lin = model.layer(l).at(m);
      if (const int64_t r = lin.ec_rank(); r > 0) inv.modules.push_back({lin.in_features(), lin.out_features(), r});
    }
  return inv;
}

// ---- the model ------------------------------------------------------------------

namespace {
constexpr size_t kWindow = 256;      // online samples kept
constexpr double kPriorWeight = 8;   // the profile counts as this many samples in all
constexpr size_t kErrWindow = 128;

// Solves the weighted least squares X θ ≈ y with θ >= 0 (active set: a negative
// coefficient is pinned to zero and the rest re-solved).
CostModel::Vec solve_nonneg(const std::vector<CostModel::Vec>& X, const std::vector<double>& y,
                            const std::vector<double>& w, const CostModel::Vec& fallback) {
  constexpr int F = CostModel::kFeatures;
  std::array<bool, F> active;
  active.fill(true);
  CostModel::Vec theta{};
  for (int iter = 0; iter < F + 1; ++iter) {
    double A[F][F] = {}, b[F] = {};
    for (size_t i = 0; i < X.size(); ++i)
      for (int r = 0; r < F; ++r) {
        if (!active[r]) continue;
        b[r] += w[i] * X[i][r] * y[i];
        for (int c = 0; c < F; ++c)
          if (active[c]) A[r][c] += w[i] * X[i][r] * X[i][c];
      }
    for (int r = 0; r < F; ++r) {
      if (!active[r]) {
        A[r][r] = 1;
        b[r] = 0;
      } else {
        A[r][r] += 1e-9 * (1 + A[r][r]);  // ridge: identifiable even when a feature is constant
      }
    }
    // Gaussian elimination with partial pivoting.
    bool singular = false;
    for (int c = 0; c < F; ++c) {
      int best = c;
      for (int r = c + 1; r < F; ++r)
        if (std::fabs(A[r][c]) > std::fabs(A[best][c])) best = r;
      if (std::fabs(A[best][c]) < 1e-300) {
        singular = true;
        break;
      }
      if (best != c) {
        for (int k = 0; k < F; ++k) std::swap(A[c][k], A[best][k]);
        std::swap(b[c], b[best]);
      }
      for (int r = c + 1; r < F; ++r) {
        double f = A[r][c] / A[c][c];
        for (int k = c; k < F; ++k) A[r][k] -= f * A[c][k];
        b[r] -= f * b[c];
      }
    }
    if (singular) return fallback;
    for (int r = F - 1; r >= 0; --r) {
      double s = b[r];
      for (int k = r + 1; k < F; ++k) s -= A[r][k] * theta[k];
      theta[r] = s / A[r][r];
    }
    bool changed = false;
    for (int r = 0; r < F; ++r)
      if (active[r] && theta[r] < 0) {
        active[r] = false;
        theta[r] = 0;
        changed = true;
      }
    if (!changed) break;
  }
  for (double& t : theta)
    if (!std::isfinite(t) || t < 0) t = 0;
  return theta;
}
}  // namespace

CostModel::CostModel() {
  // A conservative default until a profile is set: 5 ms + 0.5 ms per row.
  coef_ = {5e-3, 5e-4, 0, 0};
}

CostModel::Vec CostModel::features(const StepShape& s) {
  return {1.0, static_cast<double>(s.tokens), static_cast<double>(s.seqs),
          static_cast<double>(s.attn) / 1024.0};
}

void CostModel::set_profile(const std::vector<std::pair<StepShape, double>>& samples) {
  prior_.clear();
  for (const auto& [shape, sec] : samples) prior_.push_back({features(shape), sec});
  window_.clear();
  refit();
}

void CostModel::set_ec_cost(int64_t n_calls, double per_call_s, double per_token_s) {
  ec_calls_ = n_calls;
  ec_call_s_ = std::max(0.0, per_call_s);
  ec_token_s_ = std::max(0.0, per_token_s);
}

double CostModel::predict_ec(const StepShape& s) const {
  if (s.tokens == 0 || ec_calls_ == 0) return 0;
  return ec_calls_ * ec_call_s_ + s.tokens * ec_token_s_;
}

double CostModel::predict(const StepShape& s) const {
  if (s.tokens == 0) return 0;
  Vec f = features(s);
  double t = 0;
  for (int i = 0; i < kFeatures; ++i) t += coef_[i] * f[i];
  if (ec_aware_) t += predict_ec(s);
  return t;
}

void CostModel::observe(const StepShape& s, double seconds) {
  if (s.tokens == 0 || !(seconds > 0) || !std::isfinite(seconds)) return;
  ++n_obs_;
  double pred = predict(s);
  rel_err_.push_back(std::fabs(pred - seconds) / seconds);
  if (rel_err_.size() > kErrWindow) rel_err_.pop_front();
  if (!refit_) return;
  // The dense terms learn what the EC term (measured separately) does not explain.
  double dense = seconds - (ec_aware_ ? predict_ec(s) : 0.0);
  window_.push_back({features(s), std::max(dense, 1e-7)});
  if (window_.size() > kWindow) window_.pop_front();
  // Refitting a 4x4 system is microseconds; still, every step is plenty.
  refit();
}

void CostModel::refit() {
  std::vector<Vec> X;
  std::vector<double> y, w;
  const double prior_each = prior_.empty() ? 0 : kPriorWeight / prior_.size();
  // Relative error is what matters (a 1 ms decode step and a 200 ms prefill step
  // should fit equally well): weight each sample by 1/y^2.
  for (const auto& [f, sec] : prior_) {
    X.push_back(f);
    y.push_back(sec);
    w.push_back(prior_each / (sec * sec));
  }
  for (const auto& [f, sec] : window_) {
    X.push_back(f);
    y.push_back(sec);
    w.push_back(1.0 / (sec * sec));
  }
  if (X.empty()) return;
  coef_ = solve_nonneg(X, y, w, coef_);
}

double CostModel::mean_abs_rel_error() const {
  if (rel_err_.empty()) return 0;
  double s = 0;
  for (double e : rel_err_) s += e;
  return s / rel_err_.size();
}

std::string CostModel::describe() const {
  char buf[320];
  std::snprintf(buf, sizeof buf,
                "step cost = %.3g ms + %.3g ms/token + %.3g ms/seq + %.3g ms/Kpair%s; EC: %lld "
                "modules, %.3g ms/step + %.3g ms/token (%s)",
                coef_[0] * 1e3, coef_[1] * 1e3, coef_[2] * 1e3, coef_[3] * 1e3,
                refit_ ? " (refit online)" : " (static)", static_cast<long long>(ec_calls_),
                ec_calls_ * ec_call_s_ * 1e3, ec_token_s_ * 1e3,
                ec_aware_ ? "counted" : "ignored");
  return buf;
}

// ---- profiling --------------------------------------------------------------------

namespace {
using clk = std::chrono::steady_clock;

double median_of(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// Seconds of one forward over `chunks` (start, n) on scratch sequences.
double time_step(StepModel& model, BlockPool& pool,
                 const std::vector<std::pair<int64_t, int64_t>>& chunks, int reps) {
  std::vector<std::unique_ptr<PagedSequence>> seqs;
  std::vector<std::vector<int32_t>> toks;
  std::vector<SeqChunk> sc;
  int64_t rows = 0;
  for (const auto& [start, n] : chunks) {
    seqs.push_back(std::make_unique<PagedSequence>(pool));
    SPEAR_CHECK(seqs.back()->reserve(start + n), "profile: scratch KV pool too small");
    toks.emplace_back(n, static_cast<int32_t>(1 % model.vocab_size()));
    rows += 1;
  }
  for (size_t i = 0; i < chunks.size(); ++i)
    sc.push_back({seqs[i].get(), toks[i].data(), chunks[i].second, chunks[i].first, false});
  std::vector<float> logits(rows * model.vocab_size());
  std::vector<double> t;
  model.forward(sc, logits.data());  // warm-up
  for (int r = 0; r < reps; ++r) {
    auto t0 = clk::now();
    model.forward(sc, logits.data());
    t.push_back(std::chrono::duration<double>(clk::now() - t0).count());
  }
  return median_of(t);
}

}  // namespace

// Per-call and per-row seconds of the EC modules' low-rank pairs, summed over modules.
void profile_ec_cpu(const EcInventory& inv, CostModel& cm) {
  if (inv.modules.empty()) {
    cm.set_ec_cost(0, 0, 0);
    return;
  }
  // Group identical shapes; time one of each at M = 1 and M = 64.
  std::map<std::array<int64_t, 3>, int64_t> shapes;
  for (const EcModule& m : inv.modules) shapes[{m.in, m.out, std::max<int64_t>(m.rank, 1)}]++;
  std::mt19937 rng(1);
  std::normal_distribution<float> nd;
  double call_s = 0, token_s = 0;
  for (const auto& [shape, count] : shapes) {
    const auto [in, out, r] = shape;
    std::vector<float> A(r * in), B(out * r), x(64 * in), h(64 * r), y(64 * out);
    for (float& v : A) v = nd(rng) * 0.01f;
    for (float& v : B) v = nd(rng) * 0.01f;
    for (float& v : x) v = nd(rng);
    auto run = [&](int64_t M) {
      std::vector<double> t;
      for (int rep = 0; rep < 7; ++rep) {
        auto t0 = clk::now();
        matmul_nt(x.data(), A.data(), h.data(), M, in, r);
        matmul_nt(h.data(), B.data(), y.data(), M, r, out);
        t.push_back(std::chrono::duration<double>(clk::now() - t0).count());
      }
      return median_of(t);
    };
    double t1 = run(1), t64 = run(64);
    double per_row = std::max(0.0, (t64 - t1) / 63.0);
    call_s += count * std::max(0.0, t1 - per_row);
    token_s += count * per_row;
  }
  const int64_t n = static_cast<int64_t>(inv.modules.size());
  cm.set_ec_cost(n, call_s / n, token_s);
}

void CpuStepModel::profile_ec(const EcInventory& inv, CostModel& cm) { profile_ec_cpu(inv, cm); }

void profile_cost_model(StepModel& model, int64_t max_len, CostModel& cm, int64_t block_size) {
  const ModelConfig& cfg = model.config();
  max_len = std::min<int64_t>(max_len, cfg.max_position_embeddings);
  SPEAR_CHECK(max_len >= 2, "profile: max_len too small");
  EcInventory inv = model.ec_inventory();
  model.profile_ec(inv, cm);

  const int64_t ctx = std::min<int64_t>(128, max_len - 1);
  const int64_t big = std::min<int64_t>(256, max_len);
  // Scratch sequences; on a backend with its own KV memory the ids must exist there too.
  int64_t scratch = (32 * (ctx + 1) + 4 * big) / block_size + 64;
  if (model.kv_blocks() > 0) scratch = std::min(scratch, model.kv_blocks());
  BlockPool pool(scratch, block_size, cfg.num_layers, cfg.kv_dim(), model.host_kv());
  std::vector<std::pair<StepShape, double>> samples;
  auto add = [&](const std::vector<std::pair<int64_t, int64_t>>& chunks) {
    StepShape s;
    for (const auto& [start, n] : chunks) {
      s.tokens += n;
      s.seqs += 1;
      s.attn += attn_pairs(start, n);
    }
    double t = time_step(model, pool, chunks, 3);
    // What the dense terms must explain: the measurement less the EC work.
    samples.push_back({s, std::max(1e-7, t - cm.predict_ec(s))});
  };
  for (int64_t S : {int64_t{1}, int64_t{4}, int64_t{16}, int64_t{32}}) add(std::vector<std::pair<int64_t, int64_t>>(S, {ctx, 1}));
  for (int64_t n : {int64_t{16}, int64_t{64}, big}) add({{0, std::min(n, max_len)}});
  if (max_len > big + 32) add({{std::min<int64_t>(big, max_len - 64), 64}});
  add({{0, std::min<int64_t>(64, max_len)}, {ctx, 1}, {ctx, 1}, {ctx, 1}});  // a mixed step
  cm.set_profile(samples);
}

}  // namespace spear
