#include "quant/quant_linear.h"

#include <immintrin.h>
#include <omp.h>

#include <algorithm>

#include "core/simd.h"
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

void QuantLinear::forward_reference(const float* x, int64_t M, float* y) const {
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

namespace {

// y (R, N) = x (R, K) Q^T for R <= 8 rows of x and 4-bit codes, every group starting at a
// multiple of 16 columns: per group, s_g * sum_k (q_k - z_g) x_k, each weight row read
// once for all R rows. 16 codes = 8 bytes: the low and the high nibbles are split,
// interleaved back into column order (unpacklo_epi8: lo0 hi0 lo1 hi1 ... = columns 0, 1,
// 2, 3, ...) and widened to 2 x 8 floats. The zero is subtracted before the products
// (folding it in as z * sum(x) afterwards cancels badly in float32).
template <int R>
void forward4(const QuantizedMatrix& w, const float* x, float* y) {
  const int64_t N = w.N, K = w.K, rb = w.row_bytes();
  const int64_t gs = w.scheme.group_size(K), G = w.scheme.num_groups(K);
  const __m128i low4 = _mm_set1_epi8(0x0f);
#pragma omp parallel for schedule(static) if (N * K >= (1 << 16) && !omp_in_parallel())
  for (int64_t n = 0; n < N; ++n) {
    const uint8_t* c = &w.codes[n * rb];
    float out[R] = {};
    for (int64_t g = 0; g < G; ++g) {
      const int64_t k0 = g * gs, k1 = std::min(K, k0 + gs), k16 = k0 + (k1 - k0) / 16 * 16;
      const float s = w.scales[n * G + g], z = w.zeros[n * G + g];
      const __m256 zv = _mm256_set1_ps(z);
      __m256 acc[R];
      for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
      for (int64_t k = k0; k < k16; k += 16) {
        const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(c + k / 2));
        const __m128i lo = _mm_and_si128(b, low4), hi = _mm_and_si128(_mm_srli_epi16(b, 4), low4);
        const __m128i q16 = _mm_unpacklo_epi8(lo, hi);  // 16 codes in column order
        const __m256 q0 = _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(q16)), zv);
        const __m256 q1 = _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(q16, 8))), zv);
        for (int r = 0; r < R; ++r) {
          acc[r] = _mm256_fmadd_ps(q0, _mm256_loadu_ps(x + r * K + k), acc[r]);
          acc[r] = _mm256_fmadd_ps(q1, _mm256_loadu_ps(x + r * K + k + 8), acc[r]);
        }
      }
      for (int r = 0; r < R; ++r) {
        float d = hsum8(acc[r]);
        for (int64_t k = k16; k < k1; ++k)
          d += (static_cast<float>((c[k / 2] >> (4 * (k & 1))) & 15) - z) * x[r * K + k];
        out[r] += s * d;
      }
    }
    for (int r = 0; r < R; ++r) y[r * N + n] = out[r];
  }
}

}  // namespace

void QuantLinear::forward(const float* x, int64_t M, float* y) const {
  const int64_t K = w.K, gs = w.scheme.group_size(K), G = w.scheme.num_groups(K);
  if (w.scheme.bits != 4 || (G > 1 && gs % 16 != 0) || M > 64) {
    forward_reference(x, M, y);
    return;
  }
  for (int64_t m0 = 0; m0 < M; m0 += 8) {
    const float* xr = x + m0 * K;
    float* yr = y + m0 * w.N;
    switch (std::min<int64_t>(8, M - m0)) {
      case 1: forward4<1>(w, xr, yr); break;
      case 2: forward4<2>(w, xr, yr); break;
      case 3: forward4<3>(w, xr, yr); break;
      case 4: forward4<4>(w, xr, yr); break;
      case 5: forward4<5>(w, xr, yr); break;
      case 6: forward4<6>(w, xr, yr); break;
      case 7: forward4<7>(w, xr, yr); break;
      default: forward4<8>(w, xr, yr); break;
    }
  }
}

}  // namespace spear
