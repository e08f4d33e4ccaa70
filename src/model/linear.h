#pragma once
// A linear layer y = W x applied to a batch of row vectors: Y (M, out) = X (M, in) · Wᵀ.
// The engine only sees this interface, so a dense float layer, a 4-bit QuantLinear
// and a 4-bit layer with an Error Compensator are interchangeable per module.
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "model/weights.h"

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
  virtual std::string kind() const = 0;  // "f32", "w4-pc-asym", "w4-pc-asym+ec(r=8)", ... (display)
  // Rank of this module's Error Compensator; 0 when it has none.
  virtual int64_t ec_rank() const { return 0; }
};

// Full-precision weights, computed in float32 (the reference engine's arithmetic).
// Held as float32, or — for a bf16/fp16 checkpoint — in the checkpoint's own 16-bit
// form, which widens to float32 exactly: the same numbers at half the bytes a decode
// step streams. Few rows (decode): a kernel straight from the 16-bit rows; many rows:
// widened into a scratch buffer once per call, then sgemm.
class DenseLinear final : public Linear {
 public:
  enum class Storage { F32, BF16, F16 };
  DenseLinear(int64_t out, int64_t in, std::vector<float> w);  // w: (out, in)
  // w16: (out, in) bf16 or fp16 bit patterns.
  DenseLinear(int64_t out, int64_t in, std::vector<uint16_t> w16, Storage storage);
  // A weight tensor (out, in) of the model description, F32, BF16 or F16: used in place
  // (a view of the mapped checkpoint stays a view) unless misaligned for its dtype.
  explicit DenseLinear(const WeightTensor& w);
  int64_t in_features() const override { return in_; }
  int64_t out_features() const override { return out_; }
  void forward(const float* x, int64_t M, float* y) const override;
  int64_t weight_bytes() const override { return out_ * in_ * (storage_ == Storage::F32 ? 4 : 2); }
  std::string kind() const override;
  Storage storage() const { return storage_; }
  // (out, in) as float32, a fresh copy (widened from 16-bit storage).
  std::vector<float> to_f32() const;

 private:
  int64_t out_, in_;
  Storage storage_ = Storage::F32;
  WeightTensor w_;  // (out, in) in `storage_`'s dtype
  const float* f32() const { return reinterpret_cast<const float*>(w_.data); }
  const uint16_t* h16() const { return reinterpret_cast<const uint16_t*>(w_.data); }
};

// Widens n 16-bit values (bf16 or fp16) to float32, exactly.
void widen_16(const uint16_t* src, int64_t n, DenseLinear::Storage s, float* dst);

// Y (M, N) = X (M, K) · Wᵀ with W (N, K), float32 (OpenBLAS sgemm; sgemv for M = 1).
void matmul_nt(const float* x, const float* w, float* y, int64_t M, int64_t K, int64_t N);

}  // namespace spear
