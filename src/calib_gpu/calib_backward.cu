#include "calib_gpu/calib_backward.h"

#include <cfloat>
#include <cmath>

#include "calib_gpu/block_reduce.cuh"

namespace spear::calib_gpu {

namespace {

constexpr int kThreads = 256;
// The attention kernels' block size: the same as calib_kernels.cu's forward, so that the
// recomputed row sums (a block reduction) are the forward's bit for bit.
constexpr int kAttnThreads = 128;
constexpr int kAttnMaxHD = 2 * kAttnThreads;  // two output columns per thread in the dK/dV kernel
constexpr int kAttnChunk = 512;               // (head, query) pairs staged per round in dK/dV

int blocks_for(int64_t n, int threads = kThreads) {
  return static_cast<int>((n + threads - 1) / threads);
}

// One block per row.
__global__ void rmsnorm_bwd_kernel(const float* __restrict__ x, const float* __restrict__ w,
                                   const float* __restrict__ dy, float* __restrict__ dx, int64_t D,
                                   float eps, bool accumulate) {
  __shared__ float red[32];
  __shared__ double redd[32];
  const float* xr = x + static_cast<int64_t>(blockIdx.x) * D;   // (D)
  const float* dr = dy + static_cast<int64_t>(blockIdx.x) * D;  // (D)
  float* o = dx + static_cast<int64_t>(blockIdx.x) * D;         // (D)
  float ss = 0.0f;
  for (int64_t i = threadIdx.x; i < D; i += blockDim.x) ss += xr[i] * xr[i];
  ss = block_sum(ss, red);
  const float r = 1.0f / sqrtf(ss / static_cast<float>(D) + eps);
  double dot = 0;
  for (int64_t i = threadIdx.x; i < D; i += blockDim.x) dot += static_cast<double>(dr[i]) * w[i] * xr[i];
  dot = block_sum(dot, redd);
  const float k = static_cast<float>(dot) * r * r * r / static_cast<float>(D);
  for (int64_t i = threadIdx.x; i < D; i += blockDim.x) {
    const float v = r * dr[i] * w[i] - xr[i] * k;
    o[i] = accumulate ? o[i] + v : v;
  }
}

// One thread per (row, head, i < HD/2): (a, b) -> (a c + b s, b c − a s).
__global__ void rope_bwd_kernel(float* __restrict__ x, int64_t rows, int64_t heads, int64_t HD, int64_t T,
                                const float* __restrict__ cs, const float* __restrict__ sn) {
  const int64_t half = HD / 2;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= rows * heads * half) return;
  const int64_t i = idx % half, h = (idx / half) % heads, r = idx / (half * heads);
  const int64_t pos = r % T;
  float* v = x + r * heads * HD + h * HD;  // (HD) one head of one row
  const float c = cs[pos * half + i], s = sn[pos * half + i];
  const float a = v[i], b = v[i + half];
  v[i] = a * c + b * s;
  v[i + half] = b * c - a * s;
}

__global__ void swiglu_bwd_kernel(const float* __restrict__ g, const float* __restrict__ u,
                                  const float* __restrict__ dh, float* __restrict__ dg,
                                  float* __restrict__ du, int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const float x = g[i];
  const float sg = 1.0f / (1.0f + expf(-x));
  du[i] = dh[i] * (x * sg);
  dg[i] = dh[i] * u[i] * (sg * (1.0f + x * (1.0f - sg)));
}

__global__ void ec_gate_bwd_kernel(const float* __restrict__ ds, const float* __restrict__ z,
                                   const float* __restrict__ gamma, float* __restrict__ da,
                                   float* __restrict__ dz, int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const float t = gamma[i] - 1.0f;
  da[i] = ds[i] * z[i] * (1.0f - t * t);
  dz[i] = ds[i] * gamma[i];
}

// One block per column.
__global__ void col_sum_kernel(const float* __restrict__ a, float* __restrict__ out, int64_t M, int64_t r) {
  __shared__ float red[32];
  const int64_t col = blockIdx.x;
  float s = 0.0f;
  for (int64_t m = threadIdx.x; m < M; m += blockDim.x) s += a[m * r + col];
  s = block_sum(s, red);
  if (threadIdx.x == 0) out[col] += s;
}

// dQ and the row statistics. One block per (window b, head h, query i), blocks ordered as
// the forward's; dynamic shared memory: p (T), qi (HD), doi (HD).
// stats (B*NH*T, 3): the row's max score, 1 / Σ exp, and D_i = dO_i · O_i.
__global__ void attn_bwd_q_kernel(const float* __restrict__ q, const float* __restrict__ k,
                                  const float* __restrict__ v, const float* __restrict__ att,
                                  const float* __restrict__ datt, float* __restrict__ dq,
                                  float* __restrict__ stats, int64_t T, int64_t NH, int64_t NKV,
                                  int64_t HD, float scale) {
  extern __shared__ float sm[];
  __shared__ float red[32];
  float* p = sm;          // (T)
  float* qi = sm + T;     // (HD)
  float* doi = qi + HD;   // (HD)
  const int64_t blk = blockIdx.x;
  const int64_t i = blk % T, h = (blk / T) % NH, b = blk / (T * NH);
  const int64_t QD = NH * HD, KVD = NKV * HD, kvh = h / (NH / NKV);
  const float* qrow = q + (b * T + i) * QD + h * HD;      // (HD)
  const float* orow = att + (b * T + i) * QD + h * HD;    // (HD)
  const float* drow = datt + (b * T + i) * QD + h * HD;   // (HD)
  for (int64_t e = threadIdx.x; e < HD; e += blockDim.x) {
    qi[e] = qrow[e];
    doi[e] = drow[e];
  }
  __syncthreads();
  // The forward's probabilities, by the same code as attention_kernel.
  float mx;
  const float inv = causal_row_probs(qi, k, b, T, i, KVD, kvh, HD, scale, p, red, &mx);
  float dd = 0.0f;
  for (int64_t e = threadIdx.x; e < HD; e += blockDim.x) dd += doi[e] * orow[e];
  dd = block_sum(dd, red);
  // dS_j = P_j (dO_i · v_j − D_i), into p.
  for (int64_t j = threadIdx.x; j <= i; j += blockDim.x) {
    const float* vj = v + (b * T + j) * KVD + kvh * HD;  // (HD)
    float dp = 0.0f;
    for (int64_t e = 0; e < HD; ++e) dp += doi[e] * vj[e];
    const float pj = p[j] * inv;
    p[j] = pj * (dp - dd);
  }
  __syncthreads();
  float* dqrow = dq + (b * T + i) * QD + h * HD;  // (HD)
  for (int64_t e = threadIdx.x; e < HD; e += blockDim.x) {
    float acc = 0.0f;
    for (int64_t j = 0; j <= i; ++j) acc += p[j] * k[(b * T + j) * KVD + kvh * HD + e];
    dqrow[e] = scale * acc;
  }
  if (threadIdx.x == 0) {
    stats[blk * 3 + 0] = mx;
    stats[blk * 3 + 1] = inv;
    stats[blk * 3 + 2] = dd;
  }
}

// dK and dV. One block per (window b, KV head, key j), kAttnThreads threads; the (head of
// the group, query i ≥ j) pairs are staged kAttnChunk at a time: P_ij and dS_ij, then
// each thread accumulates its ≤ 2 output columns.
__global__ void attn_bwd_kv_kernel(const float* __restrict__ q, const float* __restrict__ k,
                                   const float* __restrict__ v, const float* __restrict__ datt,
                                   const float* __restrict__ stats, float* __restrict__ dk,
                                   float* __restrict__ dv, int64_t T, int64_t NH, int64_t NKV,
                                   int64_t HD, float scale) {
  __shared__ float kj[kAttnMaxHD], vj[kAttnMaxHD];     // (HD) key and value row j
  __shared__ float ps[kAttnChunk], dss[kAttnChunk];    // (chunk) P_ij, dS_ij of the staged pairs
  const int64_t blk = blockIdx.x;
  const int64_t j = blk % T, kvh = (blk / T) % NKV, b = blk / (T * NKV);
  const int64_t QD = NH * HD, KVD = NKV * HD, group = NH / NKV, span = T - j;
  for (int64_t e = threadIdx.x; e < HD; e += blockDim.x) {
    kj[e] = k[(b * T + j) * KVD + kvh * HD + e];
    vj[e] = v[(b * T + j) * KVD + kvh * HD + e];
  }
  float acck[2] = {0.0f, 0.0f}, accv[2] = {0.0f, 0.0f};
  const int64_t n = group * span;
  for (int64_t c0 = 0; c0 < n; c0 += kAttnChunk) {
    __syncthreads();  // kj, vj loaded; the previous chunk consumed
    for (int64_t t = threadIdx.x; t < kAttnChunk && c0 + t < n; t += blockDim.x) {
      const int64_t idx = c0 + t, h = kvh * group + idx / span, i = j + idx % span;
      const float* qrow = q + (b * T + i) * QD + h * HD;     // (HD)
      const float* drow = datt + (b * T + i) * QD + h * HD;  // (HD)
      float d = 0.0f;
      for (int64_t e = 0; e < HD; ++e) d += qrow[e] * kj[e];
      d *= scale;
      const float* st = stats + ((b * NH + h) * T + i) * 3;
      const float pij = expf(d - st[0]) * st[1];
      float dp = 0.0f;
      for (int64_t e = 0; e < HD; ++e) dp += drow[e] * vj[e];
      ps[t] = pij;
      dss[t] = pij * (dp - st[2]);
    }
    __syncthreads();
    const int64_t cnt = n - c0 < kAttnChunk ? n - c0 : kAttnChunk;
    for (int rr = 0; rr < 2; ++rr) {
      const int64_t e = rr * blockDim.x + threadIdx.x;
      if (e >= HD) break;
      float ak = acck[rr], av = accv[rr];
      for (int64_t t = 0; t < cnt; ++t) {
        const int64_t idx = c0 + t, h = kvh * group + idx / span, i = j + idx % span;
        const int64_t off = (b * T + i) * QD + h * HD + e;
        ak += dss[t] * q[off];
        av += ps[t] * datt[off];
      }
      acck[rr] = ak;
      accv[rr] = av;
    }
  }
  for (int rr = 0; rr < 2; ++rr) {
    const int64_t e = rr * blockDim.x + threadIdx.x;
    if (e >= HD) break;
    dk[(b * T + j) * KVD + kvh * HD + e] = scale * acck[rr];
    dv[(b * T + j) * KVD + kvh * HD + e] = accv[rr];
  }
}

// log-sum-exp of one row (V), in double; every thread gets it (as calib_kernels.cu).
__device__ double row_lse(const float* z, int64_t V, double* red) {
  double m = -DBL_MAX;
  for (int64_t i = threadIdx.x; i < V; i += blockDim.x) m = fmax(m, static_cast<double>(z[i]));
  m = block_max(m, red);
  double s = 0;
  for (int64_t i = threadIdx.x; i < V; i += blockDim.x) s += exp(static_cast<double>(z[i]) - m);
  s = block_sum(s, red);
  return m + log(s);
}

// One block per row. dl may alias z: row_lse's last reduction has every thread past its
// reads of z before any writes, and each element is then read and written by one thread.
__global__ void kl_grad_kernel(const float* z, const float* __restrict__ ref, double* __restrict__ kl,
                               float* dl, float scale, int64_t V) {
  __shared__ double red[32];
  const float* zr = z + static_cast<int64_t>(blockIdx.x) * V;    // (V)
  const float* lp = ref + static_cast<int64_t>(blockIdx.x) * V;  // (V)
  float* dr = dl + static_cast<int64_t>(blockIdx.x) * V;         // (V)
  const double lse = row_lse(zr, V, red);
  double acc = 0;
  for (int64_t i = threadIdx.x; i < V; i += blockDim.x) {
    const double l = lp[i];
    const double lq = static_cast<double>(zr[i]) - lse;
    const double pi = exp(l);
    acc += pi * (l - lq);
    dr[i] = static_cast<float>(static_cast<double>(scale) * (exp(lq) - pi));
  }
  acc = block_sum(acc, red);
  if (threadIdx.x == 0) kl[blockIdx.x] = acc;
}

}  // namespace

