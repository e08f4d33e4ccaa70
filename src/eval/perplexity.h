#pragma once
// Perplexity with the reference protocol: the whole text encoded once (BOS first),
// cut into consecutive non-overlapping windows of ctx tokens (the tail dropped),
// each window run on its own, every position with a next token inside the window
// scored (ctx-1 per window). Optionally the mean KL divergence KL(P_ref || P_model)
// of a reference model's next-token distribution on the same positions.
#include <cstdint>
#include <functional>
#include <vector>

#include "model/llama.h"

namespace spear {

struct PplOptions {
  int64_t ctx = 512;
  int64_t max_windows = -1;               // -1 = all
  const LlamaModel* ref_model = nullptr;  // for KL; must share the vocabulary
  std::function<void(int64_t done, int64_t total)> progress;  // after each window
};

struct PplResult {
  double ppl = 0;
  double nll_sum = 0;       // nats
  int64_t predicted_tokens = 0;
  int64_t windows = 0;
  int64_t tokens_in_file = 0;
  double mean_kl = -1;      // nats per predicted token; -1 without a reference model
  double seconds = 0;
};

PplResult perplexity(const LlamaModel& model, const std::vector<int32_t>& ids,
                     const PplOptions& opt);

// The same protocol over any backend (no KL): score(window, ctx) returns the summed
// negative log-likelihood (nats) of the window's ctx-1 next-token predictions.
// max_context: the backend's context, checked against opt.ctx.
using WindowScorer = std::function<double(const int32_t* window, int64_t ctx)>;
PplResult perplexity_with(const WindowScorer& score, int64_t max_context, const std::vector<int32_t>& ids,
                          const PplOptions& opt);

// KL(p || q) for one position given two logit rows of n entries, in double.
double kl_from_logits(const float* p_logits, const float* q_logits, int64_t n);

}  // namespace spear
