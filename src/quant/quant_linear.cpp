#include "quant/quant_linear.h"

#include <algorithm>

#include "quant/rtn.h"

namespace spear {

std::vector<float> QuantLinear::dequantize() const { return spear::dequantize(w); }

void QuantLinear::forward(const float* x, int64_t M, float* y) const {
  const int64_t N = w.N, K = w.K;
  const int64_t gs = w.scheme.group_size(K), G = w.scheme.num_groups(K);
#pragma omp parallel
  {
    std::vector<float> row(static_cast<size_t>(K));  // (q - zero) of one output row
#pragma omp for schedule(static)
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t k = 0; k < K; ++k)
        row[k] = static_cast<float>(w.code(n, k)) - w.zeros[n * G + k / gs];
      for (int64_t m = 0; m < M; ++m) {
        const float* xm = x + m * K;
        float acc = 0.0f;
        for (int64_t g = 0; g < G; ++g) {
          const int64_t k0 = g * gs, k1 = std::min(K, k0 + gs);
          float s = 0.0f;
#pragma omp simd reduction(+ : s)
          for (int64_t k = k0; k < k1; ++k) s += row[k] * xm[k];
          acc += w.scales[n * G + g] * s;
        }
        y[m * N + n] = acc;
      }
    }
  }
}

}  // namespace spear