cudaError_t rmsnorm_backward_rows(const float* x, const float* w, const float* dy, float* dx,
                                  int64_t rows, int64_t D, float eps, bool accumulate,
                                  cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  rmsnorm_bwd_kernel<<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(x, w, dy, dx, D, eps, accumulate);
  return cudaGetLastError();
}

cudaError_t rope_backward_rows(float* g, int64_t rows, int64_t heads, int64_t HD, int64_t T,
                               const float* cos, const float* sin, cudaStream_t stream) {
  const int64_t n = rows * heads * (HD / 2);
  if (n == 0) return cudaSuccess;
  rope_bwd_kernel<<<blocks_for(n), kThreads, 0, stream>>>(g, rows, heads, HD, T, cos, sin);
  return cudaGetLastError();
}

cudaError_t swiglu_backward(const float* g, const float* u, const float* dh, float* dg, float* du,
                            int64_t n, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  swiglu_bwd_kernel<<<blocks_for(n), kThreads, 0, stream>>>(g, u, dh, dg, du, n);
  return cudaGetLastError();
}

cudaError_t ec_gate_backward(const float* ds, const float* z, const float* gamma, float* da, float* dz,
                             int64_t M, int64_t r, cudaStream_t stream) {
  if (M * r == 0) return cudaSuccess;
  ec_gate_bwd_kernel<<<blocks_for(M * r), kThreads, 0, stream>>>(ds, z, gamma, da, dz, M * r);
  return cudaGetLastError();
}

