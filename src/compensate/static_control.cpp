#include "compensate/static_control.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <string>

#include "core/linalg.h"
#include "core/error.h"

namespace spear {

std::string_view static_mode_name(StaticMode m) {
  switch (m) {
    case StaticMode::Rrr: return "rrr";
    case StaticMode::Qera: return "qera";
  }
  throw Error("static control: invalid StaticMode " + std::to_string(static_cast<int>(m)));
}

StaticMode parse_static_mode(std::string_view s) {
  for (StaticMode m : {StaticMode::Rrr, StaticMode::Qera})
    if (s == static_mode_name(m)) return m;
  throw Error("unknown static-control mode '" + std::string(s) + "' (accepted: rrr, qera)");
}

void SiteStats::reset(int64_t n) {
  in = n;
  tokens = 0;
  Rqq.assign(n * n, 0.0);
  Sfq.assign(n * n, 0.0);
  Sff.assign(n * n, 0.0);
}

void SiteStats::add(const float* xf, const float* xq, int64_t rows) {
  const BlasThreadsScope blas;
  std::vector<float> g(in * in);  // (in, in) one window's sum, float (rows ≤ a few thousand)
  auto acc = [&](const float* a, const float* b, std::vector<double>& dst) {
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, in, in, rows, 1.0f, a, in, b, in, 0.0f,
                g.data(), in);
    for (int64_t i = 0; i < in * in; ++i) dst[i] += g[i];
  };
  // xᵀx is symmetric: ssyrk does half the work of sgemm (upper triangle, mirrored here).
  auto acc_sym = [&](const float* a, std::vector<double>& dst) {
    cblas_ssyrk(CblasRowMajor, CblasUpper, CblasTrans, in, rows, 1.0f, a, in, 0.0f, g.data(), in);
    for (int64_t i = 0; i < in; ++i) {
      dst[i * in + i] += g[i * in + i];
      for (int64_t j = i + 1; j < in; ++j) {
        dst[i * in + j] += g[i * in + j];
        dst[j * in + i] += g[i * in + j];
      }
    }
  };
  acc_sym(xq, Rqq);
  acc(xf, xq, Sfq);
  acc_sym(xf, Sff);
  tokens += rows;
}

Whitening whiten(const SiteStats& s, double damp) {
  const BlasThreadsScope blas;
  SPEAR_CHECK(s.tokens > 0, "static control: no calibration tokens");
  const int64_t n = s.in;
  std::vector<double> R(n * n);  // (in, in) E[x_q x_qᵀ]
  double tr = 0;
  for (int64_t i = 0; i < n * n; ++i) R[i] = s.Rqq[i] / static_cast<double>(s.tokens);
  for (int64_t i = 0; i < n; ++i) tr += R[i * n + i];
  for (int64_t i = 0; i < n; ++i) R[i * n + i] += damp * tr / static_cast<double>(n) + 1e-12;
  std::vector<double> w, V;  // eigenvalues (n), eigenvectors as rows (n, n)
  sym_eig(R, n, w, V);
  Whitening wh;
  wh.in = n;
  // R^-½ = Vᵀ diag(w^-½) V with V's rows the eigenvectors.
  // R^½ likewise with w_i^½.
  auto power = [&](double e, std::vector<double>& dst) {
    std::vector<double> Vs(n * n);  // (n, n) row i scaled by w_i^e
    for (int64_t i = 0; i < n; ++i) {
      const double f = std::pow(std::max(w[i], 1e-20), e);
      for (int64_t j = 0; j < n; ++j) Vs[i * n + j] = V[i * n + j] * f;
    }
    dst.assign(n * n, 0.0);
    cblas_dgemm(CblasRowMajor, CblasTrans, CblasNoTrans, n, n, n, 1.0, V.data(), n, Vs.data(), n,
                0.0, dst.data(), n);
  };
  power(-0.5, wh.R_inv_half);
  power(0.5, wh.R_half);
  return wh;
}

StaticFit StaticFit::sized(int64_t out, int64_t in, int64_t max_rank, double energy) {
  StaticFit f;
  f.in = in;
  f.out = out;
  f.max_rank = std::max<int64_t>(0, std::min({max_rank, out, in}));
  f.target_energy = std::max(energy, 0.0);
  f.sigma2.assign(f.max_rank, 0.0);
  f.A.assign(f.max_rank * in, 0.0f);
  f.B.assign(out * f.max_rank, 0.0f);
  return f;
}

