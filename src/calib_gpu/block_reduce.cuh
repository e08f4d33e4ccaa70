#pragma once
// Block-wide reductions shared by the calibration kernels (calib_kernels.cu,
// calib_backward.cu), and the attention row both recompute. Device code only: include
// from .cu files.

#include <cfloat>
#include <cstdint>

namespace spear::calib_gpu {

// Block-wide sum of one value per thread (blockDim.x a multiple of 32, ≤ 1024); every
// thread gets the total. shared: ≥ 32 elements.
template <typename F>
__device__ F block_sum(F v, F* shared) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  __syncthreads();  // shared may still be read by a previous reduction
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  F t = 0;
  for (int i = 0; i < nw; ++i) t += shared[i];
  return t;
}

// Block-wide max, as block_sum.
template <typename F>
__device__ F block_max(F v, F* shared) {
  for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, o));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  __syncthreads();
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  F t = shared[0];
  for (int i = 1; i < nw; ++i) t = max(t, shared[i]);
  return t;
}

// One query row of causal attention, the forward's and the backward's: p[j] (j ≤ i) =
// exp(scale q_i·k_j − max) for the keys of window b, KV head kvh (k (B*T, KVD) device, q_i
// (HD) in shared memory); returns 1 / Σ_j p[j] and sets *row_max to the max. Its last
// reduction's __syncthreads publishes p to the block. shared: ≥ 32 floats.
__device__ inline float causal_row_probs(const float* __restrict__ qi, const float* __restrict__ k, int64_t b,
                                         int64_t T, int64_t i, int64_t KVD, int64_t kvh, int64_t HD, float scale,
                                         float* p, float* shared, float* row_max) {
  float mx = -FLT_MAX;
  for (int64_t j = threadIdx.x; j <= i; j += blockDim.x) {
    const float* kj = k + (b * T + j) * KVD + kvh * HD;  // (HD)
    float d = 0.0f;
    for (int64_t e = 0; e < HD; ++e) d += qi[e] * kj[e];
    d *= scale;
    p[j] = d;
    mx = fmaxf(mx, d);
  }
  mx = block_max(mx, shared);
  float s = 0.0f;
  for (int64_t j = threadIdx.x; j <= i; j += blockDim.x) {
    const float e = expf(p[j] - mx);
    p[j] = e;
    s += e;
  }
  s = block_sum(s, shared);
  *row_max = mx;
  return 1.0f / s;
}

}  // namespace spear::calib_gpu
