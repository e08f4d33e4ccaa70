#include "model/linear.h"

#include <cblas.h>

#include "core/error.h"

namespace spear {

void matmul_nt(const float* x, const float* w, float* y, int64_t M, int64_t K, int64_t N) {
  if (M == 1) {
    cblas_sgemv(CblasRowMajor, CblasNoTrans, static_cast<int>(N), static_cast<int>(K), 1.0f, w,
                static_cast<int>(K), x, 1, 0.0f, y, 1);
    return;
  }
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(M), static_cast<int>(N),
              static_cast<int>(K), 1.0f, x, static_cast<int>(K), w, static_cast<int>(K), 0.0f, y,
              static_cast<int>(N));
}

DenseLinear::DenseLinear(int64_t out, int64_t in, std::vector<float> w)
    : out_(out), in_(in), w_(std::move(w)) {
  SPEAR_CHECK(static_cast<int64_t>(w_.size()) == out * in, "DenseLinear: weight size mismatch");
}

void DenseLinear::forward(const float* x, int64_t M, float* y) const {
  matmul_nt(x, w_.data(), y, M, in_, out_);
}

}  // namespace spear
