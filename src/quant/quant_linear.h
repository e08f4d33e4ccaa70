#pragma once
// QuantLinear: the CPU oracle of a quantized linear layer, y = x W^T computed straight
// from the packed codes of a QuantizedMatrix (quant_format.h).
#include <cstdint>
#include <vector>

#include "quant/quant_format.h"

namespace spear {

class QuantLinear {
 public:
  QuantLinear() = default;
  explicit QuantLinear(QuantizedMatrix m) : w(std::move(m)) {}

  QuantizedMatrix w;

  int64_t in_features() const { return w.K; }
  int64_t out_features() const { return w.N; }
  // scale * (q - zero) as float32, (N, K) row-major.
  std::vector<float> dequantize() const;
  // x: (M, K) row-major; y: (M, N) row-major, overwritten. Accumulates each group
  // in float32 on the integer (q - zero) values, then scales: y = sum_g s_g * sum (q-z) x.
  void forward(const float* x, int64_t M, float* y) const;
};

}  // namespace spear
