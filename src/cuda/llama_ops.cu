// The non-GEMM operations of the GPU Llama engine (src/cuda/llama_ops.h).
//
// Layout notes:
// - Row kernels (embed, rmsnorm, argmax, nll, ec_gate) run one block per row (or per few rows)
//   and reduce in float32 with warp shuffles; a vectorized path is taken when the row is aligned.
// - Attention (decode and prefill) shares one block-level routine, attend(): a block of 128
//   threads holds up to 16 "query rows" (decode: the query heads of one KV head; prefill: 16
//   query tokens of one head) as float in shared memory, walks key positions in tiles of 64
//   (K and V staged in shared memory through the block table), computes the scores of every
//   row, updates a per-row online softmax (max, sum) in float32 and accumulates P V in float32
//   registers. Scores are kept in log2 units (q pre-scaled by scale * log2(e)).
// - Decode workspace: acc (B, n_heads, max_splits, head_dim) float (unnormalized, relative to
//   the split's max), then ml (B, n_heads, max_splits, 2) float (max in log2 units, sum); a
//   second kernel merges the splits of each (sequence, head).
#include <algorithm>
#include <cfloat>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "cuda/llama_ops.h"
#include "cuda/pdl_launch.cuh"

namespace spear::cuda {
namespace {

#define SPEAR_REQUIRE(cond)                   \
  do {                                        \
    if (!(cond)) return cudaErrorInvalidValue; \
  } while (0)

constexpr unsigned kFull = 0xffffffffu;
constexpr float kLog2e = 1.4426950408889634f;

bool aligned(const void* p, size_t n) { return reinterpret_cast<uintptr_t>(p) % n == 0; }

int grid_for(int64_t n, int threads) {
  int64_t b = (n + threads - 1) / threads;
  if (b > 65536) b = 65536;  // grid-stride loops cover the rest
  if (b < 1) b = 1;
  return static_cast<int>(b);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFull, v, o));
  return v;
}
// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the total.
// red: 32 floats of shared memory, used once per kernel.
__device__ __forceinline__ float block_sum(float v, float* red) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nw = blockDim.x / 32;
  v = warp_sum(v);
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float t = lane < nw ? red[lane] : 0.f;
  return warp_sum(t);
}

__device__ __forceinline__ float2 h2f(unsigned u) {
  __half2 h;
  static_assert(sizeof(h) == sizeof(u), "half2 is 4 bytes");
  memcpy(&h, &u, 4);
  return __half22float2(h);
}
__device__ __forceinline__ unsigned f2h(float a, float b) {
  __half2 h = __floats2half2_rn(a, b);
  unsigned u;
  memcpy(&u, &h, 4);
  return u;
}

// ---------------------------------------------------------------------------------------------
// Embedding

__global__ void __launch_bounds__(128) k_embed(const int32_t* __restrict__ tokens, const __half* __restrict__ table,
                                               int64_t V, int D, int vec, float* __restrict__ x) {
  pdl_enter();
  const int64_t t = blockIdx.x;
  const int tok = tokens[t];
  const bool ok = tok >= 0 && tok < V;
  float* xr = x + t * D;
  const __half* tr = table + (ok ? static_cast<int64_t>(tok) * D : 0);
  if (vec) {
    const uint4* src = reinterpret_cast<const uint4*>(tr);
    float4* dst = reinterpret_cast<float4*>(xr);
    for (int i = threadIdx.x; i < D / 8; i += blockDim.x) {
      float4 a = make_float4(0.f, 0.f, 0.f, 0.f), b = a;
      if (ok) {
        const uint4 u = src[i];
        const float2 f0 = h2f(u.x), f1 = h2f(u.y), f2 = h2f(u.z), f3 = h2f(u.w);
        a = make_float4(f0.x, f0.y, f1.x, f1.y);
        b = make_float4(f2.x, f2.y, f3.x, f3.y);
      }
      dst[2 * i] = a;
      dst[2 * i + 1] = b;
    }
  } else {
    for (int i = threadIdx.x; i < D; i += blockDim.x) xr[i] = ok ? __half2float(tr[i]) : 0.f;
  }
}

// ---------------------------------------------------------------------------------------------
// RMSNorm

constexpr int kNormThreads = 256;

// out = x * rinv * w for one row (x re-read: the same thread wrote/read these elements).
__device__ __forceinline__ void norm_store(const float* xr, const float* __restrict__ w, float rinv, int D, int vec,
                                           __half* __restrict__ orow) {
  if (vec) {
    const float4* x4 = reinterpret_cast<const float4*>(xr);
    const float4* w4 = reinterpret_cast<const float4*>(w);
    uint2* o2 = reinterpret_cast<uint2*>(orow);
    for (int i = threadIdx.x; i < D / 4; i += blockDim.x) {
      const float4 v = x4[i], g = w4[i];
      o2[i] = make_uint2(f2h(g.x * (v.x * rinv), g.y * (v.y * rinv)), f2h(g.z * (v.z * rinv), g.w * (v.w * rinv)));
    }
  } else {
    for (int i = threadIdx.x; i < D; i += blockDim.x) orow[i] = __float2half_rn(w[i] * (xr[i] * rinv));
  }
}

__global__ void __launch_bounds__(kNormThreads) k_rmsnorm(const float* __restrict__ x, const float* __restrict__ w,
                                                          float eps, int D, int vec, __half* __restrict__ out) {
  pdl_enter();
  __shared__ float red[32];
  const int64_t t = blockIdx.x;
  const float* xr = x + t * D;
  float ss = 0.f;
  if (vec) {
    const float4* x4 = reinterpret_cast<const float4*>(xr);
    for (int i = threadIdx.x; i < D / 4; i += blockDim.x) {
      const float4 v = x4[i];
      ss += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
    }
  } else {
    for (int i = threadIdx.x; i < D; i += blockDim.x) ss += xr[i] * xr[i];
  }
  ss = block_sum(ss, red);
  const float rinv = rsqrtf(ss / static_cast<float>(D) + eps);
  norm_store(xr, w, rinv, D, vec, out + t * D);
}

__global__ void __launch_bounds__(kNormThreads) k_add_rmsnorm(float* x, const __half* __restrict__ delta,
                                                              int64_t ld_delta, const float* __restrict__ w,
                                                              float eps, int D, int vec, __half* __restrict__ out) {
  pdl_enter();
  __shared__ float red[32];
  const int64_t t = blockIdx.x;
  float* xr = x + t * D;
  const __half* dr = delta + t * ld_delta;
  float ss = 0.f;
  if (vec) {
    float4* x4 = reinterpret_cast<float4*>(xr);
    const uint2* d2 = reinterpret_cast<const uint2*>(dr);
    for (int i = threadIdx.x; i < D / 4; i += blockDim.x) {
      float4 v = x4[i];
      const uint2 u = d2[i];
      const float2 a = h2f(u.x), b = h2f(u.y);
      v.x += a.x;
      v.y += a.y;
      v.z += b.x;
      v.w += b.y;
      x4[i] = v;
      ss += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
    }
  } else {
    for (int i = threadIdx.x; i < D; i += blockDim.x) {
      const float v = xr[i] + __half2float(dr[i]);
      xr[i] = v;
      ss += v * v;
    }
  }
  if (out == nullptr) return;  // uniform over the block
  ss = block_sum(ss, red);
  const float rinv = rsqrtf(ss / static_cast<float>(D) + eps);
  norm_store(xr, w, rinv, D, vec, out + t * D);
}

// ---------------------------------------------------------------------------------------------
// RoPE + KV-cache store: one thread per (token, head, i < head_dim / 2), q heads then kv heads.

