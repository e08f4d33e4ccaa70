#include "calib_gpu/gpu_static.h"

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "calib_gpu/static_kernels.h"
#include "core/error.h"

namespace spear::calib_gpu {

namespace {

void solver_ok(cusolverStatus_t s, const char* what) {
  if (s != CUSOLVER_STATUS_SUCCESS)
    throw Error(std::string("GPU calibration: cuSOLVER ") + what + " failed (status " +
                std::to_string(static_cast<int>(s)) + ")");
}

// n doubles of device memory to the host (in stream order, then synchronized).
std::vector<double> download_doubles(const double* dev, int64_t n, cudaStream_t st) {
  std::vector<double> h(n);  // (n)
  if (n) cuda_ok(cudaMemcpyAsync(h.data(), dev, n * sizeof(double), cudaMemcpyDeviceToHost, st), "download");
  cuda_ok(cudaStreamSynchronize(st), "download");
  return h;
}

}  // namespace

GpuStatic::GpuStatic(cublasHandle_t blas, cudaStream_t stream) : blas_(blas), st_(stream) {
  solver_ok(cusolverDnCreate(&sol_), "create");
  solver_ok(cusolverDnSetStream(sol_, st_), "set stream");
}

GpuStatic::~GpuStatic() {
  if (sol_) cusolverDnDestroy(sol_);
}

void GpuStatic::dgemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, double alpha, const double* A,
                      int64_t lda, const double* B, int64_t ldb, double beta, double* C, int64_t ldc) const {
  gemm_rm(blas_, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

double GpuStatic::dot(const double* a, const double* b, int64_t n) const {
  double r = 0;
  SPEAR_CHECK(n < (int64_t{1} << 31), "GPU calibration: a fit larger than cuBLAS's int sizes");
  blas_ok(cublasDdot(blas_, static_cast<int>(n), a, 1, b, 1, &r), "ddot");  // host pointer: synchronizes
  return r;
}

void GpuStatic::eig(double* A, int64_t n, double* w) const {
  int lwork = 0;
  const int ni = static_cast<int>(n);
  solver_ok(cusolverDnDsyevd_bufferSize(sol_, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_LOWER, ni, A, ni, w, &lwork),
            "syevd buffer size");
  double* work = work_.doubles(lwork);
  info_.ensure(sizeof(int));
  int* info = static_cast<int*>(static_cast<void*>(info_.i()));
  // Symmetric: the column-major matrix is the row-major one. Out: column j of the
  // column-major A is eigenvector j, i.e. row j of the row-major A.
  solver_ok(cusolverDnDsyevd(sol_, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_LOWER, ni, A, ni, w, work, lwork, info),
            "syevd");
  int h = 0;
  cuda_ok(cudaMemcpyAsync(&h, info, sizeof(int), cudaMemcpyDeviceToHost, st_), "syevd info");
  cuda_ok(cudaStreamSynchronize(st_), "syevd");
  SPEAR_CHECK(h == 0, "GPU calibration: the eigendecomposition of a " + std::to_string(n) + "x" + std::to_string(n) +
                          " matrix failed (cuSOLVER syevd info " + std::to_string(h) + ")");
}

void GpuStatic::reset(DevSiteStats& s, int64_t in) const {
  s.in = in;
  s.tokens = 0;
  for (DevBuf* b : {&s.Rqq, &s.Sfq, &s.Sff})
    cuda_ok(cudaMemsetAsync(b->doubles(in * in), 0, in * in * sizeof(double), st_), "moments reset");
}

void GpuStatic::add(DevSiteStats& s, const float* xf, const float* xq, int64_t rows) const {
  const int64_t n = s.in;
  float* g = g32_.floats(n * n);  // (in, in) one window's sum, float as SiteStats::add
  auto acc = [&](const float* a, const float* b, DevBuf& dst) {
    gemm_rm(blas_, true, false, n, n, rows, 1.0f, a, n, b, n, 0.0f, g, n);  // g = aᵀ b
    cuda_ok(add_f32_to_f64(g, dst.d(), n * n, st_), "moments add");
  };
  acc(xq, xq, s.Rqq);
  acc(xf, xq, s.Sfq);
  acc(xf, xf, s.Sff);
  s.tokens += rows;
}

void GpuStatic::whiten(const DevSiteStats& s, double damp, DevWhitening& wh) const {
  SPEAR_CHECK(s.tokens > 0, "static control: no calibration tokens");
  const int64_t n = s.in;
  double* R = R_.doubles(n * n);  // (n, n) damped E[x_q x_qᵀ], then its eigenvectors as rows
  double* w = w_.doubles(n);      // (n) eigenvalues
  cuda_ok(damped_mean(s.Rqq.d(), R, n, static_cast<double>(s.tokens), damp, st_), "damped mean");
  eig(R, n, w);
  double* Vs = Vs_.doubles(n * n);  // (n, n) row i scaled by w_i^e
  wh.in = n;
  // R^e = Vᵀ diag(w^e) V with V's rows the eigenvectors.
  auto power = [&](double e, DevBuf& dst) {
    cuda_ok(scale_rows_pow(R, w, e, Vs, n, st_), "scale rows");
    dgemm(true, false, n, n, n, 1.0, R, n, Vs, n, 0.0, dst.doubles(n * n), n);
  };
  power(-0.5, wh.R_inv_half);
  power(0.5, wh.R_half);
}

StaticFit GpuStatic::fit(const float* W, const float* Q, int64_t out, int64_t in, const DevSiteStats& s,
                         const DevWhitening& wh, int64_t max_rank, StaticMode mode) const {
  SPEAR_CHECK(s.in == in && wh.in == in, "static control: site width does not match the module");
  const double N = static_cast<double>(s.tokens);
  const int64_t n = out * in;
  double* M = M_.doubles(n);  // (out, in) the whitened target
  double energy = 0;
  if (mode == StaticMode::Rrr) {
    double* Wd = Wd_.doubles(n);  // (out, in) each
    double* Qd = Qd_.doubles(n);
    double* X = X_.doubles(n);
    double* T1 = T1_.doubles(n);
    cuda_ok(sub_f32_to_f64(W, nullptr, Wd, n, st_), "W to double");
    cuda_ok(sub_f32_to_f64(Q, nullptr, Qd, n, st_), "Q to double");
    // X = (W Sfq − Q Rqq) / N;  E‖e‖² = tr(W Sff Wᵀ − 2 W Sfq Qᵀ + Q Rqq Qᵀ) / N
    dgemm(false, false, out, in, in, 1.0 / N, Wd, in, s.Sfq.d(), in, 0.0, X, in);
    const double wsq = dot(X, Qd, n);
    dgemm(false, false, out, in, in, 1.0 / N, Qd, in, s.Rqq.d(), in, 0.0, T1, in);
    const double qrq = dot(T1, Qd, n);
    const double minus1 = -1.0;
    blas_ok(cublasDaxpy(blas_, static_cast<int>(n), &minus1, T1, 1, X, 1), "daxpy");
    dgemm(false, false, out, in, in, 1.0 / N, Wd, in, s.Sff.d(), in, 0.0, T1, in);
    const double wsw = dot(T1, Wd, n);
    energy = wsw - 2 * wsq + qrq;
    dgemm(false, false, out, in, in, 1.0, X, in, wh.R_inv_half.d(), in, 0.0, M, in);  // M = X R^-½
  } else {
    double* dW = dW_.doubles(n);  // (out, in) W − Q
    cuda_ok(sub_f32_to_f64(W, Q, dW, n, st_), "W - Q");
    dgemm(false, false, out, in, in, 1.0, dW, in, wh.R_half.d(), in, 0.0, M, in);  // M = ΔW R^½
    energy = dot(M, M, n);
  }
  StaticFit f = StaticFit::sized(out, in, max_rank, energy);
  const int64_t rmax = f.max_rank;
  if (rmax <= 0) return f;
  // The top rmax eigenvectors of the smaller Gram matrix (rows of G after eig, ascending:
  // the last rmax rows, reversed) as in fit_static.
  const int64_t g = std::min(in, out);
  double* G = G_.doubles(g * g);  // (g, g)
  if (in <= out)
    dgemm(true, false, in, in, out, 1.0, M, in, M, in, 0.0, G, in);  // MᵀM
  else
    dgemm(false, true, out, out, in, 1.0, M, in, M, in, 0.0, G, out);  // M Mᵀ
  eig(G, g, ev_.doubles(g));
  const std::vector<double> ev = download_doubles(ev_.d(), g, st_);
  double* top = Vr_.doubles(rmax * g);  // (rmax, g) the top eigenvectors, descending
  for (int64_t k = 0; k < rmax; ++k) {
    f.sigma2[k] = std::max(ev[g - 1 - k], 0.0);
    cuda_ok(cudaMemcpyAsync(top + k * g, G + (g - 1 - k) * g, g * sizeof(double), cudaMemcpyDeviceToDevice, st_),
            "top eigenvectors");
  }
  double* Aw = Aw_.doubles(rmax * in);  // (rmax, in)
  std::vector<double> Aw_h, US_h;       // host (rmax, in), (out, rmax)
  if (in <= out) {
    // top = V_rᵀ; U S = M V; Aw = V_rᵀ R^-½.
    double* US = US_.doubles(out * rmax);  // (out, rmax)
    dgemm(false, true, out, rmax, in, 1.0, M, in, top, in, 0.0, US, rmax);
    dgemm(false, false, rmax, in, in, 1.0, top, in, wh.R_inv_half.d(), in, 0.0, Aw, in);
    US_h = download_doubles(US, out * rmax, st_);
    Aw_h = download_doubles(Aw, rmax * in, st_);
  } else {
    // top = U_rᵀ; S Vᵀ = Uᵀ M, so Vᵀ R^-½ = (Uᵀ M R^-½) / σ row by row; U S = U σ.
    double* SVt = US_.doubles(rmax * in);  // (rmax, in)
    dgemm(false, false, rmax, in, out, 1.0, top, out, M, in, 0.0, SVt, in);
    dgemm(false, false, rmax, in, in, 1.0, SVt, in, wh.R_inv_half.d(), in, 0.0, Aw, in);
    const std::vector<double> Ut = download_doubles(top, rmax * out, st_);  // (rmax, out)
    Aw_h = download_doubles(Aw, rmax * in, st_);
    US_h.assign(out * rmax, 0.0);
    for (int64_t k = 0; k < rmax; ++k) {
      const double sg = std::sqrt(f.sigma2[k]);
      for (int64_t j = 0; j < in; ++j) Aw_h[k * in + j] = sg > 0 ? Aw_h[k * in + j] / sg : 0.0;
      for (int64_t j = 0; j < out; ++j) US_h[j * rmax + k] = Ut[k * out + j] * sg;
    }
  }
  finish_static_fit(f, Aw_h, US_h);
  return f;
}

}  // namespace spear::calib_gpu
