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

QuantizedMatrix quantize_gptq(const float* w, int64_t N, int64_t K, const QuantScheme& scheme,
                              const std::vector<double>& H_in, const GptqOptions& opt) {
  SPEAR_CHECK(N > 0 && K > 0, "gptq: empty matrix");
  SPEAR_CHECK(static_cast<int64_t>(H_in.size()) == K * K, "gptq: H must be (K, K)");
  SPEAR_CHECK(scheme.bits >= 2 && scheme.bits <= 8, "gptq: bits must be in 2..8");
  SPEAR_CHECK(scheme.group <= 0 || K % scheme.group == 0 || scheme.group >= K,
              "gptq: group size must divide the input size");
  SPEAR_CHECK(opt.damp > 0 && opt.block > 0, "gptq: damp and block must be positive");
  for (int64_t i = 0; i < N * K; ++i)
    SPEAR_CHECK(std::isfinite(w[i]), "gptq: non-finite weight at index " + std::to_string(i));
  const int64_t gs = scheme.group_size(K), G = scheme.num_groups(K);
  const int qmax = (1 << scheme.bits) - 1;

  std::vector<double> W(w, w + N * K);  // (N, K) working copy, updated as columns go
  std::vector<double> H = H_in;         // (K, K)
  // Inputs that were always zero carry no information: fix their weights at 0.
  for (int64_t i = 0; i < K; ++i)
    if (H[i * K + i] == 0) {
      H[i * K + i] = 1;
      for (int64_t r = 0; r < N; ++r) W[r * K + i] = 0;
    }
  // Grid parameters: per channel and static groups are found on W before any update.
  std::vector<float> scales(N * G), zeros(N * G);  // (N, G)
  std::vector<char> have_group(G, 0);
  auto set_group = [&](int64_t g, const std::vector<double>& src) {
    std::vector<float> s, z;
    const int64_t k0 = g * gs, n = std::min(K, k0 + gs) - k0;
    find_params(src, N, K, k0, n, scheme, s, z);
    for (int64_t r = 0; r < N; ++r) {
      scales[r * G + g] = s[r];
      zeros[r * G + g] = z[r];
    }
    have_group[g] = 1;
  };
  if (G == 1 || opt.act_order)
    for (int64_t g = 0; g < G; ++g) set_group(g, W);

  // Column order.
  std::vector<int64_t> perm(K);
  std::iota(perm.begin(), perm.end(), 0);
  if (opt.act_order)
    std::stable_sort(perm.begin(), perm.end(),
                     [&](int64_t a, int64_t b) { return H[a * K + a] > H[b * K + b]; });
  std::vector<double> Wp(N * K), Hp(K * K);  // permuted (N, K), (K, K)
  for (int64_t r = 0; r < N; ++r)
    for (int64_t j = 0; j < K; ++j) Wp[r * K + j] = W[r * K + perm[j]];
  for (int64_t i = 0; i < K; ++i)
    for (int64_t j = 0; j < K; ++j) Hp[i * K + j] = H[perm[i] * K + perm[j]];
  double mean_diag = 0;
  for (int64_t i = 0; i < K; ++i) mean_diag += Hp[i * K + i];
  mean_diag /= static_cast<double>(K);
  for (int64_t i = 0; i < K; ++i) Hp[i * K + i] += opt.damp * mean_diag;
  // U: upper Cholesky factor of H⁻¹ (H⁻¹ = Uᵀ U); row i holds column i's update weights.
  spd_inverse(Hp, K);
  cholesky_upper(Hp, K);
  const std::vector<double>& U = Hp;

  QuantizedMatrix q;
  q.N = N;
  q.K = K;
  q.scheme = scheme;
  q.codes.assign(N * q.row_bytes(), 0);
  for (int64_t i1 = 0; i1 < K; i1 += opt.block) {
    const int64_t i2 = std::min(K, i1 + opt.block), nb = i2 - i1;
    std::vector<double> Err(N * nb, 0.0);  // (N, nb) scaled errors of this block
    for (int64_t i = i1; i < i2; ++i) {
      const int64_t orig = perm[i], g = orig / gs;
      if (!have_group[g]) {
        // Groups in natural order: parameters from the weights as updated so far
        // (columns of this group that lie in later blocks got the lazy update below).
        std::vector<double> cur(N * K);
        for (int64_t r = 0; r < N; ++r)
          for (int64_t j = 0; j < K; ++j) cur[r * K + perm[j]] = Wp[r * K + j];
        set_group(g, cur);
      }
      const double d = U[i * K + i];
      for (int64_t r = 0; r < N; ++r) {
        const double wv = Wp[r * K + i];
        const float s = scales[r * G + g];
        const double z = zeros[r * G + g];
        double c = std::nearbyint(wv / static_cast<double>(s)) + z;
        c = std::clamp(c, 0.0, static_cast<double>(qmax));
        q.set_code(r, orig, static_cast<int>(c));
        const double deq = static_cast<double>(s * (static_cast<float>(c) - static_cast<float>(z)));
        const double e = (wv - deq) / d;
        Err[r * nb + (i - i1)] = e;
        for (int64_t j = i + 1; j < i2; ++j) Wp[r * K + j] -= e * U[i * K + j];
      }
    }
    if (i2 < K)  // Wp[:, i2:] -= Err · U[i1:i2, i2:]
      cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, N, K - i2, nb, -1.0, Err.data(), nb,
                  &U[i1 * K + i2], K, 1.0, &Wp[i2], K);
  }
  q.scales = std::move(scales);
  q.zeros = std::move(zeros);
  return q;
}

}  // namespace spear
