#include "compensate/teacher_targets.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <numeric>
#include <string>

#include "compensate/network.h"
#include "core/error.h"

namespace spear {

namespace {

double gib(int64_t bytes) { return static_cast<double>(bytes) / static_cast<double>(int64_t{1} << 30); }

std::string fmt_gib(int64_t bytes) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.3g GiB", gib(bytes));
  return buf;
}

// The full-precision log-probabilities of window w into lp (T, V).
void fp_logprobs(const Runner& run, const CalibData& data, int64_t w, float* lp) {
  const int64_t T = data.ctx, V = run.net().cfg.vocab_size;
  run.forward(data.window(w), 1, T, false, nullptr, lp);
  log_softmax_rows(lp, T, V, lp);
}

}  // namespace

std::string_view target_mode_name(TargetMode m) {
  switch (m) {
    case TargetMode::Dense: return "dense";
    case TargetMode::TopK: return "topk";
    case TargetMode::Recompute: return "recompute";
  }
  throw Error("invalid TargetMode " + std::to_string(static_cast<int>(m)));
}

TargetMode parse_target_mode(std::string_view s) {
  for (TargetMode m : {TargetMode::Dense, TargetMode::TopK, TargetMode::Recompute})
    if (s == target_mode_name(m)) return m;
  throw Error("unknown teacher targets '" + std::string(s) + "' (accepted: dense, topk, recompute)");
}

int64_t target_bytes(TargetMode mode, int64_t top_k, int64_t positions, int64_t vocab) {
  switch (mode) {
    case TargetMode::Dense: return positions * vocab * 4;
    case TargetMode::TopK: return positions * (std::min(top_k, vocab) * 8 + 4);
    case TargetMode::Recompute: return 0;
  }
  throw Error("invalid TargetMode " + std::to_string(static_cast<int>(mode)));
}

double TargetWindow::kl(const float* logits, float scale, float* dlogits) const {
  if (dense_) return kl_rows(logits, dense_, T_, V_, scale, dlogits);
  return kl_topk_rows(logits, ids_, logp_, tail_, T_, V_, K_, scale, dlogits);
}