cudaError_t col_sum_add(const float* a, float* out, int64_t M, int64_t r, cudaStream_t stream) {
  if (r == 0) return cudaSuccess;
  col_sum_kernel<<<static_cast<unsigned>(r), kThreads, 0, stream>>>(a, out, M, r);
  return cudaGetLastError();
}

cudaError_t causal_attention_backward(const float* q, const float* k, const float* v, const float* att,
                                      const float* datt, float* dq, float* dk, float* dv, float* stats,
                                      int64_t B, int64_t T, int64_t NH, int64_t NKV, int64_t HD,
                                      float scale, cudaStream_t stream) {
  if (B * T * NH == 0) return cudaSuccess;
  if (NKV <= 0 || NH % NKV != 0 || HD > kAttnMaxHD) return cudaErrorInvalidValue;
  const size_t smem = static_cast<size_t>(T + 2 * HD) * sizeof(float);
  if (smem > 48 * 1024) {
    const cudaError_t e = cudaFuncSetAttribute(attn_bwd_q_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               static_cast<int>(smem));
    if (e != cudaSuccess) return e;
  }
  attn_bwd_q_kernel<<<static_cast<unsigned>(B * NH * T), kAttnThreads, smem, stream>>>(
      q, k, v, att, datt, dq, stats, T, NH, NKV, HD, scale);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return e;
  attn_bwd_kv_kernel<<<static_cast<unsigned>(B * NKV * T), kAttnThreads, 0, stream>>>(
      q, k, v, datt, stats, dk, dv, T, NH, NKV, HD, scale);
  return cudaGetLastError();
}

cudaError_t kl_grad_rows(const float* z, const float* ref_logp, double* kl, float* dlogits, float scale,
                         int64_t rows, int64_t V, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  kl_grad_kernel<<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(z, ref_logp, kl, dlogits, scale, V);
  return cudaGetLastError();
}

}  // namespace spear::calib_gpu
