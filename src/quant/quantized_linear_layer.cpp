#include "quant/quantized_linear_layer.h"

#include <algorithm>

#include "core/error.h"

namespace spear {

namespace {

// Below this many rows the packed kernel is used as is; from here on the matrix is
// unpacked once per call and multiplied with sgemm. The AVX2 4-bit kernel beats
// unpack + sgemm up to 32 rows and more on mixlm and 7B shapes (bench/bench_quant_linear).
constexpr int64_t kDequantizeMinRows = 8;
constexpr int64_t kDequantizeMinRows4 = 64;

// scale * (q - zero) of the whole matrix into w (N, K). 4-bit rows are unpacked a byte
// (two codes) at a time; other widths go through QuantizedMatrix::code().
void dequantize_fast(const QuantizedMatrix& q, float* w) {
  const int64_t N = q.N, K = q.K, gs = q.scheme.group_size(K), G = q.scheme.num_groups(K);
  const int64_t rb = q.row_bytes();
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    float* out = w + n * K;
    if (q.scheme.bits == 4) {
      const uint8_t* row = q.codes.data() + n * rb;
      for (int64_t k = 0; k + 1 < K; k += 2) {
        out[k] = static_cast<float>(row[k >> 1] & 15);
        out[k + 1] = static_cast<float>(row[k >> 1] >> 4);
      }
      if (K & 1) out[K - 1] = static_cast<float>(row[(K - 1) >> 1] & 15);
    } else {
      for (int64_t k = 0; k < K; ++k) out[k] = static_cast<float>(q.code(n, k));
    }
    for (int64_t g = 0; g < G; ++g) {
      const float s = q.scales[n * G + g], z = q.zeros[n * G + g];
      const int64_t k1 = std::min(K, (g + 1) * gs);
      for (int64_t k = g * gs; k < k1; ++k) out[k] = s * (out[k] - z);
    }
  }
}

}  // namespace

QuantizedLinearLayer::QuantizedLinearLayer(QuantizedMatrix m) : q_(std::move(m)) {
  const QuantizedMatrix& w = q_.w;
  SPEAR_CHECK(w.N > 0 && w.K > 0, "QuantizedLinearLayer: empty matrix");
  SPEAR_CHECK(static_cast<int64_t>(w.codes.size()) == w.N * w.row_bytes(),
              "QuantizedLinearLayer: codes size does not match the shape");
  const int64_t G = w.scheme.num_groups(w.K);
  SPEAR_CHECK(static_cast<int64_t>(w.scales.size()) == w.N * G &&
                  static_cast<int64_t>(w.zeros.size()) == w.N * G,
              "QuantizedLinearLayer: scales/zeros size does not match the shape");
}

void QuantizedLinearLayer::forward(const float* x, int64_t M, float* y) const {
  if (M < (q_.w.scheme.bits == 4 ? kDequantizeMinRows4 : kDequantizeMinRows)) {
    q_.forward(x, M, y);
    return;
  }
  std::vector<float> w(q_.w.N * q_.w.K);  // (out, in) scratch, freed on return
  dequantize_fast(q_.w, w.data());
  matmul_nt(x, w.data(), y, M, q_.w.K, q_.w.N);
}

}  // namespace spear
