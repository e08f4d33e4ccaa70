#pragma once
// Perplexity with the reference protocol: the whole text encoded once (BOS first),
// cut into consecutive non-overlapping windows of ctx tokens (the tail dropped),
// each window run on its own, every position with a next token inside the window
// scored (ctx-1 per window). PPL comes with its standard error (eval/ppl_stats.h).
// Optionally compared with a reference on the same positions, either a reference model
// run alongside or its distributions saved earlier (eval/ref_logits.h): KL(P_ref ||
// P_model) per token (mean, median, p99, max) and top-1 agreement.
#include <cstdint>
#include <functional>
#include <vector>

#include "eval/ppl_stats.h"
#include "eval/ref_logits.h"
#include "model/llama.h"

namespace spear {

struct PplOptions {
  int64_t ctx = 512;
  int64_t max_windows = -1;               // -1 = all
  const LlamaModel* ref_model = nullptr;  // for KL; must share the vocabulary
  RefLogitsReader* ref_logits = nullptr;  // saved reference rows instead of ref_model
  RefLogitsWriter* save_logits = nullptr; // writes ref_model's rows (needs ref_model)
  std::function<void(int64_t done, int64_t total)> progress;  // after each window
};

struct PplResult {
  double ppl = 0;
  double nll_sum = 0;       // nats
  int64_t predicted_tokens = 0;
  int64_t windows = 0;
  int64_t tokens_in_file = 0;
  double nll_stderr = 0;    // of the mean NLL; NaN where per-token NLLs are not available
  double ppl_stderr = 0;    // ppl * nll_stderr (NaN likewise)
  // With a reference (ref_model or ref_logits):
  bool has_ref = false;
  double mean_kl = -1;      // nats per predicted token; -1 without a reference
  Summary kl;               // per-token KL(ref || model): mean, median, p99, max
  int64_t top1_same = 0;    // positions where argmax(model) == argmax(ref)
  double top1_agreement = 0;  // top1_same / predicted_tokens
  double seconds = 0;
};

// How many windows the protocol scores for n tokens (throws when not even one fits).
int64_t ppl_window_count(int64_t n_tokens, const PplOptions& opt);

PplResult perplexity(const LlamaModel& model, const std::vector<int32_t>& ids,
                     const PplOptions& opt);

// The same protocol over any backend (no reference, no standard error): score(window, ctx) returns the summed
// negative log-likelihood (nats) of the window's ctx-1 next-token predictions.
// max_context: the backend's context, checked against opt.ctx.
using WindowScorer = std::function<double(const int32_t* window, int64_t ctx)>;
PplResult perplexity_with(const WindowScorer& score, int64_t max_context, const std::vector<int32_t>& ids,
                          const PplOptions& opt);

// KL(p || q) for one position given two logit rows of n entries, in double.
double kl_from_logits(const float* p_logits, const float* q_logits, int64_t n);

}  // namespace spear
