#pragma once
// The SPEAR report: perplexity and mean KL to full precision of several models on the
// same windows (the full-precision model runs once per window and every other model is
// compared with it), and the table that says how much of the FP-to-quantized gap each
// method recovers at what memory cost.
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "model/llama.h"

namespace spear {

struct ModelScore {
  double ppl = 0, nll = 0;  // nll: nats per predicted token
  double mean_kl = 0;       // KL(P_fp ‖ P_model) per predicted token (0 for fp itself)
};

// Reference protocol (eval/perplexity.h) for every model at once. models[i] may be fp
// itself. Returns one score per model; predicted tokens and windows in *windows_out.
std::vector<ModelScore> score_models(const LlamaModel& fp, const std::vector<const LlamaModel*>& models,
                                     const std::vector<int32_t>& ids, int64_t ctx,
                                     int64_t max_windows, int64_t* windows_out,
                                     int64_t* predicted_out,
                                     const std::function<void(int64_t, int64_t)>& progress);

struct ReportRow {
  std::string method;   // fp | w4 | static | spear | ...
  std::string base;     // quantizer of the base, e.g. "rtn w4-pc-asym"
  double budget = 0;    // requested EC budget (0 = none)
  ModelScore score;
  int64_t quant_model_bytes = 0, ec_bytes = 0, ec_count = 0;
  double calib_seconds = 0;
};

// Share of the gap closed: (ppl_base − ppl) / (ppl_base − ppl_fp).
double gap_recovered(double ppl, double ppl_fp, double ppl_base);

// Markdown table: method, base, budget, ECs, memory overhead, ppl, gap recovered, mean
// KL, calibration seconds. base_ppl: the perplexity of the quantized base (per base name).
std::string report_markdown(const std::vector<ReportRow>& rows);
nlohmann::json report_json(const std::vector<ReportRow>& rows);

}  // namespace spear
