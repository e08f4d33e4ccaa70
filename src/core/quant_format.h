#pragma once
// The canonical CPU format of a quantized weight matrix, and a scalar-type
// descriptor for quantization formats (after vLLM's ScalarType).
//
// A linear layer y = W x has W of shape (N out, K in). Quantized with b bits in
// groups of g consecutive inputs (g = K for per-output-channel):
//     W[n][k] ~= scale[n][k/g] * (q[n][k] - zero[n][k/g]),   q in [0, 2^b - 1]
// Symmetric formats fix zero = 2^(b-1) and scale = max|w| / (2^(b-1) - 1)... see rtn.h
// for the exact rules. Codes are stored per row as a little-endian bit stream:
// code k of row n occupies bits [k*b, k*b + b) of the row, the row starting at byte
// n * row_bytes(K, b). For b = 4 this is two codes per byte, the even column in the
// low nibble.
#include <cstdint>
#include <string>
#include <vector>

namespace spear {

struct QuantScheme {
  int bits = 4;          // 2..8
  int64_t group = -1;    // -1 = per output channel (one group of K)
  bool symmetric = false;

  std::string name() const;  // "w4-pc-asym", "w4-g128-sym", ...
  int64_t group_size(int64_t K) const { return group <= 0 ? K : group; }
  int64_t num_groups(int64_t K) const { return (K + group_size(K) - 1) / group_size(K); }
};

inline int64_t packed_row_bytes(int64_t K, int bits) { return (K * bits + 7) / 8; }

struct QuantizedMatrix {
  int64_t N = 0, K = 0;            // (out, in)
  QuantScheme scheme;
  std::vector<uint8_t> codes;      // (N, packed_row_bytes(K, bits))
  std::vector<float> scales;       // (N, num_groups)
  std::vector<float> zeros;        // (N, num_groups), integral values (asym); 2^(b-1) (sym)

  int64_t row_bytes() const { return packed_row_bytes(K, scheme.bits); }
  int code(int64_t n, int64_t k) const;           // unpacked code q[n][k]
  void set_code(int64_t n, int64_t k, int q);
  // Bytes this matrix occupies when served: codes + fp16 scales (+ fp16 zeros if asym).
  int64_t serving_bytes() const;
};

}  // namespace spear
