#include "quant/quant_linear.h"

#include <algorithm>

#include "quant/rtn.h"

namespace spear {

std::vector<float> QuantLinear::dequantize() const { return spear::dequantize(w); }

namespace {
// Codes of row n as floats. 4-bit rows (two codes per byte, even column in the low
// nibble) take a byte-wise path the compiler vectorizes; other widths go through
// the generic bit-stream accessor.
void unpack_row(const QuantizedMatrix& w, int64_t n, float* row) {
  const int64_t K = w.K;
  if (w.scheme.bits == 4) {
    const uint8_t* c = &w.codes[n * w.row_bytes()];
    for (int64_t i = 0; i < K / 2; ++i) {
      row[2 * i] = static_cast<float>(c[i] & 15);
      row[2 * i + 1] = static_cast<float>(c[i] >> 4);
    }
    if (K & 1) row[K - 1] = static_cast<float>(c[K / 2] & 15);
    return;
  }
  for (int64_t k = 0; k < K; ++k) row[k] = static_cast<float>(w.code(n, k));
}
}  // namespace

void QuantLinear::forward(const float* x, int64_t M, float* y) const {
  const int64_t N = w.N, K = w.K;
  const int64_t gs = w.scheme.group_size(K), G = w.scheme.num_groups(K);
#pragma omp parallel
  {
    std::vector<float> row(static_cast<size_t>(K));  // (q - zero) of one output row
#pragma omp for schedule(static)
    for (int64_t n = 0; n < N; ++n) {
      unpack_row(w, n, row.data());
      for (int64_t g = 0; g < G; ++g) {
        const float z = w.zeros[n * G + g];
        for (int64_t k = g * gs, k1 = std::min(K, k + gs); k < k1; ++k) row[k] -= z;
      }
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
