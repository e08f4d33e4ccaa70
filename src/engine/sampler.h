#pragma once
// Next-token choice from a row of logits: greedy (temperature 0), or sampling with
// temperature, min-p, top-k and top-p (nucleus), reproducible from a seed. Repetition,
// frequency and presence penalties adjust the logits first (for greedy too), with
// vLLM's semantics:
//   repetition_penalty r (> 0, 1 = off), on every token seen in the prompt or the
//     output: logit / r where logit > 0, logit * r otherwise;
//   frequency_penalty f and presence_penalty p (OpenAI's, [-2, 2], 0 = off), on the
//     output tokens only: logit -= f * count(token) + p * (count(token) > 0).
// Then the order of vLLM's sampler: divide by the temperature; drop tokens whose
// probability is below min_p times the most likely one's; keep the top_k; keep the
// smallest prefix (most likely first) whose renormalized mass reaches top_p; draw.
// The draw: u = philox_uniform(seed, n) (core/philox.h) for the n-th token of the
// sequence, and the first candidate in token-id order whose cumulative probability
// exceeds u. The GPU sampler (cuda/sampling.h) draws the same way, so a seeded request
// gets the same tokens from either backend, whatever else shares its batch (up to float
// rounding at a boundary).
#include <cstdint>
#include <span>
#include <utility>
#include <vector>

namespace spear {

struct SamplingParams {
  float temperature = 0.0f;  // 0 = greedy
  int64_t top_k = 0;         // 0 = no limit
  float top_p = 1.0f;        // 1 = no limit
  float min_p = 0.0f;        // 0 = no limit
  float presence_penalty = 0.0f;
  float frequency_penalty = 0.0f;
  float repetition_penalty = 1.0f;
  uint64_t seed = 0;

  bool has_penalties() const {
    return presence_penalty != 0.0f || frequency_penalty != 0.0f || repetition_penalty != 1.0f;
  }
};

// The tokens a sequence holds so far, for the penalties. Ids outside the vocabulary
// are ignored.
struct TokenHistory {
  std::span<const int32_t> prompt;
  std::span<const int32_t> output;
};

// Applies the penalties of `p` to logits[0, n) in place (see above).
void apply_penalties(float* logits, int64_t n, const SamplingParams& p, const TokenHistory& h);

class Sampler {
 public:
  explicit Sampler(const SamplingParams& p);  // throws spear::Error on out-of-range values
  // Draw number `draw` of this seed (the engine passes the sequence's output length).
  int32_t sample_at(const float* logits, int64_t n, uint64_t draw, const TokenHistory& h = {});
  // The next draw: 0, 1, 2, ... over this sampler's calls.
  int32_t sample(const float* logits, int64_t n, const TokenHistory& h = {}) {
    return sample_at(logits, n, draws_++, h);
  }
  // The distribution sample() draws from: (id, probability) of each candidate left,
  // most likely first, probabilities summing to 1 (greedy: the argmax alone, 1).
  // Consumes no randomness.
  std::vector<std::pair<int32_t, double>> distribution(const float* logits, int64_t n,
                                                       const TokenHistory& h = {});
  const SamplingParams& params() const { return p_; }

 private:
  const float* penalized(const float* logits, int64_t n, const TokenHistory& h);
  // Fills cand_ (best first) and prob_ (unnormalized); returns how many are kept.
  int64_t candidates(const float* logits, int64_t n, double* sum);

  SamplingParams p_;
  uint64_t draws_ = 0;
  std::vector<std::pair<float, int32_t>> cand_;  // scratch
  std::vector<double> prob_;                     // scratch
  std::vector<double> dense_;                    // scratch: kept probabilities by token id
  std::vector<float> work_;                      // scratch: penalized logits
};

// Index of the largest logit; the first one on ties (as torch.argmax).
int32_t argmax(const float* logits, int64_t n);

}  // namespace spear
