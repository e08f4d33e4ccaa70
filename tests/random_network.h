#pragma once
// Random calibration-test networks, shared by the CPU tests (test_compensate.cpp) and the
// GPU ones (cuda/test_calib_gpu*.cpp), so both sides test the same kind of model.
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "compensate/network.h"
#include "quant/rtn.h"

namespace spear::test {

// (n) samples of N(0, sd²).
inline std::vector<float> randn(size_t n, std::mt19937_64& g, float sd) {
  std::normal_distribution<float> d(0.0f, sd);
  std::vector<float> v(n);  // (n)
  for (float& x : v) x = d(g);
  return v;
}

// A random network of config c whose quantized path is `bits`-bit RTN (per channel) of its
// weights: embeddings N(0, 1), head N(0, head_sd²), norms 1 + N(0, 0.01), each weight
// (out, in) N(0, 1/in). Draws in that order, layer after layer.
inline Network random_network(const ModelConfig& c, uint64_t seed, float head_sd, int bits = 3) {
  std::mt19937_64 g(seed);
  Network n;
  n.cfg = c;
  n.embed = randn(c.vocab_size * c.hidden_size, g, 1.0f);  // (vocab, dim)
  n.head = randn(c.vocab_size * c.hidden_size, g, head_sd);  // (vocab, dim)
  n.final_norm = randn(c.hidden_size, g, 0.1f);            // (dim)
  for (float& v : n.final_norm) v += 1.0f;
  n.fp.resize(c.num_layers);
  n.q.resize(c.num_layers);
  for (int64_t l = 0; l < c.num_layers; ++l) {
    n.fp[l].attn_norm = randn(c.hidden_size, g, 0.1f);
    n.fp[l].ffn_norm = randn(c.hidden_size, g, 0.1f);
    for (float& v : n.fp[l].attn_norm) v += 1.0f;
    for (float& v : n.fp[l].ffn_norm) v += 1.0f;
    n.q[l].attn_norm = n.fp[l].attn_norm;
    n.q[l].ffn_norm = n.fp[l].ffn_norm;
    for (Module m : kAllModules) {
      const int64_t out = n.module_out(m), in = n.module_in(m);
      n.fp[l].W[m] = randn(out * in, g, 1.0f / std::sqrt(static_cast<float>(in)));  // (out, in)
      QuantScheme s;
      s.bits = bits;
      n.q[l].W[m] = dequantize(quantize_rtn(n.fp[l].W[m].data(), out, in, s));  // (out, in)
    }
  }
  return n;
}

}  // namespace spear::test
