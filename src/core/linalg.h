#pragma once
// The dense linear algebra calibration needs, in float64 on small matrices (n <= a few
// thousand): symmetric eigendecomposition, Cholesky factorisation and inverse. Thin
// wrappers over the LAPACK routines inside OpenBLAS; failures throw spear::Error.
#include <cstdint>
#include <vector>

namespace spear {

// spear runs OpenBLAS single-threaded and splits work across OpenMP threads itself
// (model/linear.cpp: two thread pools side by side halve throughput). A large
// factorisation or float64 product called outside an OpenMP region has no such split, so
// this lends OpenBLAS every OpenMP thread for its scope and restores the previous count at
// the end. Inside a parallel region it does nothing.
class BlasThreadsScope {
 public:
  BlasThreadsScope();
  ~BlasThreadsScope();
  BlasThreadsScope(const BlasThreadsScope&) = delete;
  BlasThreadsScope& operator=(const BlasThreadsScope&) = delete;

 private:
  int prev_ = 0;  // 0: nothing to restore
};


// A (n, n) symmetric, row-major. Returns eigenvalues ascending in `w` (n) and the
// eigenvectors as the ROWS of `v` (n, n): v[i] is the eigenvector of w[i].
void sym_eig(const std::vector<double>& A, int64_t n, std::vector<double>& w, std::vector<double>& v);
// In place: A (n, n) symmetric positive definite -> its inverse. Throws when A is not
// positive definite.
void spd_inverse(std::vector<double>& A, int64_t n);
// In place: A (n, n) symmetric positive definite -> the upper-triangular U with
// A = Uᵀ U (row-major; the strict lower triangle is zeroed).
void cholesky_upper(std::vector<double>& A, int64_t n);
// In place: A (n, n) symmetric positive definite -> the upper-triangular U with
// A⁻¹ = Uᵀ U (row-major; the strict lower triangle zeroed): cholesky_upper of the
// inverse, at 2/5 of the cost of spd_inverse followed by cholesky_upper.
void inverse_cholesky_upper(std::vector<double>& A, int64_t n);

}  // namespace spear
