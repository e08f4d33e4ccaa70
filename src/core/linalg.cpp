#include "core/linalg.h"

#include <omp.h>

#include <string>

#include "core/error.h"

extern "C" {
void dsyevd_(const char* jobz, const char* uplo, const int* n, double* a, const int* lda, double* w,
             double* work, const int* lwork, int* iwork, const int* liwork, int* info);
void dpotrf_(const char* uplo, const int* n, double* a, const int* lda, int* info);
void dpotri_(const char* uplo, const int* n, double* a, const int* lda, int* info);
void dtrtri_(const char* uplo, const char* diag, const int* n, double* a, const int* lda, int* info);
int openblas_get_num_threads(void);
void openblas_set_num_threads(int);
}

namespace spear {

BlasThreadsScope::BlasThreadsScope() {
  if (omp_in_parallel()) return;
  const int want = omp_get_max_threads(), have = openblas_get_num_threads();
  if (want <= have) return;
  prev_ = have;
  openblas_set_num_threads(want);
}

BlasThreadsScope::~BlasThreadsScope() {
  if (prev_ > 0) openblas_set_num_threads(prev_);
}

// LAPACK is column-major; a symmetric matrix is its own transpose, so row-major input
// is fine, and "L" in column-major is "U" in row-major.

void sym_eig(const std::vector<double>& A, int64_t n, std::vector<double>& w,
             std::vector<double>& v) {
  SPEAR_CHECK(static_cast<int64_t>(A.size()) == n * n && n > 0, "sym_eig: bad matrix size");
  BlasThreadsScope blas;
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
  BlasThreadsScope blas;
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
  BlasThreadsScope blas;
  const int N = static_cast<int>(n);
  int info = 0;
  // Column-major lower L (A = L Lᵀ) is, read row-major, the upper U = Lᵀ with A = Uᵀ U.
  dpotrf_("L", &N, A.data(), &N, &info);
  SPEAR_CHECK(info == 0, "cholesky: matrix is not positive definite (dpotrf info " +
                             std::to_string(info) + ")");
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < i; ++j) A[i * n + j] = 0.0;
}

void inverse_cholesky_upper(std::vector<double>& A, int64_t n) {
  SPEAR_CHECK(static_cast<int64_t>(A.size()) == n * n && n > 0, "inverse_cholesky_upper: bad matrix size");
  // With J the reversal permutation and J A J = L Lᵀ (L lower), A⁻¹ = J L⁻ᵀ L⁻¹ J = Uᵀ U for
  // U = J L⁻¹ J, which is upper triangular with a positive diagonal: the Cholesky factor of
  // A⁻¹, from one factorisation and one triangular inverse (n³/3 each) instead of an
  // inverse (n³) and a second factorisation.
  std::vector<double> P(n * n);  // J A J (symmetric, so either layout)
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) P[i * n + j] = A[(n - 1 - i) * n + (n - 1 - j)];
  BlasThreadsScope blas;
  const int N = static_cast<int>(n);
  int info = 0;
  dpotrf_("L", &N, P.data(), &N, &info);  // column-major: P(i, j) = P[i + j n], i >= j holds L
  SPEAR_CHECK(info == 0, "inverse_cholesky_upper: matrix is not positive definite (dpotrf info " +
                             std::to_string(info) + ")");
  dtrtri_("L", "N", &N, P.data(), &N, &info);  // the lower triangle now holds M = L⁻¹
  SPEAR_CHECK(info == 0, "inverse_cholesky_upper: dtrtri failed (info " + std::to_string(info) + ")");
  // Row-major U[i][j] = M(n-1-i, n-1-j) = P[(n-1-i) + (n-1-j) n], zero below the diagonal.
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) A[i * n + j] = j < i ? 0.0 : P[(n - 1 - i) + (n - 1 - j) * n];
}

}  // namespace spear
