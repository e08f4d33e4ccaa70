#include "model/ec_layer.h"

#include <algorithm>
#include <cmath>

#include "core/dtype.h"
#include "core/error.h"

namespace spear {

int64_t ECParams::bytes_for(int64_t in, int64_t out, int64_t rank, bool gated) {
  return 2 * (rank * in + out * rank + (gated ? rank * rank + rank : 0));
}

int64_t ECParams::bytes() const { return bytes_for(in, out, rank, gated); }

void ECParams::check() const {
  SPEAR_CHECK(in > 0 && out > 0 && rank > 0, "EC: bad shape (in, out, rank must be > 0)");
  SPEAR_CHECK(rank <= std::min(in, out), "EC: rank " + std::to_string(rank) +
                                             " exceeds min(in, out) = " +
                                             std::to_string(std::min(in, out)));
  SPEAR_CHECK(static_cast<int64_t>(A.size()) == rank * in, "EC: A must be (rank, in)");
  SPEAR_CHECK(static_cast<int64_t>(B.size()) == out * rank, "EC: B must be (out, rank)");
  if (gated) {
    SPEAR_CHECK(static_cast<int64_t>(G.size()) == rank * rank, "EC: G must be (rank, rank)");
    SPEAR_CHECK(static_cast<int64_t>(c.size()) == rank, "EC: c must be (rank)");
  } else {
    SPEAR_CHECK(G.empty() && c.empty(), "EC: an ungated EC has no G or c");
  }
  for (const auto* v : {&A, &B, &G, &c})
    for (float f : *v) SPEAR_CHECK(std::isfinite(f), "EC: non-finite parameter");
}

void ECParams::round_to_fp16() {
  for (auto* v : {&A, &B, &G, &c})
    for (float& f : *v) f = f16_to_f32(f32_to_f16(f));
}

void ec_codes(const ECParams& p, const float* x, int64_t M, float* z, float* s, float* gamma) {
  const int64_t r = p.rank;
  matmul_nt(x, p.A.data(), z, M, p.in, r);
  if (!p.gated) {
    std::copy_n(z, M * r, s);
    if (gamma) std::fill_n(gamma, M * r, 1.0f);
    return;
  }
  std::vector<float> a(M * r);  // (M, r) gate pre-activation G z + c
  matmul_nt(z, p.G.data(), a.data(), M, r, r);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t i = 0; i < r; ++i) {
      const float g = 1.0f + std::tanh(a[m * r + i] + p.c[i]);
      s[m * r + i] = g * z[m * r + i];
      if (gamma) gamma[m * r + i] = g;
    }
}

void ec_add(const ECParams& p, const float* x, int64_t M, float* y) {
  const int64_t r = p.rank;
  std::vector<float> z(M * r), s(M * r);  // (M, r)
  ec_codes(p, x, M, z.data(), s.data(), nullptr);
  std::vector<float> d(M * p.out);  // (M, out)
  matmul_nt(s.data(), p.B.data(), d.data(), M, r, p.out);
  for (int64_t i = 0; i < M * p.out; ++i) y[i] += d[i];
}

ECLinear::ECLinear(std::unique_ptr<Linear> base, ECParams ec)
    : base_(std::move(base)), ec_(std::move(ec)) {
  SPEAR_CHECK(base_, "ECLinear: no base layer");
  ec_.check();
  SPEAR_CHECK(ec_.in == base_->in_features() && ec_.out == base_->out_features(),
              "ECLinear: EC shape does not match its base layer");
}

void ECLinear::forward(const float* x, int64_t M, float* y) const {
  base_->forward(x, M, y);
  ec_add(ec_, x, M, y);
}

std::string ECLinear::kind() const {
  return base_->kind() + "+ec(r=" + std::to_string(ec_.rank) + (ec_.gated ? ",gated)" : ")");
}

}  // namespace spear
