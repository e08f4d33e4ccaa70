#include "core/linalg.h"

#include <string>

#include "core/error.h"

extern "C" {
void dsyevd_(const char* jobz, const char* uplo, const int* n, double* a, const int* lda, double* w,
             double* work, const int* lwork, int* iwork, const int* liwork, int* info);
void dpotrf_(const char* uplo, const int* n, double* a, const int* lda, int* info);
void dpotri_(const char* uplo, const int* n, double* a, const int* lda, int* info);
}

namespace spear {

// LAPACK is column-major; a symmetric matrix is its own transpose, so row-major input
// is fine, and "L" in column-major is "U" in row-major.

void sym_eig(const std::vector<double>& A, int64_t n, std::vector<double>& w,
             std::vector<double>& v) {
  SPEAR_CHECK(static_cast<int64_t>(A.size()) == n * n && n > 0, "sym_eig: bad matrix size");
  v = A;
  w.assign(n, 0.0);
  const int N = static_cast<int>(n);
  int info = 0, lwork = -1, liwork = -1, iwq = 0;
  double wq = 0;
  dsyevd_("V", "L", &N, v.data(), &N, w.data(), &wq, &lwork, &iwq, &liwork, &info);
  lwork = static_cast<int>(wq) + 1;
  liwork = iwq + 1;
  std::vector<double> work(lwork);
  std::vector<int> iwork(liwork);
  dsyevd_("V", "L", &N, v.data(), &N, w.data(), work.data(), &lwork, iwork.data(), &liwork, &info);
  SPEAR_CHECK(info == 0, "sym_eig: LAPACK dsyevd failed (info " + std::to_string(info) + ")");
  // Column-major eigenvector columns are row-major rows: v[i*n..] is eigenvector i.
}

void spd_inverse(std::vector<double>& A, int64_t n) {
  const int N = static_cast<int>(n);
  int info = 0;
  dpotrf_("L", &N, A.data(), &N, &info);
  SPEAR_CHECK(info == 0, "spd_inverse: matrix is not positive definite (dpotrf info " +
                             std::to_string(info) + ")");
  dpotri_("L", &N, A.data(), &N, &info);
  SPEAR_CHECK(info == 0, "spd_inverse: dpotri failed (info " + std::to_string(info) + ")");
  // Column-major lower = row-major upper holds the result: mirror it.
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < i; ++j) A[i * n + j] = A[j * n + i];
}

void cholesky_upper(std::vector<double>& A, int64_t n) {
  const int N = static_cast<int>(n);
  int info = 0;
  // Column-major lower L (A = L Lᵀ) is, read row-major, the upper U = Lᵀ with A = Uᵀ U.
  dpotrf_("L", &N, A.data(), &N, &info);
  SPEAR_CHECK(info == 0, "cholesky: matrix is not positive definite (dpotrf info " +
                             std::to_string(info) + ")");
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < i; ++j) A[i * n + j] = 0.0;
}

}  // namespace spear
