#pragma once
// The dense linear algebra calibration needs, in float64 on small matrices (n <= a few
// thousand): symmetric eigendecomposition, Cholesky factorisation and inverse. Thin
// wrappers over the LAPACK routines inside OpenBLAS; failures throw spear::Error.
#include <cstdint>
#include <vector>

namespace spear {

// A (n, n) symmetric, row-major. Returns eigenvalues ascending in `w` (n) and the
// eigenvectors as the ROWS of `v` (n, n): v[i] is the eigenvector of w[i].
void sym_eig(const std::vector<double>& A, int64_t n, std::vector<double>& w, std::vector<double>& v);
// In place: A (n, n) symmetric positive definite -> its inverse. Throws when A is not
// positive definite.
void spd_inverse(std::vector<double>& A, int64_t n);
// In place: A (n, n) symmetric positive definite -> the upper-triangular U with
// A = Uᵀ U (row-major; the strict lower triangle is zeroed).
void cholesky_upper(std::vector<double>& A, int64_t n);

}  // namespace spear
