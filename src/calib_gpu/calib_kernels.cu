#include "calib_gpu/calib_kernels.h"

#include "calib_gpu/block_reduce.cuh"

#include <cfloat>
#include <cmath>

namespace spear::calib_gpu {

namespace {

constexpr int kThreads = 256;

int blocks_for(int64_t n, int threads = kThreads) {
  return static_cast<int>((n + threads - 1) / threads);
}

__global__ void embed_kernel(const float* __restrict__ table, const int32_t* __restrict__ tok,
                             float* __restrict__ x, int64_t rows, int64_t D) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;  // over rows*D
  if (i >= rows * D) return;
  const int64_t r = i / D, d = i % D;
  x[i] = table[static_cast<int64_t>(tok[r]) * D + d];
}

// One block per row.
__global__ void rmsnorm_kernel(const float* __restrict__ x, const float* __restrict__ w,
                               float* __restrict__ y, int64_t D, float eps) {
  __shared__ float red[32];
  const float* xr = x + static_cast<int64_t>(blockIdx.x) * D;  // (D)
  float* yr = y + static_cast<int64_t>(blockIdx.x) * D;        // (D)
  float ss = 0.0f;
  for (int64_t i = threadIdx.x; i < D; i += blockDim.x) ss += xr[i] * xr[i];
  ss = block_sum(ss, red);
  const float inv = 1.0f / sqrtf(ss / static_cast<float>(D) + eps);
  for (int64_t i = threadIdx.x; i < D; i += blockDim.x) yr[i] = w[i] * (xr[i] * inv);
}

// One thread per (row, head, i < HD/2).
__global__ void rope_kernel(float* __restrict__ x, int64_t rows, int64_t heads, int64_t HD, int64_t T,
                            const float* __restrict__ cs, const float* __restrict__ sn) {
  const int64_t half = HD / 2;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= rows * heads * half) return;
  const int64_t i = idx % half, h = (idx / half) % heads, r = idx / (half * heads);
  const int64_t pos = r % T;
  float* v = x + r * heads * HD + h * HD;  // (HD) one head of one row
  const float c = cs[pos * half + i], s = sn[pos * half + i];
  const float a = v[i], b = v[i + half];
  v[i] = a * c - b * s;
  v[i + half] = b * c + a * s;
}

// One block per (window b, head h, query i); dynamic shared memory: p (T) scores then
// probabilities, qi (HD) the query row.
__global__ void attention_kernel(const float* __restrict__ q, const float* __restrict__ k,
                                 const float* __restrict__ v, float* __restrict__ att, int64_t T,
                                 int64_t NH, int64_t NKV, int64_t HD, float scale) {
  extern __shared__ float sm[];
  __shared__ float red[32];
  float* p = sm;       // (T)
  float* qi = sm + T;  // (HD)
  const int64_t blk = blockIdx.x;
  const int64_t i = blk % T, h = (blk / T) % NH, b = blk / (T * NH);
  const int64_t QD = NH * HD, KVD = NKV * HD, kvh = h / (NH / NKV);
  const float* qrow = q + (b * T + i) * QD + h * HD;  // (HD)
  for (int64_t e = threadIdx.x; e < HD; e += blockDim.x) qi[e] = qrow[e];
  __syncthreads();
  float mx;
  const float inv = causal_row_probs(qi, k, b, T, i, KVD, kvh, HD, scale, p, red, &mx);  // publishes p
  float* orow = att + (b * T + i) * QD + h * HD;  // (HD)
  for (int64_t e = threadIdx.x; e < HD; e += blockDim.x) {
    float acc = 0.0f;
    for (int64_t j = 0; j <= i; ++j) acc += (p[j] * inv) * v[(b * T + j) * KVD + kvh * HD + e];
    orow[e] = acc;
  }
}

__global__ void ec_gate_kernel(const float* __restrict__ z, const float* __restrict__ a,
                               const float* __restrict__ c, float* __restrict__ s,
                               float* __restrict__ gamma, int64_t M, int64_t r) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= M * r) return;
  const float g = 1.0f + tanhf(a[idx] + c[idx % r]);
  s[idx] = g * z[idx];
  if (gamma) gamma[idx] = g;
}

__global__ void swiglu_kernel(const float* g, const float* __restrict__ u, float* h, int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const float x = g[i];
  h[i] = x / (1.0f + expf(-x)) * u[i];
}

__global__ void add_kernel(float* __restrict__ x, const float* __restrict__ y, int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) x[i] += y[i];
}