__global__ void __launch_bounds__(256) k_rope_store(__half* q, int64_t ldq, __half* k, int64_t ldk,
                                                    const __half* v, int64_t ldv, const int32_t* __restrict__ pos,
                                                    const int32_t* __restrict__ slot,
                                                    const float* __restrict__ cos_tab,
                                                    const float* __restrict__ sin_tab, int max_pos, int T,
                                                    int n_heads, int n_kv_heads, int head_dim, __half* k_cache,
                                                    __half* v_cache) {
  pdl_enter();
  const int half_d = head_dim / 2;
  const int nh = n_heads + n_kv_heads;
  const int64_t total = static_cast<int64_t>(T) * nh * half_d;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int i = static_cast<int>(idx % half_d);
    const int64_t rest = idx / half_d;
    const int hh = static_cast<int>(rest % nh);
    const int64_t t = rest / nh;
    const int p = pos[t];
    const int sl = slot[t];
    if (p < 0 || p >= max_pos || sl < 0) continue;
    const float c = cos_tab[static_cast<int64_t>(p) * half_d + i];
    const float s = sin_tab[static_cast<int64_t>(p) * half_d + i];
    if (hh < n_heads) {
      __half* r = q + t * ldq + static_cast<int64_t>(hh) * head_dim;
      const float x0 = __half2float(r[i]), x1 = __half2float(r[i + half_d]);
      r[i] = __float2half_rn(x0 * c - x1 * s);
      r[i + half_d] = __float2half_rn(x1 * c + x0 * s);
    } else {
      const int kh = hh - n_heads;
      __half* r = k + t * ldk + static_cast<int64_t>(kh) * head_dim;
      const float x0 = __half2float(r[i]), x1 = __half2float(r[i + half_d]);
      const __half y0 = __float2half_rn(x0 * c - x1 * s);
      const __half y1 = __float2half_rn(x1 * c + x0 * s);
      r[i] = y0;
      r[i + half_d] = y1;
      const int64_t dst = (static_cast<int64_t>(sl) * n_kv_heads + kh) * head_dim;
      k_cache[dst + i] = y0;
      k_cache[dst + i + half_d] = y1;
      const __half* vr = v + t * ldv + static_cast<int64_t>(kh) * head_dim;
      v_cache[dst + i] = vr[i];
      v_cache[dst + i + half_d] = vr[i + half_d];
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Attention

// 128 threads; about 47 KB of static shared memory at most, so 4 blocks per SM: the kernels
// say so in __launch_bounds__ (without the hint ptxas spills a few registers).
constexpr int kAttnThreads = 128;
constexpr int kKT = 64;  // key positions per tile
constexpr int kPrefillRows = 16;
constexpr int kMaxGroup = 16;

template <int HD, int ROWS>
struct AttnCfg {
  static_assert(HD == 64 || HD == 128, "head_dim");
  static_assert(ROWS == 1 || ROWS == 2 || ROWS == 4 || ROWS == 8 || ROWS == 16, "rows");
  static constexpr int KS = HD + 4;                        // padded K row (halves): conflict-free 8-byte reads
  static constexpr int PS = ROWS >= 4 ? ROWS + 4 : ROWS;   // padded P row (floats)
  // Scores: thread t takes key t % 64 and rows [sh * SRT, sh * SRT + SRT), sh = t / 64 < SH.
  static constexpr int SH = ROWS < 2 ? ROWS : kAttnThreads / kKT;
  static constexpr int SRT = ROWS / SH;
  // P V: thread t takes dims [4 d4, 4 d4 + 4), d4 = t % DC, rows [gsel * GT, gsel * GT + GT) and the
  // keys p with p % PG == psel, where t / DC = gsel * PG + psel.
  static constexpr int DC = HD / 4;
  static constexpr int R = kAttnThreads / DC;
  static constexpr int GT = ROWS / R > 0 ? ROWS / R : 1;
  static constexpr int NG = ROWS / GT;
  static constexpr int PG = R / NG;
  static_assert(SH * SRT == ROWS && NG * GT == ROWS && NG * PG == R, "mapping");
};

template <int HD, int ROWS>
struct AttnSmem {
  using C = AttnCfg<HD, ROWS>;
  alignas(16) float qs[ROWS][HD];               // q * scale * log2(e)
  alignas(16) unsigned short ks[kKT][C::KS];    // fp16 bits
  alignas(16) unsigned short vs[kKT][HD];       // fp16 bits
  alignas(16) float ps[kKT][C::PS];             // scores, then probabilities
  float m[ROWS], l[ROWS], alpha[ROWS];
  int lim[ROWS];  // last key position row r may attend to (-1: none)
  int seq[ROWS];  // prefill: the sequence of each row
  long long rowoff[kKT];
};

// Walks key positions [kbeg, kend) of one sequence (block table bt) and KV head kvh.
// Before the call: qs, lim set, m = -inf, l = 0 (made visible by the first barrier here).
// Accumulates into acc (zeroed by the caller); m, l hold the softmax state afterwards.
template <int HD, int ROWS>
__device__ __forceinline__ void attend(AttnSmem<HD, ROWS>& sm, const __half* __restrict__ kc,
                                       const __half* __restrict__ vc, const int32_t* __restrict__ bt, int bs,
                                       int n_kv, int kvh, int kbeg, int kend,
                                       float (&acc)[AttnCfg<HD, ROWS>::GT][4]) {
  using C = AttnCfg<HD, ROWS>;
  constexpr int CH = HD / 8;                        // 16-byte chunks per row
  constexpr int NPER = kKT * CH / kAttnThreads;     // chunks per thread per tile
  static_assert(NPER * kAttnThreads == kKT * CH, "staging");
  const int tid = threadIdx.x;
  for (int p0 = kbeg; p0 < kend; p0 += kKT) {
    __syncthreads();  // the previous tile's readers are done; the caller's setup is visible
    if (tid < kKT) {
      const int p = p0 + tid;
      long long off = -1;
      if (p < kend) {
        const long long sl = static_cast<long long>(bt[p / bs]) * bs + p % bs;
        off = (sl * n_kv + kvh) * HD;
      }
      sm.rowoff[tid] = off;
    }
    __syncthreads();
    {  // stage K, then V (rows past kend: zeros); all loads of a tensor in flight at once
      uint4 buf[NPER];
#pragma unroll
      for (int i = 0; i < NPER; ++i) {
        const int c = tid + i * kAttnThreads, row = c / CH, col = c % CH;
        const long long off = sm.rowoff[row];
        buf[i] = off >= 0 ? *reinterpret_cast<const uint4*>(kc + off + col * 8) : make_uint4(0u, 0u, 0u, 0u);
      }
#pragma unroll
      for (int i = 0; i < NPER; ++i) {
        const int c = tid + i * kAttnThreads, row = c / CH, col = c % CH;
        uint2* kd = reinterpret_cast<uint2*>(&sm.ks[row][col * 8]);
        kd[0] = make_uint2(buf[i].x, buf[i].y);
        kd[1] = make_uint2(buf[i].z, buf[i].w);
      }
#pragma unroll
      for (int i = 0; i < NPER; ++i) {
        const int c = tid + i * kAttnThreads, row = c / CH, col = c % CH;
        const long long off = sm.rowoff[row];
        buf[i] = off >= 0 ? *reinterpret_cast<const uint4*>(vc + off + col * 8) : make_uint4(0u, 0u, 0u, 0u);
      }
#pragma unroll
      for (int i = 0; i < NPER; ++i) {
        const int c = tid + i * kAttnThreads, row = c / CH, col = c % CH;
        *reinterpret_cast<uint4*>(&sm.vs[row][col * 8]) = buf[i];
      }
    }
    __syncthreads();
    {  // scores
      const int p = tid % kKT, sh = tid / kKT;
      if (sh < C::SH) {
        float s[C::SRT];
#pragma unroll
        for (int j = 0; j < C::SRT; ++j) s[j] = 0.f;
        const unsigned short* krow = sm.ks[p];
#pragma unroll 4
        for (int d = 0; d < HD; d += 4) {
          const uint2 kk = *reinterpret_cast<const uint2*>(krow + d);
          const float2 k01 = h2f(kk.x), k23 = h2f(kk.y);
#pragma unroll
          for (int j = 0; j < C::SRT; ++j) {
            const float4 qq = *reinterpret_cast<const float4*>(&sm.qs[sh * C::SRT + j][d]);
            s[j] = fmaf(qq.x, k01.x, s[j]);
            s[j] = fmaf(qq.y, k01.y, s[j]);
            s[j] = fmaf(qq.z, k23.x, s[j]);
            s[j] = fmaf(qq.w, k23.y, s[j]);
          }
        }
        const int kp = p0 + p;
#pragma unroll
        for (int j = 0; j < C::SRT; ++j) {
          const int r = sh * C::SRT + j;
          sm.ps[p][r] = (kp < kend && kp <= sm.lim[r]) ? s[j] : -INFINITY;
        }
      }
    }
    __syncthreads();
    {  // online softmax, one warp per row
      const int warp = tid / 32, lane = tid % 32;
      for (int r = warp; r < ROWS; r += kAttnThreads / 32) {
        const float s0 = sm.ps[lane][r], s1 = sm.ps[lane + 32][r];
        const float mx = warp_max(fmaxf(s0, s1));
        const float m_old = sm.m[r];
        const float m_new = fmaxf(m_old, mx);
        const float m_use = m_new == -INFINITY ? 0.f : m_new;  // a row with nothing yet: all zeros
        const float e0 = exp2f(s0 - m_use), e1 = exp2f(s1 - m_use);
        sm.ps[lane][r] = e0;
        sm.ps[lane + 32][r] = e1;
        const float sum = warp_sum(e0 + e1);
        if (lane == 0) {
          const float a = exp2f(m_old - m_use);
          sm.alpha[r] = a;
          sm.l[r] = sm.l[r] * a + sum;
          sm.m[r] = m_new;
        }
      }
    }
    __syncthreads();
    {  // P V
      const int d4 = tid % C::DC, rr = tid / C::DC, gsel = rr / C::PG, psel = rr % C::PG;
#pragma unroll
      for (int j = 0; j < C::GT; ++j) {
        const float a = sm.alpha[gsel * C::GT + j];
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[j][e] *= a;
      }
#pragma unroll 4
      for (int p = psel; p < kKT; p += C::PG) {
        const uint2 vv = *reinterpret_cast<const uint2*>(&sm.vs[p][d4 * 4]);
        const float2 v01 = h2f(vv.x), v23 = h2f(vv.y);
        float pr[C::GT];
        const float* prow = &sm.ps[p][gsel * C::GT];
        if constexpr (C::GT == 4) {
          const float4 t4 = *reinterpret_cast<const float4*>(prow);
          pr[0] = t4.x;
          pr[1] = t4.y;
          pr[2] = t4.z;
          pr[3] = t4.w;
        } else if constexpr (C::GT == 2) {
          const float2 t2 = *reinterpret_cast<const float2*>(prow);
          pr[0] = t2.x;
          pr[1] = t2.y;
        } else {
          pr[0] = prow[0];
        }
#pragma unroll
        for (int j = 0; j < C::GT; ++j) {
          acc[j][0] = fmaf(pr[j], v01.x, acc[j][0]);
          acc[j][1] = fmaf(pr[j], v01.y, acc[j][1]);
          acc[j][2] = fmaf(pr[j], v23.x, acc[j][2]);
          acc[j][3] = fmaf(pr[j], v23.y, acc[j][3]);
        }
      }
    }
  }
}

// When several threads share (rows, dims) over different keys (PG > 1), sums their acc into
// the psel == 0 thread.
template <int HD, int ROWS>
__device__ __forceinline__ void reduce_key_groups(AttnSmem<HD, ROWS>& sm, float (&acc)[AttnCfg<HD, ROWS>::GT][4]) {
  using C = AttnCfg<HD, ROWS>;
  if constexpr (C::PG > 1) {
    static_assert(C::GT == 1, "PG > 1 implies one row per thread");
    static_assert(sizeof(sm.ks) >= sizeof(float) * 4 * kAttnThreads, "reduction buffer");
    const int tid = threadIdx.x;
    const int psel = (tid / C::DC) % C::PG;
    float* buf = reinterpret_cast<float*>(&sm.ks[0][0]);
    __syncthreads();  // nobody reads ks any more
#pragma unroll
    for (int e = 0; e < 4; ++e) buf[tid * 4 + e] = acc[0][e];
    __syncthreads();
    if (psel == 0) {
      for (int g = 1; g < C::PG; ++g)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[0][e] += buf[(tid + g * C::DC) * 4 + e];
    }
  }
}

// Where the decode splits go: partial results (acc unnormalized relative to the split's max,
// ml = (max in log2 units, sum)), one arrival counter per (sequence, KV head) (zero between
// calls), and the merged output.
struct DecodeOut {
  float* acc;     // (B, n_heads, max_splits, head_dim)
  float* ml;      // (B, n_heads, max_splits, 2)
  unsigned* cnt;  // (B, n_kv_heads)
  __half* out;    // (B, n_heads * head_dim), row stride ldo
  int64_t ldo;
};

// Key positions per split of a sequence of len positions: split_len when given (> 0);
// else (0) the length spread over the launch's max_splits splits, in whole tiles of kKT, so
// that a short context still fills the GPU with blocks (the grid is fixed; CUDA graphs).
__device__ __forceinline__ int split_length(int len, int split_len, int max_splits) {
  if (split_len > 0) return split_len;
  const int per = (len + max_splits - 1) / max_splits;
  return max(kKT, (per + kKT - 1) / kKT * kKT);
}

template <int HD, int ROWS>
__global__ void __launch_bounds__(kAttnThreads, 4)
    k_decode_attn(const __half* __restrict__ q, int64_t ldq, const __half* __restrict__ kc,
                  const __half* __restrict__ vc, const int32_t* __restrict__ bts, int max_blocks, int bs, int n_kv,
                  const int32_t* __restrict__ seq_lens, int G, int n_heads, float qscale, int max_len, int split_len,
                  int max_splits, DecodeOut o) {
  pdl_enter();
  using C = AttnCfg<HD, ROWS>;
  __shared__ AttnSmem<HD, ROWS> sm;
  __shared__ int s_last;
  const int split = blockIdx.x, kvh = blockIdx.y, b = blockIdx.z;
  const int len = min(max(seq_lens[b], 0), max_len);
  const int slen = split_length(len, split_len, max_splits);
  const long long kbeg_l = static_cast<long long>(split) * slen;
  if (len == 0 && split == 0) {  // nothing to attend to: an output of 0
    for (int i = threadIdx.x; i < G * HD; i += kAttnThreads)
      o.out[static_cast<int64_t>(b) * o.ldo + static_cast<int64_t>(kvh) * G * HD + i] = __float2half_rn(0.f);
    return;
  }
  if (kbeg_l >= len) return;  // uniform over the block
  const int kbeg = static_cast<int>(kbeg_l);
  const int kend = static_cast<int>(min(static_cast<long long>(len), kbeg_l + slen));
  const int tid = threadIdx.x;
  const __half* qb = q + static_cast<int64_t>(b) * ldq + static_cast<int64_t>(kvh) * G * HD;
  for (int i = tid; i < ROWS * HD; i += kAttnThreads) {
    const int r = i / HD, d = i % HD;
    sm.qs[r][d] = r < G ? __half2float(qb[static_cast<int64_t>(r) * HD + d]) * qscale : 0.f;
  }
  if (tid < ROWS) {
    sm.m[tid] = -INFINITY;
    sm.l[tid] = 0.f;
    sm.lim[tid] = kend - 1;
  }
  float acc[C::GT][4];
#pragma unroll
  for (int j = 0; j < C::GT; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[j][e] = 0.f;
  attend<HD, ROWS>(sm, kc, vc, bts + static_cast<int64_t>(b) * max_blocks, bs, n_kv, kvh, kbeg, kend, acc);
  reduce_key_groups<HD, ROWS>(sm, acc);
  // m and l were last written before the barrier that precedes the final P V step.
  const int d4 = tid % C::DC, rr = tid / C::DC, gsel = rr / C::PG, psel = rr % C::PG;
  const int64_t base = (static_cast<int64_t>(b) * n_heads + static_cast<int64_t>(kvh) * G) * max_splits + split;
  if (psel == 0) {
#pragma unroll
    for (int j = 0; j < C::GT; ++j) {
      const int r = gsel * C::GT + j;
      if (r < G) {
        const int64_t idx = base + static_cast<int64_t>(r) * max_splits;
        *reinterpret_cast<float4*>(o.acc + idx * HD + d4 * 4) = make_float4(acc[j][0], acc[j][1], acc[j][2], acc[j][3]);
      }
    }
  }
  if (tid < G) {
    const int64_t idx = base + static_cast<int64_t>(tid) * max_splits;
    o.ml[idx * 2] = sm.m[tid];
    o.ml[idx * 2 + 1] = sm.l[tid];
  }
  // The last split of this (sequence, KV head) to finish merges all of them (no second
  // kernel): partials made visible device-wide, then one arrival count per block.
  const int ns = static_cast<int>((static_cast<long long>(len) + slen - 1) / slen);
  unsigned* cnt = o.cnt + static_cast<int64_t>(b) * n_kv + kvh;
  __threadfence();
  __syncthreads();
  if (tid == 0) s_last = atomicAdd(cnt, 1u) == static_cast<unsigned>(ns - 1);
  __syncthreads();
  if (!s_last) return;
  __threadfence();
  const int64_t hb0 = (static_cast<int64_t>(b) * n_heads + static_cast<int64_t>(kvh) * G) * max_splits;
  __half* ob = o.out + static_cast<int64_t>(b) * o.ldo + static_cast<int64_t>(kvh) * G * HD;
  // Each split's weight exp2(m_s - M) / L per head, staged in shared memory (the (max, sum)
  // pairs of all splits loaded at once); then each output is one pass of independent loads.
  float* wsm = reinterpret_cast<float*>(&sm.ps[0][0]);
  if (static_cast<size_t>(G) * ns * sizeof(float) <= sizeof(sm.ps)) {
    __syncthreads();  // nobody reads ps any more
    for (int i = tid; i < G * ns; i += kAttnThreads) {
      const int r = i / ns, sp = i % ns;
      wsm[i] = __ldcg(o.ml + (hb0 + static_cast<int64_t>(r) * max_splits + sp) * 2);
    }
    __syncthreads();
    if (tid < G) {
      float* w = wsm + tid * ns;
      float M = -INFINITY, L = 0.f;
      for (int sp = 0; sp < ns; ++sp) M = fmaxf(M, w[sp]);
      for (int sp = 0; sp < ns; ++sp) {
        w[sp] = exp2f(w[sp] - M);
        L = fmaf(w[sp], __ldcg(o.ml + (hb0 + static_cast<int64_t>(tid) * max_splits + sp) * 2 + 1), L);
      }
      const float inv = L > 0.f ? 1.f / L : 0.f;
      for (int sp = 0; sp < ns; ++sp) w[sp] *= inv;
    }
    __syncthreads();
    for (int i = tid; i < G * HD; i += kAttnThreads) {
      const int r = i / HD, d = i % HD;
      const float* acc_r = o.acc + (hb0 + static_cast<int64_t>(r) * max_splits) * HD + d;
      float A = 0.f;
#pragma unroll 8
      for (int sp = 0; sp < ns; ++sp) A = fmaf(wsm[r * ns + sp], __ldcg(acc_r + static_cast<int64_t>(sp) * HD), A);
      ob[static_cast<int64_t>(r) * HD + d] = __float2half_rn(A);
    }
  } else {  // more splits than fit (fixed split_len over a long max_len): straight from global memory
    for (int i = tid; i < G * HD; i += kAttnThreads) {
      const int r = i / HD, d = i % HD;
      const int64_t hb = hb0 + static_cast<int64_t>(r) * max_splits;
      float M = -INFINITY;
      for (int sp = 0; sp < ns; ++sp) M = fmaxf(M, __ldcg(o.ml + (hb + sp) * 2));
      float L = 0.f, A = 0.f;
      for (int sp = 0; sp < ns; ++sp) {
        const float wgt = exp2f(__ldcg(o.ml + (hb + sp) * 2) - M);
        L = fmaf(wgt, __ldcg(o.ml + (hb + sp) * 2 + 1), L);
        A = fmaf(wgt, __ldcg(o.acc + (hb + sp) * HD + d), A);
      }
      ob[static_cast<int64_t>(r) * HD + d] = __float2half_rn(L > 0.f ? A / L : 0.f);
    }
  }
  if (tid == 0) *cnt = 0u;  // for the next call
}

// Prefill: block (tile of 16 query tokens, q head). The tile's tokens are processed one run of
// equal q_seq at a time (a "segment"), each attending to positions [0, min(q_pos, max_pos)].
template <int HD>
__global__ void __launch_bounds__(kAttnThreads, 4)
    k_prefill_attn(const __half* __restrict__ q, int64_t ldq, const __half* __restrict__ kc,
                   const __half* __restrict__ vc, const int32_t* __restrict__ bts, int max_blocks, int bs, int n_kv,
                   const int32_t* __restrict__ q_seq, const int32_t* __restrict__ q_pos, int T, int G, float qscale,
                   int max_pos, __half* __restrict__ out, int64_t ldo) {
  pdl_enter();
  constexpr int ROWS = kPrefillRows;
  using C = AttnCfg<HD, ROWS>;
  __shared__ AttnSmem<HD, ROWS> sm;
  const int tid = threadIdx.x;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * ROWS;
  const int h = blockIdx.y, kvh = h / G;
  const int nrows = static_cast<int>(min(static_cast<int64_t>(ROWS), T - t0));
  for (int i = tid; i < ROWS * HD; i += kAttnThreads) {
    const int r = i / HD, d = i % HD;
    sm.qs[r][d] =
        r < nrows ? __half2float(q[(t0 + r) * ldq + static_cast<int64_t>(h) * HD + d]) * qscale : 0.f;
  }
  if (tid < ROWS) sm.seq[tid] = tid < nrows ? q_seq[t0 + tid] : -1;
  __syncthreads();
  const int d4 = tid % C::DC, rr = tid / C::DC, gsel = rr / C::PG, psel = rr % C::PG;
  int sbeg = 0;
  while (sbeg < nrows) {
    const int s = sm.seq[sbeg];
    int send = sbeg + 1;
    while (send < nrows && sm.seq[send] == s) ++send;
    __syncthreads();  // the previous segment's readers of lim, m, l are done
    if (tid < ROWS) {
      int lim = -1;
      if (tid >= sbeg && tid < send && s >= 0) {
        lim = min(q_pos[t0 + tid], max_pos);
        if (lim < 0) lim = -1;
      }
      sm.lim[tid] = lim;
      sm.m[tid] = -INFINITY;
      sm.l[tid] = 0.f;
    }
    __syncthreads();
    int kend = 0;
    for (int r = sbeg; r < send; ++r) kend = max(kend, sm.lim[r] + 1);
    float acc[C::GT][4];
#pragma unroll
    for (int j = 0; j < C::GT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[j][e] = 0.f;
    const int32_t* bt = bts + (s >= 0 ? static_cast<int64_t>(s) * max_blocks : 0);
    attend<HD, ROWS>(sm, kc, vc, bt, bs, n_kv, kvh, 0, kend, acc);
    reduce_key_groups<HD, ROWS>(sm, acc);
    if (psel == 0) {
#pragma unroll
      for (int j = 0; j < C::GT; ++j) {
        const int r = gsel * C::GT + j;
        if (r >= sbeg && r < send) {
          const float l = sm.l[r];
          const float inv = l > 0.f ? 1.f / l : 0.f;
          __half* o = out + (t0 + r) * ldo + static_cast<int64_t>(h) * HD + d4 * 4;
#pragma unroll
          for (int e = 0; e < 4; ++e) o[e] = __float2half_rn(acc[j][e] * inv);
        }
      }
    }
    sbeg = send;
  }
}

// Any head_dim (a multiple of 8, at most 256) that the tiled kernels above do not cover
// (tiny models such as stories260K, head_dim 8): one warp per (query token, head), lane l
// holding dims l, l + 32, ...; keys one at a time with an online softmax in float32.
// Correct, not fast: used only where the tiled kernels cannot run.
constexpr int kGenericMaxHd = 256;
__global__ void k_attn_generic(const __half* __restrict__ q, int64_t ldq, const __half* __restrict__ kc,
                               const __half* __restrict__ vc, const int32_t* __restrict__ bt, int max_blocks, int bs,
                               int n_kv, int hd, int G, float scale, const int32_t* __restrict__ seq_lens, int max_len,
                               const int32_t* __restrict__ q_seq, const int32_t* __restrict__ q_pos, int max_pos,
                               __half* __restrict__ out, int64_t ldo) {
  pdl_enter();
  const int t = blockIdx.x, h = blockIdx.y, lane = threadIdx.x, kvh = h / G;
  int seq, lim;
  if (seq_lens) {  // decode: token t is sequence t, attending to its whole cached length
    seq = t;
    lim = min(max(seq_lens[t], 0), max_len) - 1;
  } else {  // prefill: causal within its own sequence
    seq = q_seq[t];
    const int p = q_pos[t];
    lim = (seq < 0 || p < 0) ? -1 : min(p, max_pos);
  }
  constexpr int PER = kGenericMaxHd / 32;
  float qv[PER], acc[PER];
#pragma unroll
  for (int i = 0; i < PER; ++i) {
    const int d = lane + 32 * i;
    qv[i] = d < hd ? __half2float(q[static_cast<int64_t>(t) * ldq + static_cast<int64_t>(h) * hd + d]) * scale : 0.f;
    acc[i] = 0.f;
  }
  float m = -INFINITY, l = 0.f;
  for (int p = 0; p <= lim; ++p) {
    const int64_t sl = static_cast<int64_t>(bt[static_cast<int64_t>(seq) * max_blocks + p / bs]) * bs + p % bs;
    const __half* kr = kc + (sl * n_kv + kvh) * hd;
    const __half* vr = vc + (sl * n_kv + kvh) * hd;
    float part = 0.f;
#pragma unroll
    for (int i = 0; i < PER; ++i) {
      const int d = lane + 32 * i;
      if (d < hd) part = fmaf(qv[i], __half2float(kr[d]), part);
    }
    const float sc = warp_sum(part);
    const float m_new = fmaxf(m, sc);
    const float a = __expf(m - m_new), e = __expf(sc - m_new);
    l = l * a + e;
#pragma unroll
    for (int i = 0; i < PER; ++i) {
      const int d = lane + 32 * i;
      if (d < hd) acc[i] = acc[i] * a + e * __half2float(vr[d]);
    }
    m = m_new;
  }
  const float inv = l > 0.f ? 1.f / l : 0.f;
#pragma unroll
  for (int i = 0; i < PER; ++i) {
    const int d = lane + 32 * i;
    if (d < hd) out[static_cast<int64_t>(t) * ldo + static_cast<int64_t>(h) * hd + d] = __float2half(acc[i] * inv);
  }
}

bool tiled_head_dim(int hd) { return hd == 64 || hd == 128; }
bool generic_head_dim(int hd) { return hd > 0 && hd % 8 == 0 && hd <= kGenericMaxHd; }

// The most splits a launch may use: fixed split_len: enough to cover max_len; dynamic (0):
// at most kMaxDynSplits, and no more than whole kKT tiles of max_len.
constexpr int64_t kMaxDynSplits = 64;
int64_t decode_max_splits(int max_len, int split_len) {
  const int64_t s = split_len > 0 ? (static_cast<int64_t>(max_len) + split_len - 1) / split_len
                                  : std::min<int64_t>(kMaxDynSplits, (static_cast<int64_t>(max_len) + kKT - 1) / kKT);
  return s < 1 ? 1 : s;
}

// Dynamic splits: about two blocks per SM over the (KV head, sequence) pairs of the launch.
int64_t decode_dynamic_splits(int max_len, int B, int n_kv) {
  int dev = 0, sms = 132;
  if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess)
    cudaGetLastError();
  const int64_t pairs = static_cast<int64_t>(B) * n_kv;
  const int64_t want = (2 * static_cast<int64_t>(sms) + pairs - 1) / pairs;
  return std::max<int64_t>(1, std::min(want, decode_max_splits(max_len, 0)));
}

// Decode workspace: the arrival counters at the start (slot b * n_kv + kvh at a fixed address,
// whatever B and the split count of a call), the partial results at the end, growing down:
// for any call the buffer admits, the results (sized with the most splits max_len allows)
// never reach a counter slot that some call may use, so the counters stay zero between calls.
size_t decode_counter_bytes(int B, int n_heads) { return (static_cast<size_t>(B) * n_heads * 4 + 255) / 256 * 256; }
size_t decode_partial_bytes(int B, int n_heads, int head_dim, int64_t splits) {
  const size_t rows = static_cast<size_t>(B) * static_cast<size_t>(n_heads) * static_cast<size_t>(splits);
  return rows * static_cast<size_t>(head_dim) * sizeof(float) + (rows * 2 * sizeof(float) + 15) / 16 * 16;
}

// The partial results of a call with `splits` splits end at the end of ws (16-byte aligned).
DecodeOut decode_ws_layout(void* ws, size_t ws_bytes, int B, int n_heads, int hd, int splits, __half* out,
                           int64_t ldo) {
  const size_t rows = static_cast<size_t>(B) * n_heads * splits;
  const uintptr_t end = (reinterpret_cast<uintptr_t>(ws) + ws_bytes) / 16 * 16;
  const uintptr_t start = (end - decode_partial_bytes(B, n_heads, hd, splits)) / 16 * 16;
  DecodeOut o;
  o.acc = reinterpret_cast<float*>(start);
  o.ml = o.acc + rows * hd;
  o.cnt = static_cast<unsigned*>(ws);
  o.out = out;
  o.ldo = ldo;
  return o;
}

bool paged_kv_ok(const PagedKV& kv) {
  return kv.k_cache && kv.v_cache && kv.block_tables && kv.max_blocks > 0 && kv.block_size > 0 &&
         kv.n_kv_heads > 0 && generic_head_dim(kv.head_dim) && aligned(kv.k_cache, 16) &&
         aligned(kv.v_cache, 16);
}

template <int HD, int ROWS>
void launch_decode(dim3 grid, cudaStream_t stream, const __half* q, int64_t ldq, const PagedKV& kv,
                   const int32_t* seq_lens, int G, int n_heads, float qscale, int max_len, int split_len,
                   int max_splits, const DecodeOut& o) {
  launch_pdl(k_decode_attn<HD, ROWS>, grid, kAttnThreads, 0, stream, q, ldq, kv.k_cache, kv.v_cache, kv.block_tables,
                                                             kv.max_blocks, kv.block_size, kv.n_kv_heads, seq_lens, G,
                                                             n_heads, qscale, max_len, split_len, max_splits, o);
}

template <int HD>
void launch_decode_rows(int rows, dim3 grid, cudaStream_t stream, const __half* q, int64_t ldq, const PagedKV& kv,
                        const int32_t* seq_lens, int G, int n_heads, float qscale, int max_len, int split_len,
                        int max_splits, const DecodeOut& o) {
  switch (rows) {
    case 1:
      launch_decode<HD, 1>(grid, stream, q, ldq, kv, seq_lens, G, n_heads, qscale, max_len, split_len, max_splits,
                           o);
      break;
    case 2:
      launch_decode<HD, 2>(grid, stream, q, ldq, kv, seq_lens, G, n_heads, qscale, max_len, split_len, max_splits,
                           o);
      break;
    case 4:
      launch_decode<HD, 4>(grid, stream, q, ldq, kv, seq_lens, G, n_heads, qscale, max_len, split_len, max_splits,
                           o);
      break;
    case 8:
      launch_decode<HD, 8>(grid, stream, q, ldq, kv, seq_lens, G, n_heads, qscale, max_len, split_len, max_splits,
                           o);
      break;
    default:
      launch_decode<HD, 16>(grid, stream, q, ldq, kv, seq_lens, G, n_heads, qscale, max_len, split_len, max_splits,
                            o);
      break;
  }
}

// ---------------------------------------------------------------------------------------------
// SwiGLU, EC gate

__device__ __forceinline__ float silu_mul1(float g, float u) { return g / (1.f + expf(-g)) * u; }

__global__ void __launch_bounds__(256) k_silu_mul(const __half* __restrict__ gate, int64_t ldg,
                                                  const __half* __restrict__ up, int64_t ldu, int T, int H, int vec,
                                                  __half* __restrict__ out) {
  pdl_enter();
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  if (vec) {
    const int H8 = H / 8;
    const int64_t n = static_cast<int64_t>(T) * H8;
    for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n; i += stride) {
      const int64_t t = i / H8;
      const int c = static_cast<int>(i % H8);
      const uint4 g = reinterpret_cast<const uint4*>(gate + t * ldg)[c];
      const uint4 u = reinterpret_cast<const uint4*>(up + t * ldu)[c];
      const unsigned gw[4] = {g.x, g.y, g.z, g.w}, uw[4] = {u.x, u.y, u.z, u.w};
      unsigned ow[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float2 gf = h2f(gw[e]), uf = h2f(uw[e]);
        ow[e] = f2h(silu_mul1(gf.x, uf.x), silu_mul1(gf.y, uf.y));
      }
      reinterpret_cast<uint4*>(out + t * H)[c] = make_uint4(ow[0], ow[1], ow[2], ow[3]);
    }
  } else {
    const int64_t n = static_cast<int64_t>(T) * H;
    for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n; i += stride) {
      const int64_t t = i / H;
      const int c = static_cast<int>(i % H);
      out[i] = __float2half_rn(silu_mul1(__half2float(gate[t * ldg + c]), __half2float(up[t * ldu + c])));
    }
  }
}

constexpr int kEcTokens = 8;    // tokens per block (G read once per 8 tokens)
constexpr int kEcThreads = 256;
constexpr int kEcMaxR = 256;

__global__ void __launch_bounds__(kEcThreads) k_ec_gate(const __half* z, const float* __restrict__ G,
                                                        const float* __restrict__ c, int T, int r, __half* s) {
  pdl_enter();
  __shared__ float zs[kEcTokens][kEcMaxR];
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * kEcTokens;
  for (int i = threadIdx.x; i < kEcTokens * r; i += blockDim.x) {
    const int tt = i / r, j = i % r;
    zs[tt][j] = t0 + tt < T ? __half2float(z[(t0 + tt) * r + j]) : 0.f;
  }
  __syncthreads();  // z read before any s written (s may alias z)
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int i = warp; i < r; i += kEcThreads / 32) {
    float a[kEcTokens];
#pragma unroll
    for (int tt = 0; tt < kEcTokens; ++tt) a[tt] = 0.f;
    for (int j = lane; j < r; j += 32) {
      const float g = G[static_cast<int64_t>(i) * r + j];
#pragma unroll
      for (int tt = 0; tt < kEcTokens; ++tt) a[tt] = fmaf(g, zs[tt][j], a[tt]);
    }
#pragma unroll
    for (int tt = 0; tt < kEcTokens; ++tt) a[tt] = warp_sum(a[tt]);
    float mine = 0.f;  // lane tt writes token tt
#pragma unroll
    for (int tt = 0; tt < kEcTokens; ++tt)
      if (lane == tt) mine = a[tt];
    if (lane < kEcTokens && t0 + lane < T)
      s[(t0 + lane) * r + i] = __float2half_rn((1.f + tanhf(mine + c[i])) * zs[lane][i]);
  }
}

