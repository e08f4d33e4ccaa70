#include "model/linear.h"

#include <cblas.h>
#include <omp.h>

#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <mutex>

#include "core/simd.h"
#include "core/dtype.h"
#include "core/error.h"

extern "C" void openblas_set_num_threads(int);

namespace spear {

// OpenBLAS keeps its own thread pool; next to OpenMP's that makes 2x as many
// spinning threads as cores, which halves throughput on a small machine. So BLAS
// runs single-threaded and the output columns are split across OpenMP threads.
void matmul_nt(const float* x, const float* w, float* y, int64_t M, int64_t K, int64_t N) {
  static std::once_flag once;
  std::call_once(once, [] { openblas_set_num_threads(1); });
  const int threads = (M * K * N < (1 << 16) || omp_in_parallel()) ? 1 : omp_get_max_threads();
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    // Column slices in multiples of 16 so each thread's panel stays vector-aligned.
    const int64_t step = ((N + nt - 1) / nt + 15) / 16 * 16;
    const int64_t n0 = std::min<int64_t>(N, t * step), n1 = std::min<int64_t>(N, n0 + step);
    if (n1 > n0) {
      if (M == 1) {
        cblas_sgemv(CblasRowMajor, CblasNoTrans, static_cast<int>(n1 - n0), static_cast<int>(K),
                    1.0f, w + n0 * K, static_cast<int>(K), x, 1, 0.0f, y + n0, 1);
      } else {
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(M),
                    static_cast<int>(n1 - n0), static_cast<int>(K), 1.0f, x, static_cast<int>(K),
                    w + n0 * K, static_cast<int>(K), 0.0f, y + n0, static_cast<int>(N));
      }
    }
  }
}

DenseLinear::DenseLinear(int64_t out, int64_t in, std::vector<float> w)
    : out_(out), in_(in), w_(WeightTensor::from_f32({out, in}, std::move(w))) {}

DenseLinear::DenseLinear(int64_t out, int64_t in, std::vector<uint16_t> w16, Storage storage)
    : out_(out), in_(in), storage_(storage) {
  SPEAR_CHECK(storage != Storage::F32, "DenseLinear: 16-bit storage expected");
  SPEAR_CHECK(static_cast<int64_t>(w16.size()) == out * in, "DenseLinear: weight size mismatch");
  std::vector<uint8_t> bytes(w16.size() * 2);
  std::memcpy(bytes.data(), w16.data(), bytes.size());
  w_ = WeightTensor::owned(storage == Storage::BF16 ? DType::BF16 : DType::F16, {out, in}, std::move(bytes));
}

DenseLinear::DenseLinear(const WeightTensor& w) : w_(w) {
  SPEAR_CHECK(w.shape.size() == 2, "DenseLinear: the weight must be a matrix");
  out_ = w.shape[0];
  in_ = w.shape[1];
  switch (w.dtype) {
    case DType::F32: storage_ = Storage::F32; break;
    case DType::BF16: storage_ = Storage::BF16; break;
    case DType::F16: storage_ = Storage::F16; break;
    default: throw Error("DenseLinear: weights must be F32, BF16 or F16");
  }
  const size_t align = storage_ == Storage::F32 ? alignof(float) : alignof(uint16_t);
  if (reinterpret_cast<uintptr_t>(w.data) % align != 0)  // a view at an odd offset: copy
    w_ = WeightTensor::owned(w.dtype, w.shape, std::vector<uint8_t>(w.data, w.data + w.nbytes));
}

std::string DenseLinear::kind() const {
  return storage_ == Storage::F32 ? "f32" : storage_ == Storage::BF16 ? "bf16" : "f16";
}

namespace {

// 8 consecutive 16-bit weights as 8 floats. bf16 is the top half of a float32 (shift left
// 16); fp16 widens with F16C. Both are exact.
inline __m256 load8(const uint16_t* p, DenseLinear::Storage s) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  if (s == DenseLinear::Storage::BF16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  return _mm256_cvtph_ps(h);
}

inline float widen1(uint16_t v, DenseLinear::Storage s) {
  return s == DenseLinear::Storage::BF16 ? bf16_to_f32(v) : f16_to_f32(v);
}

// y (R, N) = x (R, K) W^T for R <= 8 rows, W (N, K) 16-bit: each weight row is read once
// for all R rows of x. Output rows split across OpenMP threads.
template <int R>
void gemv16(const float* x, const uint16_t* w, float* y, int64_t K, int64_t N, DenseLinear::Storage s) {
  const int64_t K8 = K / 8 * 8;
#pragma omp parallel for schedule(static) if (N * K >= (1 << 16) && !omp_in_parallel())
  for (int64_t n = 0; n < N; ++n) {
    const uint16_t* wr = w + n * K;
    __m256 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K8; k += 8) {
      const __m256 wv = load8(wr + k, s);
      for (int r = 0; r < R; ++r) acc[r] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + r * K + k), acc[r]);
    }
    for (int r = 0; r < R; ++r) {
      float t = hsum8(acc[r]);
      for (int64_t k = K8; k < K; ++k) t += widen1(wr[k], s) * x[r * K + k];
      y[r * N + n] = t;
    }
  }
}

}  // namespace

void widen_16(const uint16_t* src, int64_t n, DenseLinear::Storage s, float* dst) {
  const int64_t n8 = n / 8 * 8;
#pragma omp parallel for schedule(static) if (n >= (1 << 18) && !omp_in_parallel())
  for (int64_t i = 0; i < n8; i += 8) _mm256_storeu_ps(dst + i, load8(src + i, s));
  for (int64_t i = n8; i < n; ++i) dst[i] = widen1(src[i], s);
}

std::vector<float> DenseLinear::to_f32() const { return w_.to_f32(); }

void DenseLinear::forward(const float* x, int64_t M, float* y) const {
  if (storage_ == Storage::F32) {
    matmul_nt(x, f32(), y, M, in_, out_);
    return;
  }
  if (M <= 32) {  // decode and small batches: straight from the 16-bit rows, 8 rows of x at a time
    for (int64_t m0 = 0; m0 < M; m0 += 8) {
      const int64_t r = std::min<int64_t>(8, M - m0);
      const float* xr = x + m0 * in_;
      float* yr = y + m0 * out_;
      switch (r) {
        case 1: gemv16<1>(xr, h16(), yr, in_, out_, storage_); break;
        case 2: gemv16<2>(xr, h16(), yr, in_, out_, storage_); break;
        case 3: gemv16<3>(xr, h16(), yr, in_, out_, storage_); break;
        case 4: gemv16<4>(xr, h16(), yr, in_, out_, storage_); break;
        case 5: gemv16<5>(xr, h16(), yr, in_, out_, storage_); break;
        case 6: gemv16<6>(xr, h16(), yr, in_, out_, storage_); break;
        case 7: gemv16<7>(xr, h16(), yr, in_, out_, storage_); break;
        default: gemv16<8>(xr, h16(), yr, in_, out_, storage_); break;
      }
    }
    return;
  }
  // Many rows: widen once into a per-thread scratch buffer, then sgemm.
  thread_local std::vector<float> scratch;
  scratch.resize(static_cast<size_t>(out_ * in_));
  widen_16(h16(), out_ * in_, storage_, scratch.data());
  matmul_nt(x, scratch.data(), y, M, in_, out_);
}

}  // namespace spear
