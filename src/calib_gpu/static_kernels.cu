#include "calib_gpu/static_kernels.h"

#include <cmath>

#include "calib_gpu/block_reduce.cuh"

namespace spear::calib_gpu {

namespace {

constexpr int kThreads = 256;

unsigned blocks_for(int64_t n) { return static_cast<unsigned>((n + kThreads - 1) / kThreads); }

__global__ void add_f32_f64_kernel(const float* __restrict__ src, double* __restrict__ dst, int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) dst[i] += static_cast<double>(src[i]);
}

__global__ void sub_f32_f64_kernel(const float* __restrict__ a, const float* __restrict__ b,
                                   double* __restrict__ dst, int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) dst[i] = static_cast<double>(a[i]) - (b ? static_cast<double>(b[i]) : 0.0);
}

__global__ void mean_kernel(const double* __restrict__ Rsum, double* __restrict__ R, int64_t nn,
                            double inv_tokens) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < nn) R[i] = Rsum[i] * inv_tokens;
}

// One block: the trace in a fixed order (strided partial sums, then the block tree), then
// the damping on the diagonal.
__global__ void damp_diag_kernel(double* __restrict__ R, int64_t n, double damp) {
  __shared__ double red[32];
  double t = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) t += R[i * n + i];
  t = block_sum(t, red);
  const double add = damp * t / static_cast<double>(n) + 1e-12;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) R[i * n + i] += add;
}

__global__ void scale_rows_pow_kernel(const double* __restrict__ V, const double* __restrict__ w, double e,
                                      double* __restrict__ Vs, int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n * n) return;
  Vs[i] = V[i] * pow(fmax(w[i / n], 1e-20), e);
}

__global__ void nll_kernel(const float* __restrict__ logp, const int32_t* __restrict__ tok, int64_t T,
                           int64_t V, double* __restrict__ out) {
  __shared__ double red[32];
  double s = 0;
  for (int64_t t = threadIdx.x; t + 1 < T; t += blockDim.x) s -= logp[t * V + tok[t + 1]];
  s = block_sum(s, red);
  if (threadIdx.x == 0) *out = s;
}

}  // namespace

cudaError_t add_f32_to_f64(const float* src, double* dst, int64_t n, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  add_f32_f64_kernel<<<blocks_for(n), kThreads, 0, stream>>>(src, dst, n);
  return cudaGetLastError();
}

cudaError_t sub_f32_to_f64(const float* a, const float* b, double* dst, int64_t n, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  sub_f32_f64_kernel<<<blocks_for(n), kThreads, 0, stream>>>(a, b, dst, n);
  return cudaGetLastError();
}

cudaError_t damped_mean(const double* Rsum, double* R, int64_t n, double tokens, double damp,
                        cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  mean_kernel<<<blocks_for(n * n), kThreads, 0, stream>>>(Rsum, R, n * n, 1.0 / tokens);
  damp_diag_kernel<<<1, 1024, 0, stream>>>(R, n, damp);
  return cudaGetLastError();
}

cudaError_t scale_rows_pow(const double* V, const double* w, double e, double* Vs, int64_t n,
                           cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  scale_rows_pow_kernel<<<blocks_for(n * n), kThreads, 0, stream>>>(V, w, e, Vs, n);
  return cudaGetLastError();
}

cudaError_t next_token_nll(const float* logp, const int32_t* tok, int64_t T, int64_t V, double* out,
                           cudaStream_t stream) {
  nll_kernel<<<1, 256, 0, stream>>>(logp, tok, T, V, out);
  return cudaGetLastError();
}

}  // namespace spear::calib_gpu
