#pragma once
// Gated Error Compensator (EC) on top of a quantized module:
//     y = Q(W) x + B (γ(z) ⊙ z),   z = A x,   γ(z) = 1 + tanh(G z + c)
// A: (r, in), B: (out, r), G: (r, r), c: (r).
//
// Why this gate: the error a 4-bit layer makes varies a lot from token to token
// (see `spear diagnose`), so a fixed low-rank term over-corrects some tokens and
// under-corrects others. γ rescales each of the r correction directions per token,
// from the token's own coordinates z (no extra input), within (0, 2): it can switch
// a direction off or double it, but cannot blow up. With G = 0 and c = 0, γ ≡ 1 and
// the EC is exactly the static low-rank control B·A, so the closed form is both the
// baseline and the initial value; the gate costs r² + r parameters, nothing next to
// r·(in + out).
#include <cstdint>
#include <vector>

namespace spear {

struct ECParams {
  int64_t in = 0, out = 0, rank = 0;
  bool gated = true;
  std::vector<float> A;  // (rank, in)
  std::vector<float> B;  // (out, rank)
  std::vector<float> G;  // (rank, rank); empty when !gated
  std::vector<float> c;  // (rank); empty when !gated

  // fp16 bytes as served: A, B and (gated) G, c.
  int64_t bytes() const;
  static int64_t bytes_for(int64_t in, int64_t out, int64_t rank, bool gated);
  void check() const;  // sizes consistent, values finite; throws spear::Error
  // Rounds every parameter to fp16 and back, so that what is evaluated is what a
  // .spear file stores.
  void round_to_fp16();
};

// z (M, r) = x A^T; s (M, r) = γ(z) ⊙ z; optionally returns γ (M, r).
void ec_codes(const ECParams& p, const float* x, int64_t M, float* z, float* s, float* gamma);
// y (M, out) += B s for the s of ec_codes.
void ec_add(const ECParams& p, const float* x, int64_t M, float* y);

}  // namespace spear
