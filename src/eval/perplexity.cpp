#include "eval/perplexity.h"

#include <chrono>
#include <cmath>
#include <limits>
#include <memory>

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
  SPEAR_CHECK(opt.ctx <= max_context, "ppl: --ctx " + std::to_string(opt.ctx) + " exceeds the model's context of " +
                                          std::to_string(max_context));
  PplResult res;
  res.tokens_in_file = static_cast<int64_t>(ids.size());
  const int64_t windows = ppl_window_count(res.tokens_in_file, opt);
  for (int64_t w = 0; w < windows; ++w) {
    res.nll_sum += score(ids.data() + w * opt.ctx, opt.ctx);
    res.predicted_tokens += opt.ctx - 1;
    if (opt.progress) opt.progress(w + 1, windows);
  }
  res.windows = windows;
  res.ppl = std::exp(res.nll_sum / static_cast<double>(res.predicted_tokens));
  res.nll_stderr = res.ppl_stderr = std::numeric_limits<double>::quiet_NaN();
  res.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return res;
}

}  // namespace

int64_t ppl_window_count(int64_t n_tokens, const PplOptions& opt) {
  SPEAR_CHECK(opt.ctx >= 2, "ppl: --ctx must be at least 2");
  int64_t windows = n_tokens / opt.ctx;
  if (opt.max_windows >= 0) windows = std::min(windows, opt.max_windows);
  SPEAR_CHECK(windows > 0, "ppl: the text has " + std::to_string(n_tokens) + " tokens, fewer than one window of " +
                               std::to_string(opt.ctx));
  return windows;
}

PplResult perplexity(const LlamaModel& model, const std::vector<int32_t>& ids,
                     const PplOptions& opt) {
  const ModelConfig& cfg = model.config();
  SPEAR_CHECK(!(opt.ref_model && opt.ref_logits), "ppl: give --ref-model or --ref-logits, not both");
  SPEAR_CHECK(!opt.save_logits || opt.ref_model, "ppl: --save-logits needs --ref-model");
  if (opt.ref_model)
    SPEAR_CHECK(opt.ref_model->vocab_size() == model.vocab_size(),
                "ppl: the reference model has a different vocabulary size");
  if (opt.ref_logits)
    SPEAR_CHECK(opt.ref_logits->header().vocab_size == model.vocab_size(),
                "ppl: the saved reference has a different vocabulary size");
  const bool has_ref = opt.ref_model || opt.ref_logits;
  const int64_t V = model.vocab_size();
  const int64_t ctx = std::max<int64_t>(1, std::min(opt.ctx, cfg.max_position_embeddings));
  ContiguousKVCache kv(cfg.num_layers, ctx, cfg.kv_dim());
  std::unique_ptr<ContiguousKVCache> ref_kv;
  if (opt.ref_model)
    ref_kv = std::make_unique<ContiguousKVCache>(opt.ref_model->config().num_layers, ctx,
                                                 opt.ref_model->config().kv_dim());
  std::vector<double> nll_all, kl_all;
  int64_t top1_same = 0;
  WindowScorer score = [&](const int32_t* win, int64_t n) {
    std::vector<float> logits = model.forward(win, n, kv, 0, /*all_logits=*/true);
    RefRows ref;
    if (opt.ref_model) {
      std::vector<float> ref_logits = opt.ref_model->forward(win, n, *ref_kv, 0, true);
      ref = RefRows::from_logits(ref_logits.data(), n - 1, V);
      if (opt.save_logits) opt.save_logits->write_window(ref);
    } else if (opt.ref_logits) {
      ref = opt.ref_logits->read_window();
      SPEAR_CHECK(ref.positions == n - 1, "ppl: the saved reference has windows of another length");
    }
    std::vector<double> nll(static_cast<size_t>(n - 1)), kl(has_ref ? static_cast<size_t>(n - 1) : 0);
    std::vector<uint8_t> same(kl.size());
#pragma omp parallel
    {
      std::vector<float> q(has_ref ? static_cast<size_t>(V) : 0);
#pragma omp for schedule(static)
      for (int64_t t = 0; t < n - 1; ++t) {
        nll[t] = -log_softmax_at(&logits[t * V], V, win[t + 1]);
        if (has_ref) {
          log_softmax_row(&logits[t * V], V, q.data());
          const PositionCompare c = compare_position(ref, t, q.data());
          kl[t] = c.kl;
          same[t] = c.top1_agree;
        }
      }
    }
    double sum = 0;
    for (double x : nll) sum += x;
    nll_all.insert(nll_all.end(), nll.begin(), nll.end());
    kl_all.insert(kl_all.end(), kl.begin(), kl.end());
    for (uint8_t s : same) top1_same += s;
    return sum;
  };
  PplResult res = run_windows(score, cfg.max_position_embeddings, ids, opt);
  const PplStats st = ppl_stats(nll_all);
  res.nll_stderr = st.nll_stderr;
  res.ppl_stderr = st.ppl_stderr;
  if (has_ref) {
    res.has_ref = true;
    res.kl = summarize(kl_all);
    res.mean_kl = res.kl.mean;
    res.top1_same = top1_same;
    res.top1_agreement = static_cast<double>(top1_same) / static_cast<double>(res.predicted_tokens);
  }
  if (opt.save_logits) opt.save_logits->commit();
  return res;
}

PplResult perplexity_with(const WindowScorer& score, int64_t max_context, const std::vector<int32_t>& ids,
                          const PplOptions& opt) {
  SPEAR_CHECK(!opt.ref_model && !opt.ref_logits && !opt.save_logits,
              "ppl: --ref-model, --ref-logits and --save-logits are computed by the CPU engine only "
              "(use --device cpu)");
  return run_windows(score, max_context, ids, opt);
}

}  // namespace spear
