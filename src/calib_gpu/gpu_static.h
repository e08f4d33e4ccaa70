#pragma once
// The static control on the GPU (issue 12): compensate/static_control.h's SiteStats,
// whiten and fit_static with the moments, the whitening and the fits' large products in
// device memory. float64 as the CPU; cuBLAS DGEMM for the products and cuSOLVER's
// syevd for the eigendecompositions (the site's R, then the smaller Gram matrix of M).
// Only the fit's factors (max_rank rows) come back to the host, where the CPU's last step
// (finish_static_fit: sign, S^½ balance, float) runs on them, so a GPU fit equals the CPU's
// to float64 rounding of different summation orders, the sign included.
//
// A window's moments are summed in float (one SGEMM of its rows, as the CPU's SiteStats::add)
// and added into the float64 sums.
#include <cstdint>

#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <cusolverDn.h>

#include "calib_gpu/dev_buf.h"
#include "compensate/static_control.h"

namespace spear::calib_gpu {

// SiteStats on the device.
struct DevSiteStats {
  int64_t in = 0;
  int64_t tokens = 0;
  DevBuf Rqq, Sfq, Sff;  // (in, in) double each: Σ x_q x_qᵀ, Σ x_fp x_qᵀ, Σ x_fp x_fpᵀ
};

// Whitening on the device.
struct DevWhitening {
  int64_t in = 0;
  DevBuf R_inv_half, R_half;  // (in, in) double each
};

class GpuStatic {
 public:
  // Uses `blas` (its stream must be `stream`; math mode as set by the caller) and makes its
  // own cuSOLVER handle on `stream`.
  GpuStatic(cublasHandle_t blas, cudaStream_t stream);
  ~GpuStatic();
  GpuStatic(const GpuStatic&) = delete;
  GpuStatic& operator=(const GpuStatic&) = delete;

  void reset(DevSiteStats& s, int64_t in) const;
  // Adds one window: xf, xq (rows, in) device.
  void add(DevSiteStats& s, const float* xf, const float* xq, int64_t rows) const;
  // whiten() of the device moments.
  void whiten(const DevSiteStats& s, double damp, DevWhitening& wh) const;
  // fit_static() with W, Q (out, in) device float.
  StaticFit fit(const float* W, const float* Q, int64_t out, int64_t in, const DevSiteStats& s,
                const DevWhitening& wh, int64_t max_rank, StaticMode mode) const;

 private:
  // Row-major C (M, N) = alpha · op(A) · op(B) + beta · C in double (lda, ldb, ldc: row strides).
  void dgemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, double alpha, const double* A, int64_t lda,
             const double* B, int64_t ldb, double beta, double* C, int64_t ldc) const;
  // Σ a_i b_i over n doubles (synchronizes).
  double dot(const double* a, const double* b, int64_t n) const;
  // In place: A (n, n) symmetric -> its eigenvectors as rows; w (n) device the eigenvalues,
  // ascending (sym_eig's convention).
  void eig(double* A, int64_t n, double* w) const;

  cublasHandle_t blas_;
  cudaStream_t st_;
  cusolverDnHandle_t sol_ = nullptr;
  mutable DevBuf work_, info_;        // syevd's workspace and status
  mutable DevBuf g32_;                // (in, in) float: one window's sum
  mutable DevBuf R_, Vs_, w_;         // whiten(): (n, n), (n, n), (n)
  mutable DevBuf dW_, Wd_, Qd_, X_, T1_, M_;  // fit(): (out, in) double each
  mutable DevBuf G_, ev_, Vr_, US_, Aw_;     // fit(): Gram, eigenvalues, factors
};

}  // namespace spear::calib_gpu
