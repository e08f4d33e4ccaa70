#include "quant/gptq.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <string>

#include "core/linalg.h"
#include "core/error.h"
#include "quant/rtn.h"

namespace spear {

namespace {

// Scale and zero of each row over columns [k0, k0 + n) of `w` (N, K), with RTN's exact
// rule (quantize_rtn on the slice as one per-channel group).
void find_params(const std::vector<double>& w, int64_t N, int64_t K, int64_t k0, int64_t n,
                 const QuantScheme& scheme, std::vector<float>& scale, std::vector<float>& zero) {
  std::vector<float> slice(N * n);  // (N, n)
  for (int64_t r = 0; r < N; ++r)
    for (int64_t j = 0; j < n; ++j) slice[r * n + j] = static_cast<float>(w[r * K + k0 + j]);
  QuantScheme pc = scheme;
  pc.group = -1;
  QuantizedMatrix q = quantize_rtn(slice.data(), N, n, pc);
  scale = q.scales;
  zero = q.zeros;
}

}  // namespace

GptqFactor gptq_factor(const std::vector<double>& H_in, int64_t K, const GptqOptions& opt) {
  SPEAR_CHECK(K > 0 && static_cast<int64_t>(H_in.size()) == K * K, "gptq: H must be (K, K)");
  SPEAR_CHECK(opt.damp > 0 && opt.block > 0, "gptq: damp and block must be positive");
  GptqFactor f;
  f.K = K;
  f.dead.assign(K, 0);
  std::vector<double> diag(K);
  for (int64_t i = 0; i < K; ++i) {
    diag[i] = H_in[i * K + i];
    SPEAR_CHECK(std::isfinite(diag[i]) && diag[i] >= 0, "gptq: H has a bad diagonal entry at " + std::to_string(i));
    // Inputs that were always zero carry no information: their weights are fixed at 0 and
    // H_ii = 1 keeps the factorisation defined.
    if (diag[i] == 0) {
      f.dead[i] = 1;
      diag[i] = 1;
    }
  }
  f.perm.resize(K);
  std::iota(f.perm.begin(), f.perm.end(), 0);
  if (opt.act_order)
    std::stable_sort(f.perm.begin(), f.perm.end(), [&](int64_t a, int64_t b) { return diag[a] > diag[b]; });
  f.U.resize(K * K);  // (K, K) permuted H, then damped, then its inverse's Cholesky factor
  for (int64_t i = 0; i < K; ++i)
    for (int64_t j = 0; j < K; ++j)
      f.U[i * K + j] = i == j ? diag[f.perm[i]] : H_in[f.perm[i] * K + f.perm[j]];
  double mean_diag = 0;
  for (int64_t i = 0; i < K; ++i) mean_diag += diag[i];
  mean_diag /= static_cast<double>(K);
  for (int64_t i = 0; i < K; ++i) f.U[i * K + i] += opt.damp * mean_diag;
  inverse_cholesky_upper(f.U, K);
  return f;
}

QuantizedMatrix quantize_gptq(const float* w, int64_t N, int64_t K, const QuantScheme& scheme,
                              const std::vector<double>& H, const GptqOptions& opt) {
  SPEAR_CHECK(N > 0 && K > 0, "gptq: empty matrix");
  SPEAR_CHECK(static_cast<int64_t>(H.size()) == K * K, "gptq: H must be (K, K)");
  SPEAR_CHECK(scheme.bits >= 2 && scheme.bits <= 8, "gptq: bits must be in 2..8");
  return quantize_gptq(w, N, K, scheme, gptq_factor(H, K, opt), opt);
}

QuantizedMatrix quantize_gptq(const float* w, int64_t N, int64_t K, const QuantScheme& scheme,
                              const GptqFactor& f, const GptqOptions& opt) {
  SPEAR_CHECK(N > 0 && K > 0, "gptq: empty matrix");
  SPEAR_CHECK(f.K == K && static_cast<int64_t>(f.U.size()) == K * K, "gptq: factor is for another input size");
  SPEAR_CHECK(scheme.bits >= 2 && scheme.bits <= 8, "gptq: bits must be in 2..8");
  SPEAR_CHECK(scheme.group <= 0 || K % scheme.group == 0 || scheme.group >= K,
              "gptq: group size must divide the input size");
  SPEAR_CHECK(opt.block > 0, "gptq: block must be positive");
  for (int64_t i = 0; i < N * K; ++i)
    SPEAR_CHECK(std::isfinite(w[i]), "gptq: non-finite weight at index " + std::to_string(i));
  const int64_t gs = scheme.group_size(K), G = scheme.num_groups(K);
  const int qmax = (1 << scheme.bits) - 1;
  const std::vector<int64_t>& perm = f.perm;
  const std::vector<double>& U = f.U;
  const bool natural = !opt.act_order;
  for (int64_t j = 0; j < K && natural; ++j) SPEAR_CHECK(perm[j] == j, "gptq: factor made with act_order");

  // Wp: (N, K) working copy in permuted column order, updated as columns go; dead inputs 0.
  std::vector<double> Wp(N * K);
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < N; ++r)
    for (int64_t j = 0; j < K; ++j) Wp[r * K + j] = f.dead[perm[j]] ? 0.0 : w[r * K + perm[j]];
  // Grid parameters: per channel and static groups are found on W before any update.
  std::vector<float> scales(N * G), zeros(N * G);  // (N, G)
  std::vector<char> have_group(G, 0);
  auto set_group = [&](int64_t g, const std::vector<double>& src) {  // src (N, K) natural order
    std::vector<float> s, z;
    const int64_t k0 = g * gs, n = std::min(K, k0 + gs) - k0;
    find_params(src, N, K, k0, n, scheme, s, z);
    for (int64_t r = 0; r < N; ++r) {
      scales[r * G + g] = s[r];
      zeros[r * G + g] = z[r];
    }
    have_group[g] = 1;
  };
  if (G == 1 || opt.act_order) {
    std::vector<double> W0(N * K);  // natural order
    for (int64_t r = 0; r < N; ++r)
      for (int64_t j = 0; j < K; ++j) W0[r * K + perm[j]] = Wp[r * K + j];
    for (int64_t g = 0; g < G; ++g) set_group(g, W0);
  }

