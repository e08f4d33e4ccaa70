#pragma once
// Counter-based random numbers (Philox4x32-10, Salmon et al., "Parallel random numbers:
// as easy as 1, 2, 3", SC 2011): the n-th draw of a seed is a pure function of (seed, n),
// the same on the host and on a CUDA device. The sampler uses it so that a seeded request
// draws the same tokens whichever backend (or batch) computes its step.
#include <cstdint>

#if defined(__CUDACC__)
#define SPEAR_HD __host__ __device__
#else
#define SPEAR_HD
#endif

namespace spear {

struct Philox4 {
  uint32_t v[4];
};

// 32 x 32 -> 64-bit product split into (hi, lo).
SPEAR_HD inline void philox_mul(uint32_t a, uint32_t b, uint32_t* hi, uint32_t* lo) {
  const uint64_t p = static_cast<uint64_t>(a) * b;
  *hi = static_cast<uint32_t>(p >> 32);
  *lo = static_cast<uint32_t>(p);
}

// Ten rounds over the counter (c0..c3) with the key (k0, k1); the constants are the
// published ones (multipliers 0xD2511F53, 0xCD9E8D57; Weyl key increments 0x9E3779B9,
// 0xBB67AE85).
SPEAR_HD inline Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, lo0, hi1, lo1;
    philox_mul(0xD2511F53u, c0, &hi0, &lo0);
    philox_mul(0xCD9E8D57u, c2, &hi1, &lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0, n1 = lo1, n2 = hi0 ^ c3 ^ k1, n3 = lo0;
    c0 = n0;
    c1 = n1;
    c2 = n2;
    c3 = n3;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// A double in [0, 1) with 53 random bits: draw `n` of stream `seed`.
SPEAR_HD inline double philox_uniform(uint64_t seed, uint64_t n) {
  const Philox4 r = philox4x32_10(static_cast<uint32_t>(n), static_cast<uint32_t>(n >> 32), 0u, 0u,
                                  static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  const uint64_t bits = (static_cast<uint64_t>(r.v[0]) << 21) ^ (r.v[1] >> 11);  // 53 bits
  return static_cast<double>(bits & ((uint64_t(1) << 53) - 1)) * (1.0 / 9007199254740992.0);
}

}  // namespace spear
