#pragma once
// The static control: the best rank-r correction C = B·A of a quantized module without
// a gate, in closed form from second moments of its inputs on calibration tokens.
//
// With x_fp the module's input in the full-precision model and x_q its input in the
// quantized model, the error to correct is e = W x_fp − Q x_q (not only ΔW x: earlier
// quantized layers move the input too). Reduced-rank regression of e on x_q:
//     R = E[x_q x_qᵀ] (+ damping),   X = E[e x_qᵀ] = W E[x_fp x_qᵀ] − Q R
//     M = X R^-½,   SVD_r(M) = U S Vᵀ,   C = U S Vᵀ R^-½
// Mode "qera" is the published QERA closed form (Zhang et al., 2024; EoRA is the same
// with R from the inputs of the quantized model): the rank-r C that minimises
//     E‖(ΔW − C) x_q‖² = ‖(ΔW − C) R^½‖²_F,   ΔW = W − Q,
// which is C = SVD_r(ΔW R^½) R^-½ (Eckart–Young in the whitened space). With damping λ,
// R is replaced by R + λI in both places: then C minimises E‖(ΔW − C) x_q‖² + λ‖ΔW − C‖²_F.
// Its target does not depend on x_fp, so it never chases the upstream drift.
// Factors are balanced: B = U S^½, A = S^½ Vᵀ R^-½, so that A and B have comparable
// scales for the gradient steps that start from them.
#include <cstdint>
#include <string_view>
#include <vector>

#include "model/ec_layer.h"

namespace spear {

// Rrr: the error W x_fp − Q x_q (the closed form above); Qera: ΔW x_q (QERA/EoRA), the
// default static control (docs/RESULTS.md, the ablation table).
enum class StaticMode { Rrr, Qera };

// The spelling on the command line and in the calibration report ("rrr", "qera").
std::string_view static_mode_name(StaticMode m);
// The inverse of static_mode_name; throws spear::Error naming the accepted values.
StaticMode parse_static_mode(std::string_view s);

// Sums over calibration tokens at one input site (in = the site's width).
struct SiteStats {
  int64_t in = 0;
  int64_t tokens = 0;
  std::vector<double> Rqq;  // (in, in) Σ x_q x_qᵀ
  std::vector<double> Sfq;  // (in, in) Σ x_fp x_qᵀ
  std::vector<double> Sff;  // (in, in) Σ x_fp x_fpᵀ
  void reset(int64_t n);
  // Adds a window: xf, xq (rows, in).
  void add(const float* xf, const float* xq, int64_t rows);
};

// The whitening of a site, shared by its modules: R^-½ and R^½ (in, in) of the damped
// R = E[x_q x_qᵀ] + λI, λ = damp · tr(R)/in.
struct Whitening {
  int64_t in = 0;
  std::vector<double> R_inv_half;  // (in, in)
  std::vector<double> R_half;      // (in, in)
};
Whitening whiten(const SiteStats& s, double damp);

struct StaticFit {
  int64_t in = 0, out = 0, max_rank = 0;
  // E‖e‖² per token (Rrr); ‖ΔW (R+λI)^½‖²_F (Qera: the damped objective at C = 0).
  double target_energy = 0;
  std::vector<double> sigma2;   // (max_rank) energy each direction removes, descending
  std::vector<float> A;         // (max_rank, in)
  std::vector<float> B;         // (out, max_rank)
  // Share of the target energy removed by the first r directions.
  double captured(int64_t r) const;
  // A fit of (out, in) with max_rank = min(max_rank, out, in) and target_energy =
  // max(energy, 0), its sigma2, A and B zero-filled to size.
  static StaticFit sized(int64_t out, int64_t in, int64_t max_rank, double energy);
};

// W, Q: (out, in) full-precision and dequantized weights.
StaticFit fit_static(const float* W, const float* Q, int64_t out, int64_t in, const SiteStats& s,
                     const Whitening& wh, int64_t max_rank, StaticMode mode);

// The last step of fit_static, shared with the GPU fit (calib_gpu/gpu_static.h): f sized,
// with its sigma2 set; Aw (max_rank, in) = V_rᵀ R^-½ (V's columns unit vectors), US (out,
// max_rank) = U_r S_r. Fixes each direction's sign (the largest |entry| of A's row is
// positive; Aw and US are flipped in place) and sets A = S^½ Aw, B = US S^-½.
void finish_static_fit(StaticFit& f, std::vector<double>& Aw, std::vector<double>& US);

// The first r directions as an EC (gate at its neutral point G = 0, c = 0).
ECParams ec_from_fit(const StaticFit& f, int64_t r, bool gated);

}  // namespace spear
