#pragma once
// Statistics spear ppl reports over per-token values: perplexity with its standard
// error (as llama-perplexity computes it) and the distribution of per-token KL.
#include <cstdint>
#include <vector>

namespace spear {

// PPL = exp(mean NLL). The standard error of the mean NLL is s / sqrt(n), s the sample
// standard deviation of the per-token NLLs (n-1 in the denominator); it is carried to
// PPL by the first-order delta method: se(PPL) = PPL * se(mean NLL). llama-perplexity
// prints the same "PPL +/- error". n < 2 gives a standard error of NaN.
struct PplStats {
  int64_t n = 0;
  double nll_mean = 0, nll_stderr = 0;
  double ppl = 0, ppl_stderr = 0;
};
PplStats ppl_stats(const std::vector<double>& nll);

// The q-quantile (0 <= q <= 1) with linear interpolation between order statistics
// (position q*(n-1) in the sorted values; numpy's default). Throws on an empty input.
double quantile(std::vector<double> values, double q);

// Mean, median, 99th percentile and maximum of per-token values (e.g. KL).
struct Summary {
  int64_t n = 0;
  double mean = 0, median = 0, p99 = 0, max = 0;
};
Summary summarize(const std::vector<double>& values);

}  // namespace spear
