#include "quant/rtn.h"

#include <algorithm>
#include <cmath>
#include <string>

#include "core/error.h"

namespace spear {

QuantizedMatrix quantize_rtn(const float* w, int64_t N, int64_t K, const QuantScheme& scheme) {
  SPEAR_CHECK(scheme.bits >= 2 && scheme.bits <= 8,
              "quantize_rtn: bits must be in 2..8, got " + std::to_string(scheme.bits));
  SPEAR_CHECK(N > 0 && K > 0, "quantize_rtn: empty matrix");
  SPEAR_CHECK(scheme.group <= 0 || scheme.group >= 1, "quantize_rtn: bad group");
  QuantizedMatrix q;
  q.N = N;
  q.K = K;
  q.scheme = scheme;
  const int64_t gs = scheme.group_size(K), G = scheme.num_groups(K);
  q.codes.assign(static_cast<size_t>(N * q.row_bytes()), 0);
  q.scales.assign(static_cast<size_t>(N * G), 1.0f);
  q.zeros.assign(static_cast<size_t>(N * G), 0.0f);
  const int qmax = (1 << scheme.bits) - 1;
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    const float* row = w + n * K;
    for (int64_t g = 0; g < G; ++g) {
      const int64_t k0 = g * gs, k1 = std::min(K, k0 + gs);
      double lo = 0.0, hi = 0.0, amax = 0.0;
      bool finite = true;
      for (int64_t k = k0; k < k1; ++k) {
        const double v = row[k];
        finite = finite && std::isfinite(v);
        lo = std::min(lo, v);
        hi = std::max(hi, v);
        amax = std::max(amax, std::fabs(v));
      }
      if (!finite) continue;  // reported below (no throw inside an OpenMP region)
      float scale;
      double zero;
      if (scheme.symmetric) {
        scale = static_cast<float>(amax / static_cast<double>((1 << (scheme.bits - 1)) - 1));
        if (scale == 0.0f) scale = 1.0f;
        zero = static_cast<double>(1 << (scheme.bits - 1));
      } else {
        scale = static_cast<float>((hi - lo) / static_cast<double>(qmax));
        if (scale == 0.0f) scale = 1.0f;
        zero = std::nearbyint(-lo / static_cast<double>(scale));
      }
      q.scales[n * G + g] = scale;
      q.zeros[n * G + g] = static_cast<float>(zero);
      for (int64_t k = k0; k < k1; ++k) {
        double c = std::nearbyint(static_cast<double>(row[k]) / static_cast<double>(scale)) + zero;
        c = std::clamp(c, 0.0, static_cast<double>(qmax));
        q.set_code(n, k, static_cast<int>(c));
      }
    }
  }
  for (int64_t i = 0; i < N * K; ++i)
    SPEAR_CHECK(std::isfinite(w[i]), "quantize_rtn: non-finite weight at index " + std::to_string(i));
  return q;
}

std::vector<float> dequantize(const QuantizedMatrix& q) {
  std::vector<float> out(static_cast<size_t>(q.N * q.K));
  const int64_t gs = q.scheme.group_size(q.K), G = q.scheme.num_groups(q.K);
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < q.N; ++n)
    for (int64_t k = 0; k < q.K; ++k) {
      const int64_t g = k / gs;
      out[n * q.K + k] = q.scales[n * G + g] * (static_cast<float>(q.code(n, k)) - q.zeros[n * G + g]);
    }
  return out;
}

}  // namespace spear
