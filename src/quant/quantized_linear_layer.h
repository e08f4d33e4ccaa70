#pragma once
// A quantized module as the engine sees it: a Linear (model/linear.h) over a
// QuantLinear (quant_linear.h), so a LlamaModel can swap any of its seven modules
// per layer for a packed 2..8-bit one.
#include <cstdint>
#include <string>
#include <vector>

#include "model/linear.h"
#include "quant/quant_linear.h"

namespace spear {

class QuantizedLinearLayer final : public Linear {
 public:
  explicit QuantizedLinearLayer(QuantizedMatrix m);
  int64_t in_features() const override { return q_.in_features(); }
  int64_t out_features() const override { return q_.out_features(); }
  // Few rows (decode): QuantLinear's kernel straight from the packed codes. Many rows
  // (prefill, perplexity): the matrix is dequantized into a per-call scratch buffer and
  // multiplied with sgemm. Both give y = x · dequantize()ᵀ up to float summation order;
  // the resident weights stay packed either way.
  void forward(const float* x, int64_t M, float* y) const override;
  // Served bytes: packed codes + fp16 scales (+ fp16 zeros when asymmetric).
  int64_t weight_bytes() const override { return q_.w.serving_bytes(); }
  std::string kind() const override { return q_.w.scheme.name(); }

  const QuantizedMatrix& matrix() const { return q_.w; }
  std::vector<float> dequantize() const { return q_.dequantize(); }  // (out, in)

 private:
  QuantLinear q_;
};

}  // namespace spear
