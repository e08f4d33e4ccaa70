#include "eval/perplexity.h"

#include <chrono>
#include <cmath>

#include "core/error.h"
#include "model/ops.h"

namespace spear {

double kl_from_logits(const float* p_logits, const float* q_logits, int64_t n) {
  // log-softmax of both rows in double; sum p * (log p - log q).
  auto lse = [n](const float* z) {
    double m = z[0];
    for (int64_t i = 1; i < n; ++i) m = std::max(m, static_cast<double>(z[i]));
    double s = 0;
    for (int64_t i = 0; i < n; ++i) s += std::exp(z[i] - m);
    return m + std::log(s);
  };
  const double lp = lse(p_logits), lq = lse(q_logits);
  double kl = 0;
  for (int64_t i = 0; i < n; ++i) {
    double logp = p_logits[i] - lp;
    kl += std::exp(logp) * (logp - (q_logits[i] - lq));
  }
  return std::max(kl, 0.0);
}

namespace {

// The protocol shared by every backend: consecutive windows of ctx tokens (the tail
// dropped), score(window) -> summed NLL of its ctx-1 predictions.
PplResult run_windows(const WindowScorer& score, int64_t max_context, const std::vector<int32_t>& ids,
                      const PplOptions& opt) {
  const auto t0 = std::chrono::steady_clock::now();
  SPEAR_CHECK(opt.ctx >= 2, "ppl: --ctx must be at least 2");
  SPEAR_CHECK(opt.ctx <= max_context, "ppl: --ctx " + std::to_string(opt.ctx) + " exceeds the model's context of " +
                                          std::to_string(max_context));
  PplResult res;
  res.tokens_in_file = static_cast<int64_t>(ids.size());
  int64_t windows = res.tokens_in_file / opt.ctx;
  if (opt.max_windows >= 0) windows = std::min(windows, opt.max_windows);
  SPEAR_CHECK(windows > 0, "ppl: the text has " + std::to_string(ids.size()) +
                               " tokens, fewer than one window of " + std::to_string(opt.ctx));
  for (int64_t w = 0; w < windows; ++w) {
    res.nll_sum += score(ids.data() + w * opt.ctx, opt.ctx);
    res.predicted_tokens += opt.ctx - 1;
    if (opt.progress) opt.progress(w + 1, windows);
  }
  res.windows = windows;
  res.ppl = std::exp(res.nll_sum / static_cast<double>(res.predicted_tokens));
  res.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return res;
}

}  // namespace

PplResult perplexity(const LlamaModel& model, const std::vector<int32_t>& ids,
                     const PplOptions& opt) {
  const ModelConfig& cfg = model.config();
  if (opt.ref_model)
    SPEAR_CHECK(opt.ref_model->vocab_size() == model.vocab_size(),
                "ppl: the reference model has a different vocabulary size");
  const int64_t V = model.vocab_size();
  const int64_t ctx = std::max<int64_t>(1, std::min(opt.ctx, cfg.max_position_embeddings));
  ContiguousKVCache kv(cfg.num_layers, ctx, cfg.kv_dim());
  std::unique_ptr<ContiguousKVCache> ref_kv;
  if (opt.ref_model)
    ref_kv = std::make_unique<ContiguousKVCache>(opt.ref_model->config().num_layers, ctx,
                                                 opt.ref_model->config().kv_dim());
  double kl_sum = 0;
  WindowScorer score = [&](const int32_t* win, int64_t n) {
    std::vector<float> logits = model.forward(win, n, kv, 0, /*all_logits=*/true);
    std::vector<float> ref_logits;
    if (opt.ref_model) ref_logits = opt.ref_model->forward(win, n, *ref_kv, 0, true);
    double nll = 0, kl = 0;
#pragma omp parallel for reduction(+ : nll, kl) schedule(static)
    for (int64_t t = 0; t < n - 1; ++t) {
      nll -= log_softmax_at(&logits[t * V], V, win[t + 1]);
      if (opt.ref_model) kl += kl_from_logits(&ref_logits[t * V], &logits[t * V], V);
    }
    kl_sum += kl;
    return nll;
  };
  PplResult res = run_windows(score, cfg.max_position_embeddings, ids, opt);
  if (opt.ref_model) res.mean_kl = kl_sum / static_cast<double>(res.predicted_tokens);
  return res;
}

PplResult perplexity_with(const WindowScorer& score, int64_t max_context, const std::vector<int32_t>& ids,
                          const PplOptions& opt) {
  SPEAR_CHECK(!opt.ref_model, "ppl: --ref-model (KL) is computed by the CPU engine only");
  return run_windows(score, max_context, ids, opt);
}

}  // namespace spear
