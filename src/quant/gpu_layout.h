#pragma once
// The layouts the CUDA W4A16 kernels read (src/cuda/w4a16.h), built on the CPU from the
// canonical QuantizedMatrix (quant_format.h). Plain C++: compiles and is tested without
// nvcc. Derivation and pictures: docs/KERNELS.md.
//
// The kernels compute y^T = W x^T with mma.sync.m16n8k16: the weight tile (16 outputs x
// 16 inputs) is the A operand, the activations (16 inputs x 8 tokens) the B operand
// ("swap AB": a decode batch of 1..8 tokens fills one n8 column block).
//
// W4 codes: tiles of 16 outputs x 64 inputs = 512 bytes, ordered
//     tile(nb, kb) at byte ((nb * KB) + kb) * 512,   nb = n / 16, kb = k / 64, KB = K_pad / 64
// so the 512-byte tiles of one 16-row block follow each other along K. Inside a tile,
// lane l = 4 g + q (g = 0..7, q = 0..3) of a warp owns the 16 bytes at l * 16: word s
// (s = 0..3) holds its A fragment of the 16x16 sub-tile s, 8 nibbles. Fragment register
// r (0..3), half h (0..1) sits at nibble r + 4 h of the word, and is the code of
//     row = g + 8 (r & 1),   k = 16 q + 4 s + 2 (r >> 1) + h      (within the tile).
// The k order inside a 64-wide tile is a permutation of the mma's logical order: the B
// operand lane (g, q) then needs x[token g][16 q .. 16 q + 16) of the tile, one 32-byte
// contiguous read. The nibble order lets (word >> 4r) & 0x000f000f | magic give fragment
// register r as two fp16/bf16 values magic + code in one lop3.
//
// N is padded to N_pad = 16 * ceil(N / 16), K to K_pad = 128 * ceil(K / 128) (the
// kernels step K in units of 128). Padded codes equal their group's zero point (weight 0);
// padded rows have code 0, zero 0, scale 0.
// Scales: float32 (G, N_pad); zeros: uint8 (G, N_pad) (2^(b-1) = 8 for symmetric).
// Groups: per output channel (group 0 here, G = 1) or a multiple of 128.
#include <cstdint>
#include <vector>

#include "core/quant_format.h"

namespace spear {

constexpr int64_t kGpuKUnit = 128;  // the kernels' K step; K_pad is a multiple of it

struct GpuW4Layout {
  int64_t N = 0, K = 0, N_pad = 0, K_pad = 0;
  int64_t group = 0;  // 0 = per output channel, else a multiple of 128
  int64_t G = 1;      // number of groups
  bool symmetric = false;
  std::vector<uint8_t> qweight;  // (N_pad/16, K_pad/64, 32 lanes, 16 bytes)
  std::vector<float> scales;     // (G, N_pad)
  std::vector<uint8_t> zeros;    // (G, N_pad)

  int64_t n_blocks() const { return N_pad / 16; }
  int64_t k_blocks() const { return K_pad / 64; }
};

inline int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

// Where weight (n, k) lives in GpuW4Layout::qweight: byte offset and bit shift (0 or 4).
struct W4Pos {
  int64_t byte;
  int shift;
};
W4Pos gpu_w4_position(int64_t K_pad, int64_t n, int64_t k);

// Repacks a 4-bit QuantizedMatrix; throws spear::Error for other bit widths or groups
// that are neither per-channel nor a multiple of 128.
GpuW4Layout repack_w4(const QuantizedMatrix& q);
// The code at (n, k) (k < K_pad, n < N_pad) read back from the tiled layout.
int gpu_w4_code(const GpuW4Layout& l, int64_t n, int64_t k);
// Inverse of repack_w4 (bit-exact): the canonical matrix again.
QuantizedMatrix unpack_w4(const GpuW4Layout& l);

// Error-compensator factors y += B (gamma(A x) * A x), A (r, K), B (N, r), as 16-bit
// values (fp16 or bf16 bit patterns; the layout does not depend on which).
// A goes to the fragment-tiled layout (r_pad/16, K_pad/64, 4 sub-tiles, 32 lanes, 8
// halves): element (j, k), j in a 16-row tile, k in a 64-wide tile, lane 4g+q, sub-tile s,
// register r, half h as for W4 above, at half index
//     (((ja * KB + kb) * 4 + s) * 32 + lane) * 8 + 2 r + h.
// B goes to (N_pad, r_pad) row-major with zero padding. r_pad = 16 * ceil(r / 16).
int64_t gpu_ec_a_index(int64_t K_pad, int64_t j, int64_t k);
std::vector<uint16_t> repack_ec_a(const uint16_t* a, int64_t r, int64_t K, int64_t K_pad);
std::vector<uint16_t> repack_ec_b(const uint16_t* b, int64_t N, int64_t r, int64_t N_pad);

}  // namespace spear
