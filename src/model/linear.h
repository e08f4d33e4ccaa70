#pragma once
// A linear layer y = W x applied to a batch of row vectors: Y (M, out) = X (M, in) · Wᵀ.
// The engine only sees this interface, so a dense float layer, a 4-bit QuantLinear
// and a 4-bit layer with an Error Compensator are interchangeable per module.
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace spear {

class Linear {
 public:
  virtual ~Linear() = default;
  virtual int64_t in_features() const = 0;
  virtual int64_t out_features() const = 0;
  // x: (M, in) row-major, y: (M, out) row-major, overwritten.
  virtual void forward(const float* x, int64_t M, float* y) const = 0;
  // Bytes of weights this layer keeps resident (for `spear info` and budgets).
  virtual int64_t weight_bytes() const = 0;
  virtual std::string kind() const = 0;  // "f32", "w4-pc-asym", "w4-pc-asym+ec(r=8)", ...
};

// Full-precision weights held as float32 (the reference engine's arithmetic).
class DenseLinear final : public Linear {
 public:
  DenseLinear(int64_t out, int64_t in, std::vector<float> w);  // w: (out, in)
  int64_t in_features() const override { return in_; }
  int64_t out_features() const override { return out_; }
  void forward(const float* x, int64_t M, float* y) const override;
  int64_t weight_bytes() const override { return out_ * in_ * 4; }
  std::string kind() const override { return "f32"; }
  const std::vector<float>& weight() const { return w_; }  // (out, in)

 private:
  int64_t out_, in_;
  std::vector<float> w_;  // (out, in)
};

// Y (M, N) = X (M, K) · Wᵀ with W (N, K), float32 (OpenBLAS sgemm; sgemv for M = 1).
void matmul_nt(const float* x, const float* w, float* y, int64_t M, int64_t K, int64_t N);

}  // namespace spear
