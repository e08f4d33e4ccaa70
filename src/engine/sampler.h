#pragma once
// Next-token choice from a row of logits: greedy (temperature 0), or sampling with
// temperature, top-k and top-p (nucleus), reproducible from a seed.
#include <cstdint>
#include <random>
#include <vector>

namespace spear {

struct SamplingParams {
  float temperature = 0.0f;  // 0 = greedy
  int64_t top_k = 0;         // 0 = no limit
  float top_p = 1.0f;        // 1 = no limit
  uint64_t seed = 0;
};

class Sampler {
 public:
  explicit Sampler(const SamplingParams& p);  // throws spear::Error on out-of-range values
  int32_t sample(const float* logits, int64_t n);
  const SamplingParams& params() const { return p_; }

 private:
  SamplingParams p_;
  std::mt19937_64 rng_;
  std::vector<std::pair<float, int32_t>> cand_;  // scratch
};

// Index of the largest logit; the first one on ties (as torch.argmax).
int32_t argmax(const float* logits, int64_t n);

}  // namespace spear