__global__ void __launch_bounds__(256) k_copy_half(const __half* __restrict__ in, int64_t n, __half* __restrict__ out) {
  pdl_enter();
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    out[i] = in[i];
}

// ---------------------------------------------------------------------------------------------
// Row reductions

constexpr int kRowThreads = 512;

__device__ __forceinline__ void argmax_merge(float& bv, int& bi, float ov, int oi) {
  if (oi >= 0 && (bi < 0 || ov > bv || (ov == bv && oi < bi))) {
    bv = ov;
    bi = oi;
  }
}

__global__ void __launch_bounds__(kRowThreads) k_argmax(const float* __restrict__ logits, int64_t ld, int V, int vec,
                                                        int32_t* __restrict__ ids) {
  pdl_enter();
  __shared__ float sv[32];
  __shared__ int si[32];
  const int64_t row = blockIdx.x;
  const float* x = logits + row * ld;
  float bv = -INFINITY;
  int bi = -1;
  if (vec) {
    const float4* x4 = reinterpret_cast<const float4*>(x);
    for (int i = threadIdx.x; i < V / 4; i += blockDim.x) {
      const float4 v = x4[i];
      argmax_merge(bv, bi, v.x, 4 * i);
      argmax_merge(bv, bi, v.y, 4 * i + 1);
      argmax_merge(bv, bi, v.z, 4 * i + 2);
      argmax_merge(bv, bi, v.w, 4 * i + 3);
    }
  } else {
    for (int i = threadIdx.x; i < V; i += blockDim.x) argmax_merge(bv, bi, x[i], i);
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(kFull, bv, o);
    const int oi = __shfl_xor_sync(kFull, bi, o);
    argmax_merge(bv, bi, ov, oi);
  }
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nw = blockDim.x / 32;
  if (lane == 0) {
    sv[warp] = bv;
    si[warp] = bi;
  }
  __syncthreads();
  if (warp == 0) {
    bv = lane < nw ? sv[lane] : -INFINITY;
    bi = lane < nw ? si[lane] : -1;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float ov = __shfl_xor_sync(kFull, bv, o);
      const int oi = __shfl_xor_sync(kFull, bi, o);
      argmax_merge(bv, bi, ov, oi);
    }
    if (lane == 0) ids[row] = bi < 0 ? 0 : bi;
  }
}

