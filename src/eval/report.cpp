#include "eval/report.h"

#include <cmath>
#include <cstdio>
#include <map>

#include "core/error.h"
#include "eval/perplexity.h"
#include "model/kv_cache.h"
#include "model/ops.h"

namespace spear {

std::vector<ModelScore> score_models(const LlamaModel& fp, const std::vector<const LlamaModel*>& models,
                                     const std::vector<int32_t>& ids, int64_t ctx,
                                     int64_t max_windows, int64_t* windows_out,
                                     int64_t* predicted_out,
                                     const std::function<void(int64_t, int64_t)>& progress) {
  const ModelConfig& cfg = fp.config();
  SPEAR_CHECK(ctx >= 2 && ctx <= cfg.max_position_embeddings,
              "eval: --ctx must be in [2, " + std::to_string(cfg.max_position_embeddings) + "]");
  for (const LlamaModel* m : models)
    SPEAR_CHECK(m->vocab_size() == fp.vocab_size(), "eval: models with different vocabularies");
  int64_t windows = static_cast<int64_t>(ids.size()) / ctx;
  if (max_windows >= 0) windows = std::min(windows, max_windows);
  SPEAR_CHECK(windows > 0, "eval: the text has fewer tokens than one window");
  const int64_t V = fp.vocab_size();
  ContiguousKVCache kv(cfg.num_layers, ctx, cfg.kv_dim());
  std::vector<double> nll(models.size(), 0.0), kl(models.size(), 0.0);
  for (int64_t w = 0; w < windows; ++w) {
    const int32_t* win = ids.data() + w * ctx;
    std::vector<float> ref = fp.forward(win, ctx, kv, 0, true);
    for (size_t i = 0; i < models.size(); ++i) {
      const bool same = models[i] == &fp;
      std::vector<float> lg = same ? std::vector<float>() : models[i]->forward(win, ctx, kv, 0, true);
      const std::vector<float>& z = same ? ref : lg;
      double n = 0, k = 0;
#pragma omp parallel for reduction(+ : n, k) schedule(static)
      for (int64_t t = 0; t < ctx - 1; ++t) {
        n -= log_softmax_at(&z[t * V], V, win[t + 1]);
        if (!same) k += kl_from_logits(&ref[t * V], &z[t * V], V);
      }
      nll[i] += n;
      kl[i] += k;
    }
    if (progress) progress(w + 1, windows);
  }
  const double pred = static_cast<double>(windows * (ctx - 1));
  std::vector<ModelScore> out(models.size());
  for (size_t i = 0; i < models.size(); ++i) {
    out[i].nll = nll[i] / pred;
    out[i].ppl = std::exp(out[i].nll);
    out[i].mean_kl = kl[i] / pred;
  }
  if (windows_out) *windows_out = windows;
  if (predicted_out) *predicted_out = windows * (ctx - 1);
  return out;
}

double gap_recovered(double ppl, double ppl_fp, double ppl_base) {
  const double gap = ppl_base - ppl_fp;
  return gap != 0 ? (ppl_base - ppl) / gap : 0.0;
}

namespace {
// ppl of fp and of each base, for the gap column.
void reference_ppls(const std::vector<ReportRow>& rows, double* fp,
                    std::map<std::string, double>* base) {
  *fp = std::nan("");
  for (const ReportRow& r : rows) {
    if (r.method == "fp") *fp = r.score.ppl;
    if (r.method == "w4" || r.method == "base") (*base)[r.base] = r.score.ppl;
  }
}
}  // namespace

std::string report_markdown(const std::vector<ReportRow>& rows) {
  double fp;
  std::map<std::string, double> base;
  reference_ppls(rows, &fp, &base);
  std::string s =
      "| method | base | budget | ECs | EC bytes | memory overhead | ppl | gap recovered | mean KL | "
      "calib s |\n|---|---|---|---|---|---|---|---|---|---|\n";
  char buf[512];
  for (const ReportRow& r : rows) {
    std::string gap = "–";
    if (r.method != "fp" && base.count(r.base) && !std::isnan(fp)) {
      std::snprintf(buf, sizeof buf, "%.1f%%", 100.0 * gap_recovered(r.score.ppl, fp, base[r.base]));
      gap = buf;
    }
    std::string budget = r.budget > 0 ? (std::snprintf(buf, sizeof buf, "%.3g%%", 100 * r.budget), std::string(buf)) : "–";
    std::string over = r.quant_model_bytes > 0
                           ? (std::snprintf(buf, sizeof buf, "%.2f%%", 100.0 * r.ec_bytes / r.quant_model_bytes), std::string(buf))
                           : "–";
    std::string kl = r.method == "fp" ? "0" : (std::snprintf(buf, sizeof buf, "%.5f", r.score.mean_kl), std::string(buf));
    std::string cs = r.calib_seconds > 0 ? (std::snprintf(buf, sizeof buf, "%.0f", r.calib_seconds), std::string(buf)) : "–";
    std::snprintf(buf, sizeof buf, "| %s | %s | %s | %lld | %lld | %s | %.3f | %s | %s | %s |\n",
                  r.method.c_str(), r.base.empty() ? "–" : r.base.c_str(), budget.c_str(),
                  (long long)r.ec_count, (long long)r.ec_bytes, over.c_str(), r.score.ppl,
                  gap.c_str(), kl.c_str(), cs.c_str());
    s += buf;
  }
  return s;
}

nlohmann::json report_json(const std::vector<ReportRow>& rows) {
  double fp;
  std::map<std::string, double> base;
  reference_ppls(rows, &fp, &base);
  nlohmann::json j = nlohmann::json::array();
  for (const ReportRow& r : rows) {
    nlohmann::json e{{"method", r.method},
                     {"base", r.base},
                     {"budget", r.budget},
                     {"ppl", r.score.ppl},
                     {"nll", r.score.nll},
                     {"mean_kl", r.score.mean_kl},
                     {"quant_model_bytes", r.quant_model_bytes},
                     {"ec_bytes", r.ec_bytes},
                     {"ec_count", r.ec_count},
                     {"memory_overhead", r.quant_model_bytes > 0
                                             ? static_cast<double>(r.ec_bytes) / r.quant_model_bytes
                                             : 0.0},
                     {"calib_seconds", r.calib_seconds}};
    if (r.method != "fp" && base.count(r.base) && !std::isnan(fp))
      e["gap_recovered"] = gap_recovered(r.score.ppl, fp, base[r.base]);
    j.push_back(e);
  }
  return j;
}

}  // namespace spear