double StaticFit::captured(int64_t r) const {
  if (target_energy <= 0) return 0;
  double s = 0;
  for (int64_t i = 0; i < std::min(r, max_rank); ++i) s += sigma2[i];
  return std::min(1.0, s / target_energy);
}

StaticFit fit_static(const float* W, const float* Q, int64_t out, int64_t in, const SiteStats& s,
                     const Whitening& wh, int64_t max_rank, StaticMode mode) {
  const BlasThreadsScope blas;
  SPEAR_CHECK(s.in == in && wh.in == in, "static control: site width does not match the module");
  const double N = static_cast<double>(s.tokens);
  std::vector<double> Wd(W, W + out * in), Qd(Q, Q + out * in), dW(out * in);  // (out, in)
  for (int64_t i = 0; i < out * in; ++i) dW[i] = Wd[i] - Qd[i];
  std::vector<double> X(out * in), T1(out * in);  // (out, in) E[e x_qᵀ]
  double energy = 0;
  auto mul = [&](const std::vector<double>& A, const std::vector<double>& Bm, double alpha,
                 double beta, std::vector<double>& Cm) {  // Cm (out,in) = α A(out,in)·Bm(in,in) + β Cm
    cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, out, in, in, alpha, A.data(), in,
                Bm.data(), in, beta, Cm.data(), in);
  };
  auto trace_abt = [&](const std::vector<double>& A, const std::vector<double>& Bm) {
    double t = 0;  // tr(A Bᵀ) for (out, in) matrices
    for (int64_t i = 0; i < out * in; ++i) t += A[i] * Bm[i];
    return t;
  };
  if (mode == StaticMode::Rrr) {
    // X = (W Sfq − Q Rqq) / N;  E‖e‖² = tr(W Sff Wᵀ − 2 W Sfq Qᵀ + Q Rqq Qᵀ) / N
    mul(Wd, s.Sfq, 1.0 / N, 0.0, X);
    const double wsq = trace_abt(X, Qd);  // tr(W Sfq Qᵀ)/N
    mul(Qd, s.Rqq, 1.0 / N, 0.0, T1);
    const double qrq = trace_abt(T1, Qd);
    for (int64_t i = 0; i < out * in; ++i) X[i] -= T1[i];
    mul(Wd, s.Sff, 1.0 / N, 0.0, T1);
    const double wsw = trace_abt(T1, Wd);
    energy = wsw - 2 * wsq + qrq;
  }
  // M (out, in): Rrr M = X R^-½; Qera M = ΔW R^½ (the damped R of `wh` in both). Its top
  // singular directions via the smaller Gram matrix.
  std::vector<double> M(out * in);
  if (mode == StaticMode::Rrr) {
    mul(X, wh.R_inv_half, 1.0, 0.0, M);
  } else {
    mul(dW, wh.R_half, 1.0, 0.0, M);
    energy = trace_abt(M, M);  // ‖ΔW R^½‖²: the σ² below sum to it at full rank
  }
  StaticFit f = StaticFit::sized(out, in, max_rank, energy);
  const int64_t rmax = f.max_rank;
  if (rmax <= 0) return f;
  std::vector<double> Ur(out * rmax), Vr(rmax * in);  // U_r S_r (out, r), V_rᵀ (r, in)
  if (in <= out) {
    std::vector<double> Gm(in * in), ev, vecs;  // MᵀM
    cblas_dgemm(CblasRowMajor, CblasTrans, CblasNoTrans, in, in, out, 1.0, M.data(), in, M.data(),
                in, 0.0, Gm.data(), in);
    sym_eig(Gm, in, ev, vecs);
    for (int64_t k = 0; k < rmax; ++k) {
      const int64_t e = in - 1 - k;  // descending
      f.sigma2[k] = std::max(ev[e], 0.0);
      for (int64_t j = 0; j < in; ++j) Vr[k * in + j] = vecs[e * in + j];
    }
    // U S = M V
    cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasTrans, out, rmax, in, 1.0, M.data(), in,
                Vr.data(), in, 0.0, Ur.data(), rmax);
  } else {
    std::vector<double> Gm(out * out), ev, vecs;  // M Mᵀ
    cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasTrans, out, out, in, 1.0, M.data(), in, M.data(),
                in, 0.0, Gm.data(), out);
    sym_eig(Gm, out, ev, vecs);
    std::vector<double> Ut(rmax * out);  // U_rᵀ
    for (int64_t k = 0; k < rmax; ++k) {
      const int64_t e = out - 1 - k;
      f.sigma2[k] = std::max(ev[e], 0.0);
      for (int64_t j = 0; j < out; ++j) Ut[k * out + j] = vecs[e * out + j];
    }
    // S Vᵀ = Uᵀ M, then U S Vᵀ = U (S Vᵀ): keep Ur = U S, Vr = Vᵀ by normalising.
    cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, rmax, in, out, 1.0, Ut.data(), out,
                M.data(), in, 0.0, Vr.data(), in);
    for (int64_t k = 0; k < rmax; ++k) {
      const double sg = std::sqrt(f.sigma2[k]);
      for (int64_t j = 0; j < in; ++j) Vr[k * in + j] = sg > 0 ? Vr[k * in + j] / sg : 0.0;
      for (int64_t j = 0; j < out; ++j) Ur[j * rmax + k] = Ut[k * out + j] * sg;
    }
  }
  // Aw = Vᵀ R^-½ (r, in), then A and B from it and U S.
  std::vector<double> Aw(rmax * in);
  cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, rmax, in, in, 1.0, Vr.data(), in,
              wh.R_inv_half.data(), in, 0.0, Aw.data(), in);
  finish_static_fit(f, Aw, Ur);
  return f;
}