// Online logsumexp state: m (running max, starts at -FLT_MAX so -inf logits add exp(-inf) = 0), s.
__device__ __forceinline__ void lse_add(float& m, float& s, float x) {
  if (x > m) {
    s = s * expf(m - x) + 1.f;
    m = x;
  } else {
    s += expf(x - m);
  }
}
__device__ __forceinline__ void lse_merge(float& m, float& s, float om, float os) {
  const float mm = fmaxf(m, om);
  s = s * expf(m - mm) + os * expf(om - mm);
  m = mm;
}

__global__ void __launch_bounds__(kRowThreads) k_nll(const float* __restrict__ logits, int64_t ld,
                                                     const int32_t* __restrict__ target, int V, int vec,
                                                     float* __restrict__ nll) {
  pdl_enter();
  __shared__ float sm_m[32], sm_s[32];
  const int64_t row = blockIdx.x;
  const float* x = logits + row * ld;
  float m = -FLT_MAX, s = 0.f;
  if (vec) {
    const float4* x4 = reinterpret_cast<const float4*>(x);
    for (int i = threadIdx.x; i < V / 4; i += blockDim.x) {
      const float4 v = x4[i];
      lse_add(m, s, v.x);
      lse_add(m, s, v.y);
      lse_add(m, s, v.z);
      lse_add(m, s, v.w);
    }
  } else {
    for (int i = threadIdx.x; i < V; i += blockDim.x) lse_add(m, s, x[i]);
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float om = __shfl_xor_sync(kFull, m, o);
    const float os = __shfl_xor_sync(kFull, s, o);
    lse_merge(m, s, om, os);
  }
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nw = blockDim.x / 32;
  if (lane == 0) {
    sm_m[warp] = m;
    sm_s[warp] = s;
  }
  __syncthreads();
  if (warp == 0) {
    m = lane < nw ? sm_m[lane] : -FLT_MAX;
    s = lane < nw ? sm_s[lane] : 0.f;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float om = __shfl_xor_sync(kFull, m, o);
      const float os = __shfl_xor_sync(kFull, s, o);
      lse_merge(m, s, om, os);
    }
    if (lane == 0) {
      const int tg = target[row];
      float r = 0.f;
      if (tg >= V) r = __int_as_float(0x7fc00000);  // out of range: NaN
      else if (tg >= 0) r = (m - x[tg]) + logf(s);
      nll[row] = r;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Conversions, synthetic data

__global__ void __launch_bounds__(256) k_f32_to_f16(const float* __restrict__ in, int64_t n, __half* __restrict__ out) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    out[i] = __float2half_rn(in[i]);
}

constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ull;

__host__ __device__ __forceinline__ uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}
// A counter-based hash of (seed, i): key = mix64(seed), value = mix64(key + (i + 1) * golden).
__device__ __forceinline__ uint64_t hash_at(uint64_t key, uint64_t i) { return mix64(key + (i + 1) * kGolden); }

