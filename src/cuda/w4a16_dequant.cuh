#pragma once
// The dequantize-then-cuBLAS path of the W4A16 GEMM (Kernel::kDequant, for prefill-sized M):
// W4 rows expanded to 16-bit rows in a scratch buffer, then a tensor-core GEMM from cuBLAS;
// an EC runs split (u = A x by ec_u_kernel, then v = gamma(u) * u in the activation dtype
// here, then cuBLAS y += v B^T).
#include "cuda/w4a16_device.cuh"

namespace spear::cuda::detail {

// out (rows, K_pad) row-major, row stride ld, = the weights of rows [row0, row0 + rows) of
// W in T: (code - zero) * scale, rounded once. row0 and rows are multiples of 16,
// row0 + rows <= N_pad.
//
// One thread per 16-byte lane chunk of a tile (gpu_layout.h): tile (nb, kb), lane
// l = 4 g + q holds in word s, nibble r + 4 h, the code of row g + 8 (r & 1) at
// k = 16 q + 4 s + 2 (r >> 1) + h. Over s = 0..3 the lane therefore owns rows g and g + 8
// at k = 16 q .. 16 q + 15 of the tile: two 32-byte runs of output, written as 16-byte
// stores. Reads are the tiles in memory order (coalesced); 16 consecutive k never cross a
// group (groups are multiples of 128).
template <typename T>
__global__ void __launch_bounds__(256) w4_dequant_kernel(const uint4* __restrict__ qw, const float* __restrict__ scales,
                                                         const uint8_t* __restrict__ zeros, int KB, int N_pad,
                                                         int group, int row0, int rows, T* __restrict__ out,
                                                         int64_t ld) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t n_chunks = static_cast<int64_t>(rows / 16) * KB * 32;
  if (i >= n_chunks) return;
  const int lane = static_cast<int>(i & 31);
  const int64_t tile = i >> 5;
  const int kb = static_cast<int>(tile % KB);
  const int nbl = static_cast<int>(tile / KB);
  const int g = lane >> 2, q = lane & 3;
  const uint4 wv = ld_stream(qw + ((static_cast<int64_t>(row0 / 16 + nbl) * KB + kb) * 32 + lane));
  const uint32_t words[4] = {wv.x, wv.y, wv.z, wv.w};
  const int k0 = kb * 64 + 16 * q;
  const int grp = group ? k0 / group : 0;
#pragma unroll
  for (int ri = 0; ri < 2; ++ri) {
    const int n = row0 + nbl * 16 + g + 8 * ri;
    const int idx = grp * N_pad + n;
    const float sc = scales[idx], z = static_cast<float>(zeros[idx]);
    uint32_t packed[8];
#pragma unroll
    for (int j = 0; j < 16; j += 2) {  // k = k0 + j, k0 + j + 1: word j/4, r = ri + 2((j%4)/2), h = 0, 1
      const int s = j >> 2, r = ri + 2 * ((j & 3) >> 1);
      const float c0 = static_cast<float>((words[s] >> (4 * r)) & 0xfu);
      const float c1 = static_cast<float>((words[s] >> (4 * (r + 4))) & 0xfu);
      packed[j / 2] = Traits<T>::pack2((c0 - z) * sc, (c1 - z) * sc);
    }
    uint4* dst = reinterpret_cast<uint4*>(out + static_cast<int64_t>(nbl * 16 + g + 8 * ri) * ld + k0);
    dst[0] = make_uint4(packed[0], packed[1], packed[2], packed[3]);
    dst[1] = make_uint4(packed[4], packed[5], packed[6], packed[7]);
  }
}

// v (M, r_pad) in T = gamma(u) * u, u (M, r_pad) f32.
template <typename T>
__global__ void ec_gate_cast_kernel(const float* __restrict__ u, int M, int r_pad, int gate, const float* gg,
                                    const float* gc, T* __restrict__ v) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= M * r_pad) return;
  v[i] = Traits<T>::from_f(apply_gate(gate, u[i], gg, gc, i % r_pad));
}

// A (r_pad, K_pad) row-major from the kernel's fragment-tiled layout (quant/gpu_layout.h,
// gpu_ec_a_index: element (j, k) at (((ja KB + kb) 4 + s) 32 + lane) 8 + 2 r + h with, inside
// the 16 x 64 tile, g = j % 8, rb0 = j / 8 % 2, q = k / 16, s = k % 16 / 4, rb1 = k % 4 / 2,
// h = k % 2, lane = 4 g + q, r = rb0 + 2 rb1). One thread per element; padding stays 0.
__global__ void ec_a_untile_kernel(const uint16_t* __restrict__ tiled, int r_pad, int K_pad, uint16_t* __restrict__ out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= static_cast<int64_t>(r_pad) * K_pad) return;
  const int j = static_cast<int>(i / K_pad), k = static_cast<int>(i % K_pad);
  const int jr = j % 16, kr = k % 64, KB = K_pad / 64;
  const int g = jr % 8, rb0 = jr / 8, q = kr / 16, rem = kr % 16;
  const int s = rem / 4, rb1 = (rem % 4) / 2, h = rem % 2;
  const int lane = g * 4 + q, r = rb0 + 2 * rb1;
  const int64_t src = ((((static_cast<int64_t>(j / 16) * KB + k / 64) * 4 + s) * 32 + lane) * 8) + 2 * r + h;
  out[i] = tiled[src];
}

inline cudaError_t launch_ec_a_untile(const uint16_t* tiled, int r_pad, int K_pad, uint16_t* out, cudaStream_t s) {
  const int64_t n = static_cast<int64_t>(r_pad) * K_pad;
  if (n <= 0) return cudaSuccess;
  ec_a_untile_kernel<<<static_cast<unsigned>((n + 255) / 256), 256, 0, s>>>(tiled, r_pad, K_pad, out);
  return cudaGetLastError();
}

// Split EC with the full gate: u (M, r_pad) f32 -> gamma(u) * u in place, one block per
// 8 token rows (the consumers then apply the identity gate).
__global__ void ec_gate_full_kernel(float* __restrict__ u, int M, int r_pad, const float* G, const float* c) {
  constexpr int kRows = 8;
  const int t0 = blockIdx.x * kRows;
  gate_full_rows(u + static_cast<int64_t>(t0) * r_pad, min(kRows, M - t0), r_pad, G, c, threadIdx.x, blockDim.x);
}

inline cudaError_t launch_ec_gate_full(float* u, int M, int r_pad, const float* G, const float* c, cudaStream_t s) {
  if (M <= 0) return cudaSuccess;
  ec_gate_full_kernel<<<(M + 7) / 8, 256, 0, s>>>(u, M, r_pad, G, c);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_dequant(const uint4* qw, const float* scales, const uint8_t* zeros, int KB, int N_pad, int group,
                           int row0, int rows, T* out, int64_t ld, cudaStream_t s) {
  const int64_t n = static_cast<int64_t>(rows / 16) * KB * 32;
  if (n <= 0) return cudaSuccess;
  w4_dequant_kernel<T><<<static_cast<unsigned>((n + 255) / 256), 256, 0, s>>>(qw, scales, zeros, KB, N_pad, group,
                                                                             row0, rows, out, ld);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_ec_gate_cast(const float* u, int M, int r_pad, int gate, const float* gg, const float* gc, T* v,
                                cudaStream_t s) {
  const int n = M * r_pad;
  if (n <= 0) return cudaSuccess;
  ec_gate_cast_kernel<T><<<(n + 255) / 256, 256, 0, s>>>(u, M, r_pad, gate, gg, gc, v);
  return cudaGetLastError();
}

}  // namespace spear::cuda::detail