  QuantizedMatrix q;
  q.N = N;
  q.K = K;
  q.scheme = scheme;
  q.codes.assign(N * q.row_bytes(), 0);
  std::vector<double> Err;  // (N, nb) scaled errors of a block
  for (int64_t i1 = 0; i1 < K; i1 += opt.block) {
    const int64_t i2 = std::min(K, i1 + opt.block), nb = i2 - i1;
    Err.assign(N * nb, 0.0);
    // The block in segments that start where a group's parameters are due: they come from
    // the weights as updated so far (natural order only: with act_order every group was set
    // above), then the rows run the segment's columns independently.
    for (int64_t s0 = i1; s0 < i2;) {
      if (!have_group[perm[s0] / gs]) set_group(perm[s0] / gs, Wp);
      int64_t s1 = s0 + 1;
      while (s1 < i2 && have_group[perm[s1] / gs]) ++s1;
#pragma omp parallel for schedule(static)
      for (int64_t r = 0; r < N; ++r) {
        double* wr = &Wp[r * K];
        for (int64_t i = s0; i < s1; ++i) {
          const int64_t orig = perm[i], g = orig / gs;
          const double d = U[i * K + i];
          const double wv = wr[i];
          const float sc = scales[r * G + g];
          const double z = zeros[r * G + g];
          double c = std::nearbyint(wv / static_cast<double>(sc)) + z;
          c = std::clamp(c, 0.0, static_cast<double>(qmax));
          q.set_code(r, orig, static_cast<int>(c));
          const double deq = static_cast<double>(sc * (static_cast<float>(c) - static_cast<float>(z)));
          const double e = (wv - deq) / d;
          Err[r * nb + (i - i1)] = e;
          const double* ui = &U[i * K];
          for (int64_t j = i + 1; j < i2; ++j) wr[j] -= e * ui[j];
        }
      }
      s0 = s1;
    }
    if (i2 < K) {  // Wp[:, i2:] -= Err · U[i1:i2, i2:]
      const BlasThreadsScope blas;
      cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, N, K - i2, nb, -1.0, Err.data(), nb,
                  &U[i1 * K + i2], K, 1.0, &Wp[i2], K);
    }
  }
  q.scales = std::move(scales);
  q.zeros = std::move(zeros);
  return q;
}

}  // namespace spear
