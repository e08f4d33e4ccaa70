#include "model/linear.h"

#include <cblas.h>
#include <omp.h>

#include <algorithm>
#include <mutex>

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
    : out_(out), in_(in), w_(std::move(w)) {
  SPEAR_CHECK(static_cast<int64_t>(w_.size()) == out * in, "DenseLinear: weight size mismatch");
}

void DenseLinear::forward(const float* x, int64_t M, float* y) const {
  matmul_nt(x, w_.data(), y, M, in_, out_);
}

}  // namespace spear