__global__ void __launch_bounds__(256) k_fill_f16(__half* __restrict__ out, int64_t n, uint64_t key, float scale) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float u = static_cast<float>(hash_at(key, static_cast<uint64_t>(i)) >> 40) * 0x1p-23f - 1.f;  // [-1, 1)
    out[i] = __float2half_rn(scale * u);
  }
}

// bf16 bits -> fp16 in place: bf16 widens to float32 exactly (the high half of its bits),
// then __float2half_rn rounds to nearest even, overflowing to inf: the host's f32_to_f16.
__global__ void __launch_bounds__(256) k_bf16_to_f16(uint16_t* __restrict__ p, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float f = __uint_as_float(static_cast<uint32_t>(p[i]) << 16);
    p[i] = __half_as_ushort(__float2half_rn(f));
  }
}

__global__ void __launch_bounds__(256) k_fill_f32(float* __restrict__ out, int64_t n, uint64_t key, float lo,
                                                  float hi) {
  const float top = lo < hi ? nextafterf(hi, lo) : hi;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float u = static_cast<float>(hash_at(key, static_cast<uint64_t>(i)) >> 40) * 0x1p-24f;  // [0, 1)
    out[i] = fminf(fmaf(hi - lo, u, lo), top);
  }
}

// Byte i is byte (i % 8) of hash(seed, i / 8): independent of the launch shape and alignment.
__global__ void __launch_bounds__(256) k_fill_bytes(uint8_t* __restrict__ out, int64_t n, uint64_t key) {
  const int64_t chunks = (n + 7) / 8;
  const bool al = reinterpret_cast<uintptr_t>(out) % 8 == 0;
  for (int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; c < chunks;
       c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const uint64_t h = hash_at(key, static_cast<uint64_t>(c));
    if (al && 8 * c + 8 <= n) {
      reinterpret_cast<unsigned long long*>(out)[c] = h;  // little endian: byte e of h at 8c + e
    } else {
      for (int e = 0; e < 8 && 8 * c + e < n; ++e) out[8 * c + e] = static_cast<uint8_t>(h >> (8 * e));
    }
  }
}

}  // namespace

