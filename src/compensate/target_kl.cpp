#include "compensate/target_kl.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace spear {

void log_softmax_rows(const float* logits, int64_t rows, int64_t V, float* out) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const float* z = logits + r * V;
    double m = z[0];
    for (int64_t i = 1; i < V; ++i) m = std::max(m, static_cast<double>(z[i]));
    double s = 0;
    for (int64_t i = 0; i < V; ++i) s += std::exp(z[i] - m);
    const double lse = m + std::log(s);
    for (int64_t i = 0; i < V; ++i) out[r * V + i] = static_cast<float>(z[i] - lse);
  }
}

namespace {
// Σ of the per-row KLs in row order: the same double whatever the thread count or the
// order threads finish in (an OpenMP reduction combines partial sums in arrival order,
// which made the same calibration differ in its last bits from run to run).
double ordered_sum(const std::vector<double>& v) {
  double total = 0;
  for (double x : v) total += x;
  return total;
}
}  // namespace

double kl_rows(const float* logits, const float* ref_logp, int64_t rows, int64_t V, float scale,
               float* dlogits) {
  std::vector<double> row_kl(rows);  // (rows)
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const float* z = logits + r * V;
    const float* lp = ref_logp + r * V;
    double m = z[0];
    for (int64_t i = 1; i < V; ++i) m = std::max(m, static_cast<double>(z[i]));
    double s = 0;
    for (int64_t i = 0; i < V; ++i) s += std::exp(z[i] - m);
    const double lse = m + std::log(s);
    double kl = 0;
    for (int64_t i = 0; i < V; ++i) {
      const double p = std::exp(static_cast<double>(lp[i]));
      const double lq = z[i] - lse;
      kl += p * (lp[i] - lq);
      if (dlogits) dlogits[r * V + i] = static_cast<float>(scale * (std::exp(lq) - p));
    }
    row_kl[r] = kl;
  }
  return ordered_sum(row_kl);
}

double kl_topk_rows(const float* logits, const int32_t* ids, const float* logp,
                    const float* tail_logp, int64_t rows, int64_t V, int64_t K, float scale,
                    float* dlogits) {
  std::vector<double> row_kl(rows);  // (rows)
#pragma omp parallel
  {
    std::vector<uint8_t> kept(V, 0);  // (V) 1 at the row's kept ids
    std::vector<double> qk(K);        // (K) student probabilities of the kept ids
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const float* z = logits + r * V;
      const int32_t* id = ids + r * K;
      const float* lp = logp + r * K;
      for (int64_t k = 0; k < K; ++k) kept[id[k]] = 1;
      double m = z[0];
      for (int64_t i = 1; i < V; ++i) m = std::max(m, static_cast<double>(z[i]));
      // The student's tail mass is summed over the tail itself, not as 1 − Σ_S q_i,
      // which cancels when the tail is small.
      double s = 0, s_tail = 0;
      for (int64_t i = 0; i < V; ++i) {
        const double e = std::exp(z[i] - m);
        s += e;
        if (!kept[i]) s_tail += e;
      }
      const double lse = m + std::log(s);
      double kl = 0;
      for (int64_t k = 0; k < K; ++k) {
        const double lq = z[id[k]] - lse;
        qk[k] = std::exp(lq);
        kl += std::exp(static_cast<double>(lp[k])) * (lp[k] - lq);
      }
      const double p_tail = std::exp(static_cast<double>(tail_logp[r]));  // 0 for −inf
      // q_T can underflow only when the student puts (numerically) nothing outside S;
      // the floor keeps KL_K finite (large) and the gradient below bounded.
      const double q_tail = std::max(s_tail / s, 1e-300);
      if (p_tail > 0) kl += p_tail * (tail_logp[r] - std::log(q_tail));
      row_kl[r] = kl;
      if (dlogits) {
        float* d = dlogits + r * V;
        // Tail ids first (q_j (1 − p_T / q_T), with q_j / q_T ≤ 1), then the kept ids,
        // whose q was saved above since d may overwrite z.
        for (int64_t i = 0; i < V; ++i) {
          if (kept[i]) continue;
          const double q = std::exp(z[i] - lse);
          d[i] = static_cast<float>(scale * (q - p_tail * (q / q_tail)));
        }
        for (int64_t k = 0; k < K; ++k)
          d[id[k]] = static_cast<float>(scale * (qk[k] - std::exp(static_cast<double>(lp[k]))));
      }
      for (int64_t k = 0; k < K; ++k) kept[id[k]] = 0;
    }
  }
  return ordered_sum(row_kl);
}

}  // namespace spear