// log-sum-exp of one row (V), in double; every thread gets it.
__device__ double row_lse(const float* z, int64_t V, double* red) {
  double m = -DBL_MAX;
  for (int64_t i = threadIdx.x; i < V; i += blockDim.x) m = fmax(m, static_cast<double>(z[i]));
  m = block_max(m, red);
  double s = 0;
  for (int64_t i = threadIdx.x; i < V; i += blockDim.x) s += exp(static_cast<double>(z[i]) - m);
  s = block_sum(s, red);
  return m + log(s);
}

// One block per row.
__global__ void log_softmax_kernel(const float* z, float* out, int64_t V) {
  __shared__ double red[32];
  const float* zr = z + static_cast<int64_t>(blockIdx.x) * V;  // (V)
  float* o = out + static_cast<int64_t>(blockIdx.x) * V;       // (V)
  const double lse = row_lse(zr, V, red);
  __syncthreads();  // every thread has read zr before o (which may alias it) is written
  for (int64_t i = threadIdx.x; i < V; i += blockDim.x) o[i] = static_cast<float>(zr[i] - lse);
}

// One block per row.
__global__ void kl_kernel(const float* __restrict__ z, const float* __restrict__ ref, double* kl,
                          int64_t V) {
  __shared__ double red[32];
  const float* zr = z + static_cast<int64_t>(blockIdx.x) * V;    // (V)
  const float* lp = ref + static_cast<int64_t>(blockIdx.x) * V;  // (V)
  const double lse = row_lse(zr, V, red);
  double acc = 0;
  for (int64_t i = threadIdx.x; i < V; i += blockDim.x) {
    const double l = lp[i];
    acc += exp(l) * (l - (static_cast<double>(zr[i]) - lse));
  }
  acc = block_sum(acc, red);
  if (threadIdx.x == 0) kl[blockIdx.x] = acc;
}

}  // namespace

cudaError_t embed_rows(const float* table, const int32_t* tok, float* x, int64_t rows, int64_t D,
                       cudaStream_t stream) {
  if (rows * D == 0) return cudaSuccess;
  embed_kernel<<<blocks_for(rows * D), kThreads, 0, stream>>>(table, tok, x, rows, D);
  return cudaGetLastError();
}

cudaError_t rmsnorm_rows(const float* x, const float* w, float* y, int64_t rows, int64_t D, float eps,
                         cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  rmsnorm_kernel<<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(x, w, y, D, eps);
  return cudaGetLastError();
}

cudaError_t rope_rows(float* x, int64_t rows, int64_t heads, int64_t HD, int64_t T, const float* cos,
                      const float* sin, cudaStream_t stream) {
  const int64_t n = rows * heads * (HD / 2);
  if (n == 0) return cudaSuccess;
  rope_kernel<<<blocks_for(n), kThreads, 0, stream>>>(x, rows, heads, HD, T, cos, sin);
  return cudaGetLastError();
}

cudaError_t causal_attention(const float* q, const float* k, const float* v, float* att, int64_t B,
                             int64_t T, int64_t NH, int64_t NKV, int64_t HD, float scale,
                             cudaStream_t stream) {
  if (B * T * NH == 0) return cudaSuccess;
  if (NKV <= 0 || NH % NKV != 0) return cudaErrorInvalidValue;
  const size_t smem = static_cast<size_t>(T + HD) * sizeof(float);
  if (smem > 48 * 1024) {
    const cudaError_t e = cudaFuncSetAttribute(attention_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               static_cast<int>(smem));
    if (e != cudaSuccess) return e;
  }
  attention_kernel<<<static_cast<unsigned>(B * NH * T), 128, smem, stream>>>(q, k, v, att, T, NH, NKV,
                                                                               HD, scale);
  return cudaGetLastError();
}

cudaError_t ec_gate(const float* z, const float* a, const float* c, float* s, float* gamma, int64_t M,
                    int64_t r, cudaStream_t stream) {
  if (M * r == 0) return cudaSuccess;
  ec_gate_kernel<<<blocks_for(M * r), kThreads, 0, stream>>>(z, a, c, s, gamma, M, r);
  return cudaGetLastError();
}

cudaError_t swiglu(const float* g, const float* u, float* h, int64_t n, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  swiglu_kernel<<<blocks_for(n), kThreads, 0, stream>>>(g, u, h, n);
  return cudaGetLastError();
}

cudaError_t add_inplace(float* x, const float* y, int64_t n, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  add_kernel<<<blocks_for(n), kThreads, 0, stream>>>(x, y, n);
  return cudaGetLastError();
}

cudaError_t log_softmax_rows(const float* z, float* out, int64_t rows, int64_t V, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  log_softmax_kernel<<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(z, out, V);
  return cudaGetLastError();
}

cudaError_t kl_rows(const float* z, const float* ref_logp, double* kl, int64_t rows, int64_t V,
                    cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  kl_kernel<<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(z, ref_logp, kl, V);
  return cudaGetLastError();
}

}  // namespace spear::calib_gpu