// =============================================================================================
// Launchers

cudaError_t embed_lookup(const int32_t* tokens, const __half* table, int64_t V, int T, int D, float* x,
                         cudaStream_t stream) {
  SPEAR_REQUIRE(T >= 0 && D > 0 && V >= 0);
  if (T == 0) return cudaSuccess;
  SPEAR_REQUIRE(tokens && table && x);
  const int vec = D % 8 == 0 && aligned(table, 16) && aligned(x, 16);
  launch_pdl(k_embed, T, 128, 0, stream, tokens, table, V, D, vec, x);
  return cudaGetLastError();
}

cudaError_t rmsnorm(const float* x, const float* w, float eps, int T, int D, __half* out, cudaStream_t stream) {
  SPEAR_REQUIRE(T >= 0 && D > 0);
  if (T == 0) return cudaSuccess;
  SPEAR_REQUIRE(x && w && out);
  const int vec = D % 4 == 0 && aligned(x, 16) && aligned(w, 16) && aligned(out, 8);
  launch_pdl(k_rmsnorm, T, kNormThreads, 0, stream, x, w, eps, D, vec, out);
  return cudaGetLastError();
}

cudaError_t add_rmsnorm(float* x, const __half* delta, int64_t ld_delta, const float* w, float eps, int T, int D,
                        __half* out, cudaStream_t stream) {
  SPEAR_REQUIRE(T >= 0 && D > 0 && ld_delta >= D);
  if (T == 0) return cudaSuccess;
  SPEAR_REQUIRE(x && delta && (w || !out));
  const int vec = D % 4 == 0 && aligned(x, 16) && aligned(delta, 8) && ld_delta % 4 == 0 &&
                  (!out || (aligned(w, 16) && aligned(out, 8)));
  launch_pdl(k_add_rmsnorm, T, kNormThreads, 0, stream, x, delta, ld_delta, w, eps, D, vec, out);
  return cudaGetLastError();
}