void finish_static_fit(StaticFit& f, std::vector<double>& Aw, std::vector<double>& US) {
  const int64_t rmax = f.max_rank, in = f.in, out = f.out;
  SPEAR_CHECK(static_cast<int64_t>(Aw.size()) == rmax * in && static_cast<int64_t>(US.size()) == out * rmax,
              "static control: factor sizes do not match the fit");
  for (int64_t k = 0; k < rmax; ++k) {
    // The sign of a direction is the eigensolver's choice (LAPACK and cuSOLVER differ);
    // fix it so that the largest |entry| of A's row is positive. (A_k, B_k) -> (−A_k, −B_k)
    // leaves B·A, and training from it, unchanged up to that sign.
    int64_t jmax = 0;
    for (int64_t j = 1; j < in; ++j)
      if (std::abs(Aw[k * in + j]) > std::abs(Aw[k * in + jmax])) jmax = j;
    if (Aw[k * in + jmax] < 0) {
      for (int64_t j = 0; j < in; ++j) Aw[k * in + j] = -Aw[k * in + j];
      for (int64_t j = 0; j < out; ++j) US[j * rmax + k] = -US[j * rmax + k];
    }
    // A = S^½ Vᵀ R^-½ (r, in); B = U S^½ (out, r) = (U S) S^-½.
    const double sg = std::sqrt(std::sqrt(f.sigma2[k]));  // σ^½
    for (int64_t j = 0; j < in; ++j) f.A[k * in + j] = static_cast<float>(Aw[k * in + j] * sg);
    for (int64_t j = 0; j < out; ++j)
      f.B[j * rmax + k] = static_cast<float>(sg > 0 ? US[j * rmax + k] / sg : 0.0);
  }
}

ECParams ec_from_fit(const StaticFit& f, int64_t r, bool gated) {
  SPEAR_CHECK(r > 0 && r <= f.max_rank, "static control: rank out of range");
  ECParams p;
  p.in = f.in;
  p.out = f.out;
  p.rank = r;
  p.gated = gated;
  p.A.assign(f.A.begin(), f.A.begin() + r * f.in);
  p.B.resize(f.out * r);
  for (int64_t j = 0; j < f.out; ++j)
    for (int64_t k = 0; k < r; ++k) p.B[j * r + k] = f.B[j * f.max_rank + k];
  if (gated) {
    p.G.assign(r * r, 0.0f);
    p.c.assign(r, 0.0f);
  }
  return p;
}

}  // namespace spear
