// Device sampling (cuda/sampling.h). One block of kThreads per logits row.
#include "cuda/sampling.h"

#include <cfloat>
#include <cmath>

#include "core/philox.h"

namespace spear::cuda {
namespace {

constexpr int kThreads = 1024;
constexpr unsigned kAll = 0xffffffffu;

// Sum over the block (every thread gets it). Two barriers: the shared slots may be reused
// by the next call as soon as it returns.
__device__ double block_sum(double v) {
  __shared__ double part[kThreads / 32];
  __shared__ double total;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kAll, v, o);
  if (lane == 0) part[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kThreads / 32 ? part[lane] : 0.0;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kAll, v, o);
    if (lane == 0) total = v;
  }
  __syncthreads();
  return total;
}

// Exclusive prefix sum over the block in thread order.
__device__ double block_exclusive_scan(double v) {
  __shared__ double part[kThreads / 32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  double inc = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const double n = __shfl_up_sync(kAll, inc, o);
    if (lane >= o) inc += n;
  }
  if (lane == 31) part[warp] = inc;
  __syncthreads();
  if (warp == 0) {
    double w = part[lane];  // kThreads / 32 == 32 warps
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const double n = __shfl_up_sync(kAll, w, o);
      if (lane >= o) w += n;
    }
    part[lane] = w;  // inclusive over warps
  }
  __syncthreads();
  const double before = warp > 0 ? part[warp - 1] : 0.0;
  __syncthreads();  // part is reused by the next call
  return before + inc - v;
}

__device__ __forceinline__ void argmax_merge(float& bv, int& bi, float ov, int oi) {
  if (oi >= 0 && (bi < 0 || ov > bv || (ov == bv && oi < bi))) {
    bv = ov;
    bi = oi;
  }
}

// #{kept e >= t} (count) or sum{e >= t} over the row.
__device__ double mass_at_least(const float* e, int V, float t, bool count) {
  double s = 0;
  for (int i = threadIdx.x; i < V; i += kThreads) {
    const float v = e[i];
    if (v >= t) s += count ? 1.0 : static_cast<double>(v);
  }
  return block_sum(s);
}

// The largest threshold t in [lo, hi] (as float bits; pred(lo) holds) with
// mass_at_least(t) >= need: bisection over the bit patterns, which order like the values
// for non-negative floats.
__device__ float largest_threshold(const float* e, int V, uint32_t lo, uint32_t hi, double need, bool count) {
  while (lo < hi) {
    const uint32_t mid = lo + (hi - lo + 1) / 2;
    if (mass_at_least(e, V, __uint_as_float(mid), count) >= need)
      lo = mid;
    else
      hi = mid - 1;
  }
  return __uint_as_float(lo);
}

__global__ void __launch_bounds__(kThreads) k_sample(float* __restrict__ logits, int64_t ld, int V,
                                                     const RowSampling* __restrict__ params, int32_t* __restrict__ ids) {
  __shared__ float s_bv[32];
  __shared__ int s_bi[32];
  __shared__ int s_pick, s_last;
  const int row = blockIdx.x;
  float* x = logits + row * ld;
  const RowSampling P = params[row];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;

  // 1. max and argmax
  float bv = -INFINITY;
  int bi = -1;
  for (int i = threadIdx.x; i < V; i += kThreads) argmax_merge(bv, bi, x[i], i);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(kAll, bv, o);
    const int oi = __shfl_xor_sync(kAll, bi, o);
    argmax_merge(bv, bi, ov, oi);
  }
  if (lane == 0) {
    s_bv[warp] = bv;
    s_bi[warp] = bi;
  }
  __syncthreads();
  if (warp == 0) {
    bv = s_bv[lane];
    bi = s_bi[lane];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float ov = __shfl_xor_sync(kAll, bv, o);
      const int oi = __shfl_xor_sync(kAll, bi, o);
      argmax_merge(bv, bi, ov, oi);
    }
    if (lane == 0) {
      s_bv[0] = bv;
      s_bi[0] = bi;
    }
  }
  __syncthreads();
  if (P.temperature == 0.0f || !(s_bv[0] > -INFINITY)) {  // greedy (or a row of -inf: its first id)
    if (threadIdx.x == 0) ids[row] = s_bi[0] < 0 ? 0 : s_bi[0];
    return;
  }
  // 2. unnormalized probabilities, the most likely = 1
  const float mt = s_bv[0] / P.temperature;
  for (int i = threadIdx.x; i < V; i += kThreads) x[i] = expf(x[i] / P.temperature - mt);
  __syncthreads();

  // 3. the cuts, as a threshold on e
  const uint32_t one = __float_as_uint(1.0f);
  float th = P.min_p > 0.0f ? P.min_p : 0.0f;  // min-p: e >= min_p (e of the best is 1)
  if (P.top_k > 0 && P.top_k < V && mass_at_least(x, V, th, true) > P.top_k)
    th = largest_threshold(x, V, __float_as_uint(th), one, static_cast<double>(P.top_k), true);
  if (P.top_p < 1.0f) {
    const double kept = mass_at_least(x, V, th, false);
    th = largest_threshold(x, V, __float_as_uint(th), one, static_cast<double>(P.top_p) * kept, false);
  }

  // 4. the draw: inverse CDF in id order over contiguous per-thread chunks
  const int chunk = (V + kThreads - 1) / kThreads;
  const int b = min(V, threadIdx.x * chunk), e = min(V, b + chunk);
  double mine = 0;
  int last_kept = -1;
  for (int i = b; i < e; ++i)
    if (x[i] >= th) {
      mine += x[i];
      last_kept = i;
    }
  const double before = block_exclusive_scan(mine);
  const double total = block_sum(mine);
  if (threadIdx.x == 0) {
    s_pick = V;
    s_last = -1;
  }
  __syncthreads();
  const double u = philox_uniform(P.seed, P.draw) * total;
  if (mine > 0 && u >= before && u < before + mine) {
    double acc = before;
    for (int i = b; i < e; ++i)
      if (x[i] >= th) {
        acc += x[i];
        if (acc > u) {
          atomicMin(&s_pick, i);
          break;
        }
      }
  }
  if (last_kept >= 0) atomicMax(&s_last, last_kept);
  __syncthreads();
  if (threadIdx.x == 0) ids[row] = s_pick < V ? s_pick : (s_last >= 0 ? s_last : s_bi[0]);  // rounding fallbacks
}

}  // namespace

cudaError_t sample_rows(float* logits, int64_t ld, int T, int V, const RowSampling* params, int32_t* ids,
                        cudaStream_t stream) {
  if (T < 0 || V <= 0 || ld < V) return cudaErrorInvalidValue;
  if (T == 0) return cudaSuccess;
  if (!logits || !params || !ids) return cudaErrorInvalidValue;
  k_sample<<<T, kThreads, 0, stream>>>(logits, ld, V, params, ids);
  return cudaGetLastError();
}

}  // namespace spear::cuda
