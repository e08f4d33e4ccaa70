#pragma once
// QuantLinear: the CPU oracle of a quantized linear layer, y = x W^T computed straight
// from the packed codes of a QuantizedMatrix (quant_format.h).
#include <cstdint>
#include <vector>

#include "core/quant_format.h"

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
  // in float32, then scales: y = sum_g s_g * sum_k (q_k - z_g) x_k. 4-bit codes take an
  // AVX2 kernel (below); every width falls back to forward_reference().
  void forward(const float* x, int64_t M, float* y) const;
  // The plain kernel: unpack a row of codes to floats, subtract the zero, dot. The
  // consistency baseline of the fast path (tests, bench/bench_quant_linear).
  void forward_reference(const float* x, int64_t M, float* y) const;
};

}  // namespace spear