cudaError_t rope_store_kv(__half* q, int64_t ldq, __half* k, int64_t ldk, const __half* v, int64_t ldv,
                          const int32_t* pos, const int32_t* slot, const float* cos_tab, const float* sin_tab,
                          int max_pos, int T, int n_heads, int n_kv_heads, int head_dim, __half* k_cache,
                          __half* v_cache, cudaStream_t stream) {
  SPEAR_REQUIRE(T >= 0 && n_heads > 0 && n_kv_heads > 0 && head_dim > 0 && head_dim % 2 == 0 && max_pos > 0);
  SPEAR_REQUIRE(ldq >= static_cast<int64_t>(n_heads) * head_dim && ldk >= static_cast<int64_t>(n_kv_heads) * head_dim &&
                ldv >= static_cast<int64_t>(n_kv_heads) * head_dim);
  if (T == 0) return cudaSuccess;
  SPEAR_REQUIRE(q && k && v && pos && slot && cos_tab && sin_tab && k_cache && v_cache);
  const int64_t total = static_cast<int64_t>(T) * (n_heads + n_kv_heads) * (head_dim / 2);
  launch_pdl(k_rope_store, grid_for(total, 256), 256, 0, stream, q, ldq, k, ldk, v, ldv, pos, slot, cos_tab, sin_tab, max_pos,
                                                         T, n_heads, n_kv_heads, head_dim, k_cache, v_cache);
  return cudaGetLastError();
}

size_t decode_attention_ws_bytes(int B, int n_heads, int head_dim, int max_len, int split_len) {
  if (B < 0 || n_heads <= 0 || head_dim <= 0 || max_len < 0 || split_len < 0) return 0;
  return decode_counter_bytes(B, n_heads) + decode_partial_bytes(B, n_heads, head_dim, decode_max_splits(max_len, split_len));
}

cudaError_t decode_attention_ws_init(void* ws, size_t ws_bytes, cudaStream_t stream) {
  SPEAR_REQUIRE(ws || ws_bytes == 0);
  return ws_bytes ? cudaMemsetAsync(ws, 0, ws_bytes, stream) : cudaSuccess;
}

cudaError_t decode_attention(const __half* q, int64_t ldq, const PagedKV& kv, const int32_t* seq_lens, int B,
                             int n_heads, float scale, int max_len, __half* out, int64_t ldo, void* ws,
                             size_t ws_bytes, cudaStream_t stream, int split_len) {
  SPEAR_REQUIRE(B >= 0 && B <= 65535 && n_heads > 0 && max_len >= 0);
  SPEAR_REQUIRE(kv.n_kv_heads > 0 && kv.n_kv_heads <= 65535 && n_heads % kv.n_kv_heads == 0 &&
                n_heads / kv.n_kv_heads <= kMaxGroup);
  SPEAR_REQUIRE(generic_head_dim(kv.head_dim));
  SPEAR_REQUIRE(kv.block_size > 0 && split_len >= 0 && split_len % kv.block_size == 0);
  SPEAR_REQUIRE(kv.max_blocks > 0 && static_cast<int64_t>(kv.max_blocks) * kv.block_size >= max_len);
  const int hd = kv.head_dim;
  SPEAR_REQUIRE(ldq >= static_cast<int64_t>(n_heads) * hd && ldo >= static_cast<int64_t>(n_heads) * hd);
  if (B == 0) return cudaSuccess;
  SPEAR_REQUIRE(q && seq_lens && out && ws && paged_kv_ok(kv) && aligned(ws, 16));
  const size_t need = decode_attention_ws_bytes(B, n_heads, hd, max_len, split_len);
  SPEAR_REQUIRE(ws_bytes >= need);
  const int64_t ms64 = split_len > 0 ? decode_max_splits(max_len, split_len)
                                     : decode_dynamic_splits(max_len, B, kv.n_kv_heads);
  SPEAR_REQUIRE(ms64 <= INT_MAX);
  const int max_splits = static_cast<int>(ms64);
  const DecodeOut o = decode_ws_layout(ws, ws_bytes, B, n_heads, hd, max_splits, out, ldo);
  const int G = n_heads / kv.n_kv_heads;
  if (!tiled_head_dim(hd)) {
    launch_pdl(k_attn_generic, dim3(B, n_heads), 32, 0, stream, q, ldq, kv.k_cache, kv.v_cache, kv.block_tables,
                                                        kv.max_blocks, kv.block_size, kv.n_kv_heads, hd, G, scale,
                                                        seq_lens, max_len, nullptr, nullptr, 0, out, ldo);
    return cudaGetLastError();
  }
  const int rows = G <= 1 ? 1 : G <= 2 ? 2 : G <= 4 ? 4 : G <= 8 ? 8 : 16;
  const float qscale = scale * kLog2e;
  const dim3 grid(max_splits, kv.n_kv_heads, B);
  if (hd == 64)
    launch_decode_rows<64>(rows, grid, stream, q, ldq, kv, seq_lens, G, n_heads, qscale, max_len, split_len,
                           max_splits, o);
  else
    launch_decode_rows<128>(rows, grid, stream, q, ldq, kv, seq_lens, G, n_heads, qscale, max_len, split_len,
                            max_splits, o);
  return cudaGetLastError();
}

