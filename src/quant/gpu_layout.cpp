#include "quant/gpu_layout.h"

#include <algorithm>
#include <cmath>
#include <string>

#include "core/error.h"

namespace spear {

namespace {
// Fragment coordinates of (row, k) inside a 16 x 64 tile.
struct Frag {
  int lane, s, r, h;
};
Frag frag_of(int64_t row_in, int64_t k_in) {
  const int g = static_cast<int>(row_in % 8), rb0 = static_cast<int>(row_in / 8);
  const int q = static_cast<int>(k_in / 16), rem = static_cast<int>(k_in % 16);
  const int s = rem / 4, rb1 = (rem % 4) / 2, h = rem % 2;
  return {g * 4 + q, s, rb0 + 2 * rb1, h};
}
}  // namespace

W4Pos gpu_w4_position(int64_t K_pad, int64_t n, int64_t k) {
  const int64_t KB = K_pad / 64;
  const Frag f = frag_of(n % 16, k % 64);
  const int nib = f.r + 4 * f.h;
  const int64_t tile = (n / 16) * KB + k / 64;
  return {tile * 512 + f.lane * 16 + f.s * 4 + nib / 2, (nib % 2) * 4};
}

GpuW4Layout repack_w4(const QuantizedMatrix& q) {
  SPEAR_CHECK(q.scheme.bits == 4, "repack_w4: only 4-bit weights have a GPU layout, got " +
                                      std::to_string(q.scheme.bits) + " bits");
  const int64_t gs = q.scheme.group_size(q.K);
  const bool per_channel = q.scheme.group <= 0 || gs >= q.K;
  SPEAR_CHECK(per_channel || gs % kGpuKUnit == 0,
              "repack_w4: group size must be per-channel or a multiple of 128, got " +
                  std::to_string(gs));
  GpuW4Layout l;
  l.N = q.N;
  l.K = q.K;
  l.N_pad = round_up(q.N, 16);
  l.K_pad = round_up(q.K, kGpuKUnit);
  l.group = per_channel ? 0 : gs;
  l.G = per_channel ? 1 : q.scheme.num_groups(q.K);
  l.symmetric = q.scheme.symmetric;
  SPEAR_CHECK(static_cast<int64_t>(q.scales.size()) == q.N * l.G &&
                  static_cast<int64_t>(q.zeros.size()) == q.N * l.G,
              "repack_w4: scales/zeros size mismatch");
  l.qweight.assign(static_cast<size_t>(l.n_blocks() * l.k_blocks() * 512), 0);
  l.scales.assign(static_cast<size_t>(l.G * l.N_pad), 0.0f);
  l.zeros.assign(static_cast<size_t>(l.G * l.N_pad), 0);
  for (int64_t n = 0; n < q.N; ++n)
    for (int64_t g = 0; g < l.G; ++g) {
      const float z = q.zeros[n * l.G + g];
      SPEAR_CHECK(z >= 0.0f && z <= 15.0f && z == std::floor(z),
                  "repack_w4: zero point must be an integer code in 0..15");
      l.scales[g * l.N_pad + n] = q.scales[n * l.G + g];
      l.zeros[g * l.N_pad + n] = static_cast<uint8_t>(z);
    }
  const int64_t gsz = per_channel ? l.K_pad : gs;
  // A byte holds nibbles of rows g and g + 8 of one 16-row block: parallel over blocks.
#pragma omp parallel for schedule(static)
  for (int64_t nb = 0; nb < l.n_blocks(); ++nb)
    for (int64_t n = nb * 16; n < std::min(q.N, nb * 16 + 16); ++n)
      for (int64_t k = 0; k < l.K_pad; ++k) {
        const int64_t g = std::min<int64_t>(k / gsz, l.G - 1);
        const int code = k < q.K ? q.code(n, k) : l.zeros[g * l.N_pad + n];
        const W4Pos p = gpu_w4_position(l.K_pad, n, k);
        l.qweight[p.byte] = static_cast<uint8_t>(l.qweight[p.byte] | (code << p.shift));
      }
  return l;
}

int gpu_w4_code(const GpuW4Layout& l, int64_t n, int64_t k) {
  const W4Pos p = gpu_w4_position(l.K_pad, n, k);
  return (l.qweight[p.byte] >> p.shift) & 0xf;
}

QuantizedMatrix unpack_w4(const GpuW4Layout& l) {
  QuantizedMatrix q;
  q.N = l.N;
  q.K = l.K;
  q.scheme.bits = 4;
  q.scheme.group = l.group;
  q.scheme.symmetric = l.symmetric;
  q.codes.assign(static_cast<size_t>(q.N * q.row_bytes()), 0);
  q.scales.resize(static_cast<size_t>(q.N * l.G));
  q.zeros.resize(static_cast<size_t>(q.N * l.G));
  for (int64_t n = 0; n < l.N; ++n) {
    for (int64_t g = 0; g < l.G; ++g) {
      q.scales[n * l.G + g] = l.scales[g * l.N_pad + n];
      q.zeros[n * l.G + g] = l.zeros[g * l.N_pad + n];
    }
    for (int64_t k = 0; k < l.K; ++k) q.set_code(n, k, gpu_w4_code(l, n, k));
  }
  return q;
}

int64_t gpu_ec_a_index(int64_t K_pad, int64_t j, int64_t k) {
  const int64_t KB = K_pad / 64;
  const Frag f = frag_of(j % 16, k % 64);
  return ((((j / 16) * KB + k / 64) * 4 + f.s) * 32 + f.lane) * 8 + 2 * f.r + f.h;
}

std::vector<uint16_t> repack_ec_a(const uint16_t* a, int64_t r, int64_t K, int64_t K_pad) {
  SPEAR_CHECK(r > 0 && K > 0 && K_pad >= K && K_pad % kGpuKUnit == 0, "repack_ec_a: bad shape");
  const int64_t r_pad = round_up(r, 16);
  std::vector<uint16_t> out(static_cast<size_t>(r_pad * K_pad), 0);
  for (int64_t j = 0; j < r; ++j)
    for (int64_t k = 0; k < K; ++k) out[gpu_ec_a_index(K_pad, j, k)] = a[j * K + k];
  return out;
}

std::vector<uint16_t> repack_ec_b(const uint16_t* b, int64_t N, int64_t r, int64_t N_pad) {
  SPEAR_CHECK(r > 0 && N > 0 && N_pad >= N, "repack_ec_b: bad shape");
  const int64_t r_pad = round_up(r, 16);
  std::vector<uint16_t> out(static_cast<size_t>(N_pad * r_pad), 0);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t j = 0; j < r; ++j) out[n * r_pad + j] = b[n * r + j];
  return out;
}

}  // namespace spear
