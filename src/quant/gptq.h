#pragma once
// GPTQ (Frantar et al. 2022): quantize W column by column and spread each column's
// rounding error over the columns not yet quantized, weighted by the inverse Hessian
// of the layer's squared output error, H = 2 X Xᵀ over calibration inputs.
// Same grid and rules as RTN (rtn.h); per output channel, or per group of g inputs
// with the group's scale/zero found when its first column is reached (from the weights
// as updated so far). With activation order, columns go by decreasing H_ii and the
// groups keep their fixed column ranges (static groups, found on the original W) so
// that the canonical format stays valid.
#include <cstdint>
#include <vector>

#include "core/quant_format.h"

namespace spear {

struct GptqOptions {
  double damp = 0.01;     // added to H's diagonal, as a fraction of its mean
  bool act_order = false;
  int64_t block = 128;    // columns updated lazily per block
};

// What GPTQ needs of a Hessian, shared by every module that reads the same inputs (q, k
// and v; gate and up): the column order, the inputs that were always zero, and U, the upper
// Cholesky factor of the damped, permuted H⁻¹ (row i holds column i's update weights).
struct GptqFactor {
  int64_t K = 0;
  std::vector<int64_t> perm;  // (K) column order: position j quantizes input perm[j]
  std::vector<char> dead;     // (K) H_ii == 0: the input carries nothing, its weights are 0
  std::vector<double> U;      // (K, K) upper triangular, in permuted order
};
// H: (K, K) row-major, the sum of x xᵀ over calibration inputs (any positive scale).
// Throws spear::Error on a bad shape or a Hessian that is not positive definite once damped.
GptqFactor gptq_factor(const std::vector<double>& H, int64_t K, const GptqOptions& opt);

// w: (N, K) row-major. Throws spear::Error on bad shapes or a non-finite weight.
QuantizedMatrix quantize_gptq(const float* w, int64_t N, int64_t K, const QuantScheme& scheme,
                              const GptqFactor& f, const GptqOptions& opt);
// The same with its own factor of H.
QuantizedMatrix quantize_gptq(const float* w, int64_t N, int64_t K, const QuantScheme& scheme,
                              const std::vector<double>& H, const GptqOptions& opt);

}  // namespace spear
