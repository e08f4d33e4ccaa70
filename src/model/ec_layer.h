#pragma once
// A quantized module with a gated Error Compensator, as the CPU engine runs it
// (the EC and its gate: model/ec_params.h).
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "model/ec_params.h"
#include "model/linear.h"

namespace spear {

// A module with an EC: base (a quantized layer) plus the gated low-rank term.
class ECLinear final : public Linear {
 public:
  ECLinear(std::unique_ptr<Linear> base, ECParams ec);
  int64_t in_features() const override { return base_->in_features(); }
  int64_t out_features() const override { return base_->out_features(); }
  void forward(const float* x, int64_t M, float* y) const override;
  int64_t weight_bytes() const override { return base_->weight_bytes() + ec_.bytes(); }
  std::string kind() const override;  // "w4-pc-asym+ec(r=8,gated)"
  int64_t ec_rank() const override { return ec_.rank; }
  const Linear& base() const { return *base_; }
  const ECParams& ec() const { return ec_; }

 private:
  std::unique_ptr<Linear> base_;
  ECParams ec_;
};

}  // namespace spear
