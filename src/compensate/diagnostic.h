#pragma once
// The sensitivity diagnostic: which modules 4-bit quantization hurts, and how unevenly
// across tokens.
//
// Per module, on calibration tokens, compare the full-precision output y_fp = W x_fp (in
// the full-precision model) with the quantized output y_q = Q x_q (in the quantized
// model, so earlier layers' errors count):
//   damage = 1 − CKA_w(Y_fp, Y_q), linear CKA with per-token weights w_t:
//       Xc = diag(√w)(X − mean_w X),  CKA = ‖Xcᵀ Yc‖²_F / (‖Xcᵀ Xc‖_F ‖Ycᵀ Yc‖_F)
//   weightings: "uniform" (w = 1), "entropy" (w_t = entropy of the FP next-token
//   distribution at t: hard tokens count more), "error" (w_t = ‖y_fp − y_q‖² at t).
// Per-token error e_t = ‖y_fp,t − y_q,t‖² / mean_t ‖y_fp,t‖²: mean, coefficient of
// variation and tail ratios (p90/p50, p99/p50) say how much a gate has to exploit.
// Optionally each weighting is validated against the measured restoration gain (the
// drop of mean KL(P_fp ‖ P_q) when the module alone is put back at full precision) by
// Spearman rank correlation.
#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "compensate/calib_data.h"
#include "compensate/forward_backend.h"
#include "compensate/teacher_targets.h"
#include "model/spear_artifact.h"

namespace spear {

inline constexpr const char* kWeightings[] = {"uniform", "entropy", "error"};

struct ModuleDiagnosis {
  int64_t layer = 0;
  Module module = Module::Q;
  double damage[3] = {};  // by kWeightings
  double err_mean = 0, err_cv = 0, err_p50 = 0, err_p90 = 0, err_p99 = 0, err_max = 0;
  double restore_gain = -1;  // ΔKL, -1 when not measured
  std::vector<float> token_err;  // e_t per token (for the histogram)
};

struct DiagnoseOptions {
  bool validate = true;      // measure restoration gains and rank correlations
  int64_t probe_windows = 2; // windows for the restoration gains
  TargetOptions targets;     // how the full-precision distributions are held
  // Where the forward-only measurements run (the KL of the quantized model, the restoration
  // gains); empty: the CPU. The statistics and the targets' entropies stay on the CPU.
  ForwardFactory forward;
  bool verbose = true;
};

struct Diagnosis {
  std::vector<ModuleDiagnosis> modules;  // layers*7, layer-major
  double spearman[3] = {0, 0, 0};        // damage vs restoration gain, per weighting
  std::string best_weighting = "entropy";
  double kl_w4 = 0;                      // mean KL of the quantized model on the tokens (exact)
  nlohmann::json targets;                // TeacherTargets::describe()
  int64_t tokens = 0;
  double seconds = 0;
};

Diagnosis diagnose(const std::string& dir, const SpearArtifact& quantized, const CalibData& data,
                   const DiagnoseOptions& opt);

// Measured restoration gain of every module (layers*7): mean KL(P_fp ‖ P_q) on the first
// `windows` windows minus the same with that module alone at full precision (≥ 0).
// targets: of data (TopK: every KL is the top-K KL). Window after window, so Recompute
// runs the FP forward once per window. *base_kl receives the quantized model's mean KL.
// On any forward backend (CPU or GPU); the Runner overload is CpuForward's.
std::vector<double> restoration_gains(const ForwardBackend& fwd, const CalibData& data,
                                      const TeacherTargets& targets, int64_t windows,
                                      double* base_kl);
std::vector<double> restoration_gains(const Runner& run, const CalibData& data,
                                      const TeacherTargets& targets, int64_t windows,
                                      double* base_kl);

// Spearman rank correlation (average ranks for ties).
double spearman(const std::vector<double>& a, const std::vector<double>& b);

// Pictures (SVG text): damage heatmap, layer × module type; histogram of log10 per-token
// error of the given modules.
std::string heatmap_svg(const Diagnosis& d, int weighting, int64_t num_layers);
std::string histogram_svg(const Diagnosis& d, const std::vector<size_t>& which);

nlohmann::json diagnosis_json(const Diagnosis& d);

}  // namespace spear