TeacherTargets::TeacherTargets(const Runner& run, const CalibData& data, const TargetOptions& opt,
                               std::vector<double>* entropy)
    : run_(run), data_(data), opt_(opt) {
  const auto t0 = std::chrono::steady_clock::now();
  windows_ = data.windows;
  T_ = data.ctx;
  V_ = run.net().cfg.vocab_size;
  SPEAR_CHECK(windows_ > 0 && T_ > 0, "teacher targets: no calibration windows");
  if (opt.mode == TargetMode::TopK) {
    SPEAR_CHECK(opt.top_k >= 1, "teacher targets: --target-top-k must be at least 1 (got " +
                                    std::to_string(opt.top_k) + ")");
    K_ = std::min(opt.top_k, V_);
  }
  const int64_t N = windows_ * T_;
  const int64_t bytes = target_bytes(opt.mode, K_, N, V_);
  const int64_t limit = static_cast<int64_t>(opt.max_gib * static_cast<double>(int64_t{1} << 30));
  const std::string shape = std::to_string(windows_) + " windows x " + std::to_string(T_) + " tokens";
  if (opt.mode == TargetMode::Dense)
    SPEAR_CHECK(bytes <= limit,
                "calibration: --targets dense holds " + shape + " x " + std::to_string(V_) +
                    " vocabulary float32 log-probabilities = " + fmt_gib(bytes) + ", over the " +
                    fmt_gib(limit) + " limit; use --targets topk (" +
                    fmt_gib(target_bytes(TargetMode::TopK, opt.top_k, N, V_)) + " at K = " +
                    std::to_string(std::min(opt.top_k, V_)) +
                    ") or --targets recompute (nothing stored), or fewer --calib-windows");
  if (opt.mode == TargetMode::TopK)
    SPEAR_CHECK(bytes <= limit, "calibration: --targets topk holds " + shape + " x (8 x " +
                                    std::to_string(K_) + " + 4) bytes = " + fmt_gib(bytes) +
                                    ", over the " + fmt_gib(limit) +
                                    " limit; lower --target-top-k, use --targets recompute "
                                    "(nothing stored), or fewer --calib-windows");
  if (entropy) entropy->assign(N, 0.0);
  if (opt.mode == TargetMode::Recompute && !entropy) return;

  if (opt.mode == TargetMode::Dense) dense_.resize(N * V_);  // (windows, T, V)
  if (opt.mode == TargetMode::TopK) {
    ids_.resize(N * K_);       // (windows, T, K)
    logp_.resize(N * K_);      // (windows, T, K)
    tail_logp_.resize(N);      // (windows, T)
  }
  std::vector<float> scratch(opt.mode == TargetMode::Dense ? 0 : T_ * V_);  // (T, V)
  std::vector<double> tail_mass(opt.mode == TargetMode::TopK ? N : 0);      // (windows*T)
  for (int64_t w = 0; w < windows_; ++w) {
    float* lp = opt.mode == TargetMode::Dense ? &dense_[w * T_ * V_] : scratch.data();
    fp_logprobs(run, data, w, lp);
    if (entropy)
      for (int64_t t = 0; t < T_; ++t) {
        double h = 0;
        for (int64_t v = 0; v < V_; ++v) {
          const double l = lp[t * V_ + v];
          h -= std::exp(l) * l;
        }
        (*entropy)[w * T_ + t] = h;
      }
    if (opt.mode != TargetMode::TopK) continue;
#pragma omp parallel
    {
      std::vector<int32_t> order(V_);  // (V) ids of one row, most probable first after the sort
#pragma omp for schedule(static)
      for (int64_t t = 0; t < T_; ++t) {
        const float* row = lp + t * V_;
        std::iota(order.begin(), order.end(), 0);
        // Ties go to the lower id, so the kept set does not depend on the sort.
        std::partial_sort(order.begin(), order.begin() + K_, order.end(), [row](int32_t a, int32_t b) {
          return row[a] > row[b] || (row[a] == row[b] && a < b);
        });
        const int64_t pos = w * T_ + t;
        double tail = 0;  // summed over the tail itself
        for (int64_t j = K_; j < V_; ++j) tail += std::exp(static_cast<double>(row[order[j]]));
        for (int64_t k = 0; k < K_; ++k) {
          ids_[pos * K_ + k] = order[k];
          logp_[pos * K_ + k] = row[order[k]];
        }
        tail_logp_[pos] = tail > 0 ? static_cast<float>(std::log(tail)) : -INFINITY;
        tail_mass[pos] = tail;
      }
    }
  }
  for (double m : tail_mass) {
    mean_tail_mass_ += m;
    max_tail_mass_ = std::max(max_tail_mass_, m);
  }
  if (!tail_mass.empty()) mean_tail_mass_ /= static_cast<double>(tail_mass.size());
  seconds_ = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

int64_t TeacherTargets::stored_bytes() const { return target_bytes(opt_.mode, K_, windows_ * T_, V_); }

TargetWindow TeacherTargets::window(int64_t w) const {
  SPEAR_CHECK(w >= 0 && w < windows_, "teacher targets: window " + std::to_string(w) + " out of range");
  TargetWindow tw;
  tw.T_ = T_;
  tw.V_ = V_;
  tw.K_ = K_;
  switch (opt_.mode) {
    case TargetMode::Dense: tw.dense_ = &dense_[w * T_ * V_]; break;
    case TargetMode::TopK:
      tw.ids_ = &ids_[w * T_ * K_];
      tw.logp_ = &logp_[w * T_ * K_];
      tw.tail_ = &tail_logp_[w * T_];
      break;
    case TargetMode::Recompute:
      tw.own_.resize(T_ * V_);
      fp_logprobs(run_, data_, w, tw.own_.data());
      tw.dense_ = tw.own_.data();
      break;
  }
  return tw;
}

nlohmann::json TeacherTargets::describe() const {
  nlohmann::json j = {{"mode", std::string(target_mode_name(opt_.mode))},
                      {"stored_bytes", stored_bytes()},
                      {"seconds", seconds_}};
  if (opt_.mode == TargetMode::TopK) {
    j["top_k"] = K_;
    j["mean_tail_mass"] = mean_tail_mass_;
    j["max_tail_mass"] = max_tail_mass_;
  }
  if (opt_.mode == TargetMode::Recompute) j["window_buffer_bytes"] = T_ * V_ * 4;
  return j;
}

}  // namespace spear