cudaError_t prefill_attention(const __half* q, int64_t ldq, const PagedKV& kv, const int32_t* q_seq,
                              const int32_t* q_pos, int T, int n_heads, float scale, int max_pos, __half* out,
                              int64_t ldo, cudaStream_t stream) {
  SPEAR_REQUIRE(T >= 0 && n_heads > 0 && n_heads <= 65535 && max_pos >= 0);
  SPEAR_REQUIRE(kv.n_kv_heads > 0 && n_heads % kv.n_kv_heads == 0);
  SPEAR_REQUIRE(generic_head_dim(kv.head_dim));
  SPEAR_REQUIRE(kv.block_size > 0 && kv.max_blocks > 0);
  const int hd = kv.head_dim;
  SPEAR_REQUIRE(ldq >= static_cast<int64_t>(n_heads) * hd && ldo >= static_cast<int64_t>(n_heads) * hd);
  if (T == 0) return cudaSuccess;
  SPEAR_REQUIRE(q && q_seq && q_pos && out && paged_kv_ok(kv));
  const int G = n_heads / kv.n_kv_heads;
  if (!tiled_head_dim(hd)) {
    launch_pdl(k_attn_generic, dim3(T, n_heads), 32, 0, stream, q, ldq, kv.k_cache, kv.v_cache, kv.block_tables,
                                                        kv.max_blocks, kv.block_size, kv.n_kv_heads, hd, G, scale,
                                                        nullptr, 0, q_seq, q_pos, max_pos, out, ldo);
    return cudaGetLastError();
  }
  const float qscale = scale * kLog2e;
  const dim3 grid((T + kPrefillRows - 1) / kPrefillRows, n_heads);
  if (hd == 64)
    launch_pdl(k_prefill_attn<64>, grid, kAttnThreads, 0, stream, q, ldq, kv.k_cache, kv.v_cache, kv.block_tables,
                                                          kv.max_blocks, kv.block_size, kv.n_kv_heads, q_seq, q_pos, T,
                                                          G, qscale, max_pos, out, ldo);
  else
    launch_pdl(k_prefill_attn<128>, grid, kAttnThreads, 0, stream, q, ldq, kv.k_cache, kv.v_cache, kv.block_tables,
                                                           kv.max_blocks, kv.block_size, kv.n_kv_heads, q_seq, q_pos,
                                                           T, G, qscale, max_pos, out, ldo);
  return cudaGetLastError();
}

cudaError_t silu_mul(const __half* gate, int64_t ldg, const __half* up, int64_t ldu, int T, int H, __half* out,
                     cudaStream_t stream) {
  SPEAR_REQUIRE(T >= 0 && H > 0 && ldg >= H && ldu >= H);
  if (T == 0) return cudaSuccess;
  SPEAR_REQUIRE(gate && up && out);
  const int vec = H % 8 == 0 && ldg % 8 == 0 && ldu % 8 == 0 && aligned(gate, 16) && aligned(up, 16) &&
                  aligned(out, 16);
  const int64_t n = static_cast<int64_t>(T) * (vec ? H / 8 : H);
  launch_pdl(k_silu_mul, grid_for(n, 256), 256, 0, stream, gate, ldg, up, ldu, T, H, vec, out);
  return cudaGetLastError();
}

cudaError_t ec_gate(const __half* z, const float* G, const float* c, int T, int r, __half* s, cudaStream_t stream) {
  SPEAR_REQUIRE(T >= 0 && r > 0 && r <= kEcMaxR);
  if (T == 0) return cudaSuccess;
  SPEAR_REQUIRE(z && s);
  if (G == nullptr) {
    if (s == z) return cudaSuccess;
    const int64_t n = static_cast<int64_t>(T) * r;
    launch_pdl(k_copy_half, grid_for(n, 256), 256, 0, stream, z, n, s);
    return cudaGetLastError();
  }
  SPEAR_REQUIRE(c != nullptr);
  launch_pdl(k_ec_gate, (T + kEcTokens - 1) / kEcTokens, kEcThreads, 0, stream, z, G, c, T, r, s);
  return cudaGetLastError();
}

cudaError_t argmax_rows(const float* logits, int64_t ld, int T, int V, int32_t* ids, cudaStream_t stream) {
  SPEAR_REQUIRE(T >= 0 && V > 0 && ld >= V);
  if (T == 0) return cudaSuccess;
  SPEAR_REQUIRE(logits && ids);
  const int vec = V % 4 == 0 && ld % 4 == 0 && aligned(logits, 16);
  launch_pdl(k_argmax, T, kRowThreads, 0, stream, logits, ld, V, vec, ids);
  return cudaGetLastError();
}

cudaError_t nll_rows(const float* logits, int64_t ld, const int32_t* target, int T, int V, float* nll,
                     cudaStream_t stream) {
  SPEAR_REQUIRE(T >= 0 && V > 0 && ld >= V);
  if (T == 0) return cudaSuccess;
  SPEAR_REQUIRE(logits && target && nll);
  const int vec = V % 4 == 0 && ld % 4 == 0 && aligned(logits, 16);
  launch_pdl(k_nll, T, kRowThreads, 0, stream, logits, ld, target, V, vec, nll);
  return cudaGetLastError();
}

cudaError_t f32_to_f16(const float* in, int64_t n, __half* out, cudaStream_t stream) {
  SPEAR_REQUIRE(n >= 0);
  if (n == 0) return cudaSuccess;
  SPEAR_REQUIRE(in && out);
  k_f32_to_f16<<<grid_for(n, 256), 256, 0, stream>>>(in, n, out);
  return cudaGetLastError();
}

cudaError_t fill_uniform_f16(__half* out, int64_t n, uint64_t seed, float scale, cudaStream_t stream) {
  SPEAR_REQUIRE(n >= 0);
  if (n == 0) return cudaSuccess;
  SPEAR_REQUIRE(out);
  k_fill_f16<<<grid_for(n, 256), 256, 0, stream>>>(out, n, mix64(seed), scale);
  return cudaGetLastError();
}

cudaError_t bf16_to_f16_inplace(__half* data, int64_t n, cudaStream_t stream) {
  SPEAR_REQUIRE(n >= 0);
  if (n == 0) return cudaSuccess;
  SPEAR_REQUIRE(data);
  k_bf16_to_f16<<<grid_for(n, 256), 256, 0, stream>>>(reinterpret_cast<uint16_t*>(data), n);
  return cudaGetLastError();
}

cudaError_t fill_uniform_f32(float* out, int64_t n, uint64_t seed, float lo, float hi, cudaStream_t stream) {
  SPEAR_REQUIRE(n >= 0 && lo <= hi);
  if (n == 0) return cudaSuccess;
  SPEAR_REQUIRE(out);
  k_fill_f32<<<grid_for(n, 256), 256, 0, stream>>>(out, n, mix64(seed), lo, hi);
  return cudaGetLastError();
}

cudaError_t fill_random_bytes(uint8_t* out, int64_t n, uint64_t seed, cudaStream_t stream) {
  SPEAR_REQUIRE(n >= 0);
  if (n == 0) return cudaSuccess;
  SPEAR_REQUIRE(out);
  k_fill_bytes<<<grid_for((n + 7) / 8, 256), 256, 0, stream>>>(out, n, mix64(seed));
  return cudaGetLastError();
}

namespace {
__device__ __forceinline__ uint64_t global_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
__global__ void k_spin(int64_t ns) {
  const uint64_t t0 = global_ns();
  while (global_ns() - t0 < static_cast<uint64_t>(ns)) __nanosleep(1000);
}
}  // namespace

cudaError_t gpu_spin(int64_t ns, cudaStream_t stream) {
  SPEAR_REQUIRE(ns >= 0);
  k_spin<<<1, 1, 0, stream>>>(ns);
  return cudaGetLastError();
}

}  // namespace spear::cuda
