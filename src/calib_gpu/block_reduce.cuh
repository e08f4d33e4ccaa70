#pragma once
// Block-wide reductions shared by the calibration kernels (calib_kernels.cu,
// calib_backward.cu). Device code only: include from .cu files.

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

}  // namespace spear::calib_gpu
