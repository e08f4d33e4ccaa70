#include "eval/ppl_stats.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "core/error.h"

namespace spear {

PplStats ppl_stats(const std::vector<double>& nll) {
  SPEAR_CHECK(!nll.empty(), "ppl: no predicted tokens");
  PplStats s;
  s.n = static_cast<int64_t>(nll.size());
  double sum = 0;
  for (double x : nll) sum += x;
  s.nll_mean = sum / static_cast<double>(s.n);
  if (s.n >= 2) {
    double ss = 0;  // two passes: no cancellation from sum(x^2) - n*mean^2
    for (double x : nll) ss += (x - s.nll_mean) * (x - s.nll_mean);
    const double sd = std::sqrt(ss / static_cast<double>(s.n - 1));
    s.nll_stderr = sd / std::sqrt(static_cast<double>(s.n));
  } else {
    s.nll_stderr = std::numeric_limits<double>::quiet_NaN();
  }
  s.ppl = std::exp(s.nll_mean);
  s.ppl_stderr = s.ppl * s.nll_stderr;
  return s;
}

double quantile(std::vector<double> v, double q) {
  SPEAR_CHECK(!v.empty(), "quantile of no values");
  SPEAR_CHECK(q >= 0 && q <= 1, "quantile: q must be in [0, 1]");
  const double pos = q * static_cast<double>(v.size() - 1);
  const size_t lo = static_cast<size_t>(std::floor(pos));
  const size_t hi = std::min(lo + 1, v.size() - 1);
  std::nth_element(v.begin(), v.begin() + static_cast<std::ptrdiff_t>(lo), v.end());
  const double a = v[lo];
  if (hi == lo) return a;
  const double b = *std::min_element(v.begin() + static_cast<std::ptrdiff_t>(lo) + 1, v.end());
  return a + (pos - static_cast<double>(lo)) * (b - a);
}

Summary summarize(const std::vector<double>& values) {
  SPEAR_CHECK(!values.empty(), "summary of no values");
  Summary s;
  s.n = static_cast<int64_t>(values.size());
  double sum = 0;
  for (double x : values) sum += x;
  s.mean = sum / static_cast<double>(s.n);
  s.median = quantile(values, 0.5);
  s.p99 = quantile(values, 0.99);
  s.max = *std::max_element(values.begin(), values.end());
  return s;
}

}  // namespace spear
