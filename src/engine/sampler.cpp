#include "engine/sampler.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"
#include "core/philox.h"

namespace spear {

int32_t argmax(const float* logits, int64_t n) {
  int64_t best = 0;
  for (int64_t i = 1; i < n; ++i)
    if (logits[i] > logits[best]) best = i;
  return static_cast<int32_t>(best);
}

void apply_penalties(float* logits, int64_t n, const SamplingParams& p, const TokenHistory& h) {
  auto in_vocab = [n](int32_t id) { return id >= 0 && id < n; };
  if (p.repetition_penalty != 1.0f) {
    // Each token seen once, whether it appears in the prompt, the output or both.
    std::vector<int32_t> seen;
    seen.reserve(h.prompt.size() + h.output.size());
    for (int32_t id : h.prompt)
      if (in_vocab(id)) seen.push_back(id);
    for (int32_t id : h.output)
      if (in_vocab(id)) seen.push_back(id);
    std::sort(seen.begin(), seen.end());
    seen.erase(std::unique(seen.begin(), seen.end()), seen.end());
    const float r = p.repetition_penalty;
    for (int32_t id : seen) logits[id] = logits[id] > 0 ? logits[id] / r : logits[id] * r;
  }
  if (p.frequency_penalty != 0.0f || p.presence_penalty != 0.0f) {
    std::vector<int32_t> out;
    out.reserve(h.output.size());
    for (int32_t id : h.output)
      if (in_vocab(id)) out.push_back(id);
    std::sort(out.begin(), out.end());
    for (size_t i = 0; i < out.size();) {
      size_t j = i;
      while (j < out.size() && out[j] == out[i]) ++j;
      logits[out[i]] -= p.frequency_penalty * static_cast<float>(j - i) + p.presence_penalty;
      i = j;
    }
  }
}

Sampler::Sampler(const SamplingParams& p) : p_(p) {
  SPEAR_CHECK(std::isfinite(p.temperature) && p.temperature >= 0.0f && p.temperature <= 100.0f,
              "temperature must be in [0, 100]");
  SPEAR_CHECK(p.top_k >= 0, "top_k must be >= 0");
  SPEAR_CHECK(std::isfinite(p.top_p) && p.top_p > 0.0f && p.top_p <= 1.0f,
              "top_p must be in (0, 1]");
  SPEAR_CHECK(std::isfinite(p.min_p) && p.min_p >= 0.0f && p.min_p <= 1.0f, "min_p must be in [0, 1]");
  SPEAR_CHECK(std::isfinite(p.presence_penalty) && p.presence_penalty >= -2.0f && p.presence_penalty <= 2.0f,
              "presence_penalty must be in [-2, 2]");
  SPEAR_CHECK(std::isfinite(p.frequency_penalty) && p.frequency_penalty >= -2.0f &&
                  p.frequency_penalty <= 2.0f,
              "frequency_penalty must be in [-2, 2]");
  SPEAR_CHECK(std::isfinite(p.repetition_penalty) && p.repetition_penalty > 0.0f &&
                  p.repetition_penalty <= 10.0f,
              "repetition_penalty must be in (0, 10]");
}

const float* Sampler::penalized(const float* logits, int64_t n, const TokenHistory& h) {
  if (!p_.has_penalties() || (h.prompt.empty() && h.output.empty())) return logits;
  work_.assign(logits, logits + n);
  apply_penalties(work_.data(), n, p_, h);
  return work_.data();
}

int64_t Sampler::candidates(const float* logits, int64_t n, double* sum) {
  cand_.resize(n);
  for (int64_t i = 0; i < n; ++i) cand_[i] = {logits[i] / p_.temperature, static_cast<int32_t>(i)};
  auto by_logit = [](const auto& a, const auto& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  };
  int64_t keep = n;
  if (p_.top_k > 0 && p_.top_k < n) {
    keep = p_.top_k;
    std::partial_sort(cand_.begin(), cand_.begin() + keep, cand_.end(), by_logit);
  } else {
    std::sort(cand_.begin(), cand_.end(), by_logit);
  }
  const double m = cand_[0].first;
  // min_p: p_i >= min_p * p_max  <=>  logit_i >= logit_max + log(min_p). The most
  // likely token always stays, so this commutes with the top-k cut.
  if (p_.min_p > 0.0f) {
    const double floor = m + std::log(static_cast<double>(p_.min_p));
    int64_t k = 1;
    while (k < keep && cand_[k].first >= floor) ++k;
    keep = k;
  }
  // Softmax over the kept candidates (sorted, best first), then the nucleus cut:
  // the smallest prefix whose mass reaches top_p.
  prob_.resize(keep);
  double s = 0;
  for (int64_t i = 0; i < keep; ++i) s += prob_[i] = std::exp(cand_[i].first - m);
  if (p_.top_p < 1.0f) {
    double acc = 0;
    int64_t cut = keep;
    for (int64_t i = 0; i < keep; ++i) {
      acc += prob_[i] / s;
      if (acc >= p_.top_p) {
        cut = i + 1;
        break;
      }
    }
    keep = cut;
    s = 0;
    for (int64_t i = 0; i < keep; ++i) s += prob_[i];
  }
  *sum = s;
  return keep;
}

int32_t Sampler::sample_at(const float* logits, int64_t n, uint64_t draw, const TokenHistory& h) {
  logits = penalized(logits, n, h);
  if (p_.temperature == 0.0f) return argmax(logits, n);
  // Inverse CDF in token-id order (as the GPU sampler walks the vocabulary): the kept
  // candidates' probabilities scattered to a dense row, then one pass.
  dense_.assign(n, 0.0);
  double sum = 0;
  if ((p_.top_k <= 0 || p_.top_k >= n) && p_.top_p >= 1.0f && p_.min_p <= 0.0f) {
    // no cut: every token, no sort (what candidates() computes, in id order)
    float m = -INFINITY;
    for (int64_t i = 0; i < n; ++i) m = std::max(m, logits[i] / p_.temperature);
    for (int64_t i = 0; i < n; ++i) sum += dense_[i] = std::exp(logits[i] / p_.temperature - static_cast<double>(m));
  } else {
    const int64_t keep = candidates(logits, n, &sum);
    for (int64_t i = 0; i < keep; ++i) dense_[cand_[i].second] = prob_[i];
  }
  const double target = philox_uniform(p_.seed, draw) * sum;
  double acc = 0;
  int64_t last = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (dense_[i] == 0.0) continue;
    acc += dense_[i];
    last = i;
    if (acc > target) return static_cast<int32_t>(i);
  }
  return static_cast<int32_t>(last);  // rounding: the last candidate in id order
}

std::vector<std::pair<int32_t, double>> Sampler::distribution(const float* logits, int64_t n,
                                                              const TokenHistory& h) {
  logits = penalized(logits, n, h);
  std::vector<std::pair<int32_t, double>> d;
  if (p_.temperature == 0.0f) {
    d.push_back({argmax(logits, n), 1.0});
    return d;
  }
  double sum = 0;
  const int64_t keep = candidates(logits, n, &sum);
  for (int64_t i = 0; i < keep; ++i) d.push_back({cand_[i].second, prob_[i] / sum});
  return d;
}

}  // namespace spear
