#pragma once
// The W4A16 kernels. Decode (M <= 64): each warp streams 16-row blocks of W4 along K
// straight from global memory (16-byte loads, L1 bypassed) and feeds mma.sync with x read
// from L1; fused EC computes u = A x in the same launch. Prefill: a cp.async multistage
// tiled tensor-core GEMM (BN = 128 outputs x BM tokens x 128 of K per stage).
// See docs/KERNELS.md.
#include "cuda/w4a16_device.cuh"

namespace spear::cuda::detail {

struct DecodeParams {
  const void* x;
  int64_t ldx;
  void* y;
  int64_t ldy;
  int M, N, K;
  const uint4* qw;
  const float* scales;
  const uint8_t* zeros;
  int N_pad, KB, KU, upg;  // k-blocks (64), units (128), units per group
  int NG, splits;          // 16*nt-row groups, K splits
  float* ws_y;             // split-K partial sums (zero between calls): decode/prefill (M, N_pad),
                           // batch per tile in fragment order (split_k_serial)
  unsigned* ws_cnt;        // (NG) split-K arrival counters (zero between calls)
  int ec;                  // 0 none, 1 fused, 2 u given
  const uint4* ec_a;
  const void* ec_b;
  const float* gate_g;
  const float* gate_c;
  int gate, r_pad;
  int a_chunks, a_units;      // split EC (ec_u_kernel): (r_pad/16) tiles x a_chunks chunks of a_units units
  int nA, a_blocks;           // fused EC: nA = (r_pad/16) KU one-warp items on the first a_blocks
                              //   blocks (item i: block i % a_blocks, warp i / a_blocks)
  float* u;                   // fused: (M, r_pad) accumulators (zero between calls); split: input
  unsigned* ctrl;             // fused: [1] A items done [2] blocks that have read u
  int x_vec;
  int max_units;              // bulk: units (1 KB per 16-row block) of the largest K split
  int w_smem;                 // bulk: bytes of the weight slice at the start of dynamic smem (else 0)
};

// x fragments (B operand) of one 64-wide k-block for TG token groups: lane (g, q) takes
// x[token 8 tg + g][k0 + 16 q .. + 16), 2 x 16 bytes (see gpu_layout.h).
template <typename T, int TG>
__device__ __forceinline__ void load_x(const T* __restrict__ x, int64_t ldx, int M, int K, bool vec, int k0, int lane,
                                       uint4 (&xv)[TG][2]) {
  const int g = lane >> 2, kq = k0 + (lane & 3) * 16;
#pragma unroll
  for (int tg = 0; tg < TG; ++tg) {
    const int t = tg * 8 + g;
    xv[tg][0] = make_uint4(0, 0, 0, 0);
    xv[tg][1] = make_uint4(0, 0, 0, 0);
    if (t < M) {
      const T* row = x + static_cast<int64_t>(t) * ldx;
      if (vec) {
        if (kq < K) xv[tg][0] = __ldg(reinterpret_cast<const uint4*>(row + kq));
        if (kq + 8 < K) xv[tg][1] = __ldg(reinterpret_cast<const uint4*>(row + kq + 8));
      } else {
        const unsigned short* r16 = reinterpret_cast<const unsigned short*>(row);
        uint32_t w[8];
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          const int k = kq + 2 * j;
          const uint32_t a = k < K ? r16[k] : 0u, b = k + 1 < K ? r16[k + 1] : 0u;
          w[j] = a | (b << 16);
        }
        xv[tg][0] = make_uint4(w[0], w[1], w[2], w[3]);
        xv[tg][1] = make_uint4(w[4], w[5], w[6], w[7]);
      }
    }
  }
}

// B-operand registers of sub-tile s from the lane's 16 x values.
__device__ __forceinline__ uint32_t xb0(const uint4 (&v)[2], int s) { return word_of(v[s >> 1], (s & 1) * 2); }
__device__ __forceinline__ uint32_t xb1(const uint4 (&v)[2], int s) { return word_of(v[s >> 1], (s & 1) * 2 + 1); }

template <typename T>
__device__ __forceinline__ uint32_t zero_pair(const uint8_t* zeros, int idx) {
  const float z = Traits<T>::kMagicF + static_cast<float>(zeros[idx]);
  return Traits<T>::pack2(z, z);
}

// u[t][ja*16 + row] += sum_k A[ja*16+row][k] x[t][k] over one A item (a 16-row tile and a
// chunk of K), for M <= 8 TG tokens. red: >= 16 * 8 TG floats of zeroed shared memory.
template <typename T, int TG>
__device__ void a_item(const DecodeParams& p, const T* __restrict__ x, int M, float* u, int item, float* red) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nw = blockDim.x >> 5;
  const int g = lane >> 2, q = lane & 3;
  const int ja = item / p.a_chunks, kc = item % p.a_chunks;
  const int u0 = kc * p.a_units, u1 = min(p.KU, u0 + p.a_units);
  float acc[TG][4];
#pragma unroll
  for (int tg = 0; tg < TG; ++tg) acc[tg][0] = acc[tg][1] = acc[tg][2] = acc[tg][3] = 0.f;
  for (int un = u0 + warp; un < u1; un += nw) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int kb = 2 * un + h;
      uint4 av[4];
#pragma unroll
      for (int s = 0; s < 4; ++s)
        av[s] = ld_stream(p.ec_a + ((static_cast<int64_t>(ja) * p.KB + kb) * 4 + s) * 32 + lane);
      uint4 xv[TG][2];
      load_x<T, TG>(x, p.ldx, M, p.K, p.x_vec, kb * 64, lane, xv);
#pragma unroll
      for (int s = 0; s < 4; ++s) {
        const uint32_t a[4] = {av[s].x, av[s].y, av[s].z, av[s].w};
#pragma unroll
        for (int tg = 0; tg < TG; ++tg) mma16816<T>(acc[tg], a, xb0(xv[tg], s), xb1(xv[tg], s));
      }
    }
  }
  constexpr int TM = TG * 8;
#pragma unroll
  for (int tg = 0; tg < TG; ++tg) {
    atomicAdd(&red[g * TM + tg * 8 + 2 * q], acc[tg][0]);
    atomicAdd(&red[g * TM + tg * 8 + 2 * q + 1], acc[tg][1]);
    atomicAdd(&red[(g + 8) * TM + tg * 8 + 2 * q], acc[tg][2]);
    atomicAdd(&red[(g + 8) * TM + tg * 8 + 2 * q + 1], acc[tg][3]);
  }
  __syncthreads();
  for (int i = tid; i < 16 * M; i += blockDim.x) {
    const int t = i / 16, row = i % 16;
    atomicAdd(&u[t * p.r_pad + ja * 16 + row], red[row * TM + t]);
  }
  __threadfence();
  __syncthreads();
}

// Fused EC, one A item per warp: u[t][16 ja + row] += A[16 ja + row][unit un] . x[t][unit un]
// for a 16-rank x 128-input tile (item = ja * KU + un). The A fragments are loaded before
// griddepcontrol.wait (A does not depend on the previous kernel); the products go
// straight to u with global float atomics, then the warp counts its item done (release).
__device__ __forceinline__ void a_warp_load(const DecodeParams& p, int item, uint4 (&av)[2][4]) {
  const int lane = threadIdx.x & 31;
  const int ja = item / p.KU, un = item % p.KU;
#pragma unroll
  for (int h = 0; h < 2; ++h)
#pragma unroll
    for (int s = 0; s < 4; ++s)
      av[h][s] = ld_stream(p.ec_a + ((static_cast<int64_t>(ja) * p.KB + 2 * un + h) * 4 + s) * 32 + lane);
}
template <typename T, int TG>
__device__ __forceinline__ void a_warp_item(const DecodeParams& p, int item, const uint4 (&av)[2][4]) {
  const int lane = threadIdx.x & 31, g = lane >> 2, q = lane & 3;
  const int ja = item / p.KU, un = item % p.KU;
  const T* __restrict__ x = static_cast<const T*>(p.x);
  float acc[TG][4];
#pragma unroll
  for (int tg = 0; tg < TG; ++tg) acc[tg][0] = acc[tg][1] = acc[tg][2] = acc[tg][3] = 0.f;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    uint4 xv[TG][2];
    load_x<T, TG>(x, p.ldx, p.M, p.K, p.x_vec, (2 * un + h) * 64, lane, xv);
#pragma unroll
    for (int s = 0; s < 4; ++s) {
      const uint32_t a[4] = {av[h][s].x, av[h][s].y, av[h][s].z, av[h][s].w};
#pragma unroll
      for (int tg = 0; tg < TG; ++tg) mma16816<T>(acc[tg], a, xb0(xv[tg], s), xb1(xv[tg], s));
    }
  }
  float* u = p.u + ja * 16 + g;
#pragma unroll
  for (int tg = 0; tg < TG; ++tg) {
    const int t = tg * 8 + 2 * q;
    if (t < p.M) {
      atomicAdd(u + static_cast<int64_t>(t) * p.r_pad, acc[tg][0]);
      atomicAdd(u + static_cast<int64_t>(t) * p.r_pad + 8, acc[tg][2]);
    }
    if (t + 1 < p.M) {
      atomicAdd(u + static_cast<int64_t>(t + 1) * p.r_pad, acc[tg][1]);
      atomicAdd(u + static_cast<int64_t>(t + 1) * p.r_pad + 8, acc[tg][3]);
    }
  }
  __threadfence();
  __syncwarp();
  if (lane == 0) atomicAdd(&p.ctrl[1], 1u);
}

// ---- helpers of the batch kernel (w4a16_batch.cuh) -----------------------------------
// (The decode and prefill kernels below have the same steps written inline, as they last ran
// on the GPU; they move onto these helpers once the batch kernel has run there.)

// Fused EC: the first a_blocks blocks of the grid hold the A items, one per warp (item =
// block + a_blocks * warp): A fetched before griddepcontrol.wait, x and the mma after it;
// done long before the weight blocks reach their epilogue. True when this block was one of
// them (it has nothing else to do).
template <typename T, int TG>
__device__ __forceinline__ bool fused_a_block(const DecodeParams& p) {
  if (p.ec != 1 || static_cast<int>(blockIdx.x) >= p.a_blocks) return false;
  const int a_item_id = blockIdx.x + p.a_blocks * (threadIdx.x >> 5);
  if (a_item_id >= p.nA) {
    grid_dep_wait();
    return true;
  }
  uint4 av[2][4];
  a_warp_load(p, a_item_id, av);
  grid_dep_wait();
  a_warp_item<T, TG>(p, a_item_id, av);
  return true;
}

// y += B v in registers, as r_pad / 16 more k16 steps of mma: acc[i][tg] holds the 16 x 8
// tile of rows (nb_base + i) * 16 .., tokens t_base + 8 tg ..; B (N_pad, r_pad) row-major in
// global memory, v (tokens, ldv) in T in shared memory. Row blocks past NB are skipped.
template <typename T, int NI, int TGN>
__device__ __forceinline__ void ec_bv_mma(float (&acc)[NI][TGN][4], const T* __restrict__ B, const T* vs, int ldv,
                                          int nb_base, int t_base, int NB, int r_pad) {
  const int lane = threadIdx.x & 31, g = lane >> 2, q = lane & 3;
  for (int jt = 0; jt < r_pad / 16; ++jt) {
#pragma unroll
    for (int i = 0; i < NI; ++i) {
      const int nb = nb_base + i;
      if (nb >= NB) continue;
      const T* b0 = B + static_cast<int64_t>(nb * 16 + g) * r_pad + jt * 16 + 2 * q;
      const T* b1 = b0 + 8 * r_pad;
      const uint32_t a[4] = {*reinterpret_cast<const uint32_t*>(b0), *reinterpret_cast<const uint32_t*>(b1),
                             *reinterpret_cast<const uint32_t*>(b0 + 8), *reinterpret_cast<const uint32_t*>(b1 + 8)};
#pragma unroll
      for (int tg = 0; tg < TGN; ++tg) {
        const T* vr = vs + (t_base + tg * 8 + g) * ldv + jt * 16 + 2 * q;
        mma16816<T>(acc[i][tg], a, *reinterpret_cast<const uint32_t*>(vr), *reinterpret_cast<const uint32_t*>(vr + 8));
      }
    }
  }
}

// Every output cell of a warp's accumulators inside (N, M): f(n, t, value&), where acc[i][tg][e]
// is y[t][n] with n = (nb_base + i) 16 + g + 8 (e >> 1), t = t_base + 8 tg + 2 q + (e & 1).
template <int NI, int TGN, typename F>
__device__ __forceinline__ void for_cells(float (&acc)[NI][TGN][4], int nb_base, int t_base, int N, int M, F&& f) {
  const int lane = threadIdx.x & 31, g = lane >> 2, q = lane & 3;
#pragma unroll
  for (int i = 0; i < NI; ++i)
#pragma unroll
    for (int tg = 0; tg < TGN; ++tg)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int n = (nb_base + i) * 16 + g + (e >> 1) * 8, t = t_base + tg * 8 + 2 * q + (e & 1);
        if (n < N && t < M) f(n, t, acc[i][tg][e]);
      }
}

constexpr int kBulkStages = 8;  // mbarriers per block in the bulk-copy variant

// Weight stream of one work item: 16*NT rows, units [u_begin, u_end), warps interleaved.
// BULK = false: each lane loads its 16 bytes per tile into registers, one unit ahead.
// BULK = true: thread 0 issues the item's whole weight slice as cp.async.bulk copies into
//   shared memory at entry (kBulkStages stages, one mbarrier each; NT contiguous runs of
//   K per stage), before griddepcontrol.wait; warps then read 16-byte fragments with LDS.128.
// (Fused EC: the A items run on blocks of their own, see w4_decode_kernel.)
template <typename T, int NT, int TG, bool GROUPED, bool BULK>
__device__ __forceinline__ void w_stream(const DecodeParams& p, int nb0, int u_begin, int u_end,
                                         float (&acc)[NT][TG][4], unsigned char* wsm, uint64_t* bars) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  const int g = lane >> 2;
  const int NB = p.N_pad >> 4;
  const T* __restrict__ x = static_cast<const T*>(p.x);
  uint32_t zr0[NT], zr1[NT];
  float sc0[NT], sc1[NT];
  auto load_w = [&](int un, uint4 (&wv)[NT][2]) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const int nb = min(nb0 + nt, NB - 1);  // clamped: rows past N_pad are discarded later
      const uint4* base = p.qw + (static_cast<int64_t>(nb) * p.KB + 2 * un) * 32 + lane;
      wv[nt][0] = ld_stream(base);
      wv[nt][1] = ld_stream(base + 32);
    }
  };
  // One unit (128 of K, two 64-wide k-blocks) of NT 16-row blocks.
  auto compute = [&](int un, const uint4 (&wv)[NT][2]) {
    float tmp[NT][TG][4];
    if (GROUPED) {
      const int grp = un / p.upg;
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const int n = min(nb0 + nt, NB - 1) * 16 + g;
        const int idx = grp * p.N_pad + n;
        zr0[nt] = zero_pair<T>(p.zeros, idx);
        zr1[nt] = zero_pair<T>(p.zeros, idx + 8);
        sc0[nt] = p.scales[idx];
        sc1[nt] = p.scales[idx + 8];
#pragma unroll
        for (int tg = 0; tg < TG; ++tg) tmp[nt][tg][0] = tmp[nt][tg][1] = tmp[nt][tg][2] = tmp[nt][tg][3] = 0.f;
      }
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      uint4 xv[TG][2];
      load_x<T, TG>(x, p.ldx, p.M, p.K, p.x_vec, (2 * un + h) * 64, lane, xv);
#pragma unroll
      for (int s = 0; s < 4; ++s) {
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          uint32_t a[4];
          dequant_word<T>(word_of(wv[nt][h], s), zr0[nt], zr1[nt], a);
#pragma unroll
          for (int tg = 0; tg < TG; ++tg) {
            if (GROUPED)
              mma16816<T>(tmp[nt][tg], a, xb0(xv[tg], s), xb1(xv[tg], s));
            else
              mma16816<T>(acc[nt][tg], a, xb0(xv[tg], s), xb1(xv[tg], s));
          }
        }
      }
    }
    if (GROUPED) {
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int tg = 0; tg < TG; ++tg) {
          acc[nt][tg][0] += sc0[nt] * tmp[nt][tg][0];
          acc[nt][tg][1] += sc0[nt] * tmp[nt][tg][1];
          acc[nt][tg][2] += sc1[nt] * tmp[nt][tg][2];
          acc[nt][tg][3] += sc1[nt] * tmp[nt][tg][3];
        }
    }
  };
  auto load_channel_meta = [&]() {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const int n = min(nb0 + nt, NB - 1) * 16 + g;
      zr0[nt] = zero_pair<T>(p.zeros, n);
      zr1[nt] = zero_pair<T>(p.zeros, n + 8);
      sc0[nt] = p.scales[n];
      sc1[nt] = p.scales[n + 8];
    }
  };
  if constexpr (BULK) {
    const int nU = u_end - u_begin;
    const int S = min(kBulkStages, nU);
    if (threadIdx.x == 0) {
      for (int s = 0; s < S; ++s) mbar_init(smem_u32(&bars[s]), 1u);
      mbar_fence_init();
      const uint64_t pol = l2_evict_first();
      const int present = min(NT, NB - nb0);
      for (int s = 0; s < S; ++s) {
        const int s0 = s * nU / S, s1 = (s + 1) * nU / S;
        const uint32_t bar = smem_u32(&bars[s]);
        mbar_expect_tx(bar, static_cast<unsigned>(present * (s1 - s0) * 1024));
        for (int nt = 0; nt < present; ++nt) {
          const uint4* src = p.qw + (static_cast<int64_t>(nb0 + nt) * p.KB + 2 * (u_begin + s0)) * 32;
          bulk_g2s(smem_u32(wsm + (static_cast<size_t>(nt) * p.max_units + s0) * 1024), src,
                   static_cast<unsigned>((s1 - s0) * 1024), bar, pol);
        }
      }
    }
    if (!GROUPED) load_channel_meta();
    __syncthreads();  // barriers initialised before anyone waits on them
    grid_dep_wait();
    const uint32_t wbase = smem_u32(wsm);
    int s = 0;
    for (int i = warp; i < nU; i += nw) {
      while ((s + 1) * nU / S <= i) ++s;
      mbar_wait(smem_u32(&bars[s]), 0u);
      uint4 wv[NT][2];
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const uint32_t a = wbase + ((nt * p.max_units + i) * 2) * 512 + lane * 16;
        wv[nt][0] = lds128(a);
        wv[nt][1] = lds128(a + 512);
      }
      compute(u_begin + i, wv);
    }
  } else {
    // Software pipeline: the next unit's weights are in flight while this one computes.
    int un = u_begin + warp;
    uint4 wcur[NT][2];
    if (un < u_end) load_w(un, wcur);
    // Per-channel zero points and scales after the first weight loads are issued.
    if (!GROUPED) load_channel_meta();
    // Weights, zero points and scales never depend on the previous kernel: with
    // programmatic dependent launch they are fetched while it drains; x only after this.
    grid_dep_wait();
    for (; un < u_end; un += nw) {
      uint4 wnxt[NT][2];
      if (un + nw < u_end) load_w(un + nw, wnxt);
      compute(un, wcur);
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        wcur[nt][0] = wnxt[nt][0];
        wcur[nt][1] = wnxt[nt][1];
      }
    }
  }
  if (!GROUPED) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int tg = 0; tg < TG; ++tg) {
        acc[nt][tg][0] *= sc0[nt];
        acc[nt][tg][1] *= sc0[nt];
        acc[nt][tg][2] *= sc1[nt];
        acc[nt][tg][3] *= sc1[nt];
      }
  }
}

// y[t][n] for the rows [n_base, n_base + nrows) from red[(n - n_base) * TM + t], plus the
// EC term sum_j B[n][j] v[t][j] with v (M, r_pad) in shared memory.
template <typename T>
__device__ __forceinline__ void store_rows(const DecodeParams& p, int n_base, int nrows, int TM, const float* red,
                                           const float* vsm, const T* bsm) {
  T* y = static_cast<T*>(p.y);
  for (int i = threadIdx.x; i < nrows * p.M; i += blockDim.x) {
    const int t = i / nrows, nl = i % nrows, n = n_base + nl;
    if (n >= p.N) continue;
    float v = red[nl * TM + t];
    if (p.ec) {
      const uint4* brow = reinterpret_cast<const uint4*>(bsm + nl * p.r_pad);
      const float* vt = vsm + t * p.r_pad;
      for (int j8 = 0; j8 < p.r_pad / 8; ++j8) {
        const uint4 b = brow[j8];
        const uint32_t bw[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          v += Traits<T>::lo(bw[e]) * vt[j8 * 8 + 2 * e];
          v += Traits<T>::hi(bw[e]) * vt[j8 * 8 + 2 * e + 1];
        }
      }
    }
    y[static_cast<int64_t>(t) * p.ldy + n] = Traits<T>::from_f(v);
  }
}

template <typename T, int NT, int TG, bool GROUPED, bool BULK>
__global__ void __launch_bounds__(256) w4_decode_kernel(const DecodeParams p) {
  // Dynamic shared memory: [BULK: weight slice, NT x max_units KB] then, with an EC,
  // v (M, r_pad) floats and the block's B rows (ROWS, r_pad) in T.
  extern __shared__ __align__(128) unsigned char dsm[];
  constexpr int TM = TG * 8, ROWS = NT * 16;
  __shared__ float red[ROWS * TM];
  __shared__ __align__(8) uint64_t bars[BULK ? kBulkStages : 1];
  __shared__ int s_last, s_fin;
  const int tid = threadIdx.x;
  // The next kernel may start (it runs its own prologue, then waits for our completion
  // before it reads x, y or the workspace).
  grid_dep_launch();
  if (p.ec == 1 && static_cast<int>(blockIdx.x) < p.a_blocks) {
    // Fused EC: the first a_blocks blocks hold the A items, one per warp (item = block +
    // a_blocks * warp): A fetched before griddepcontrol.wait, x and the mma after it; done
    // long before the weight blocks reach their epilogue.
    const int a_item_id = blockIdx.x + p.a_blocks * (tid >> 5);
    if (a_item_id >= p.nA) {
      grid_dep_wait();
      return;
    }
    uint4 av[2][4];
    a_warp_load(p, a_item_id, av);
    grid_dep_wait();
    a_warp_item<T, TG>(p, a_item_id, av);
    return;
  }
  const int item = blockIdx.x - (p.ec == 1 ? p.a_blocks : 0);
  for (int i = tid; i < ROWS * TM; i += blockDim.x) red[i] = 0.f;
  // (made visible by the __syncthreads after the weight stream)

  float* vsm = reinterpret_cast<float*>(dsm + p.w_smem);
  const int ng = item / p.splits, ks = item % p.splits;
  const int nb0 = ng * NT;
  T* bsm = reinterpret_cast<T*>(vsm + p.M * p.r_pad);
  if (p.ec) {  // B rows of this block, fetched while the weights stream (B has N_pad rows)
    const int chunks = ROWS * p.r_pad / 8;
    const int rows_left = (p.N_pad >> 4) - nb0;  // 16-row blocks that exist
    for (int c = tid; c < chunks; c += blockDim.x) {
      const int row = c / (p.r_pad / 8);
      const bool ok = (row >> 4) < rows_left;
      const T* src = static_cast<const T*>(p.ec_b) + (static_cast<int64_t>(nb0) * 16 + (ok ? row : 0)) * p.r_pad +
                     (c % (p.r_pad / 8)) * 8;
      cp_async16(smem_u32(bsm + row * p.r_pad + (c % (p.r_pad / 8)) * 8), src, ok);
    }
    cp_async_commit();
  }
  const int u_begin = static_cast<int>(static_cast<int64_t>(p.KU) * ks / p.splits);
  const int u_end = static_cast<int>(static_cast<int64_t>(p.KU) * (ks + 1) / p.splits);
  float acc[NT][TG][4];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int tg = 0; tg < TG; ++tg) acc[nt][tg][0] = acc[nt][tg][1] = acc[nt][tg][2] = acc[nt][tg][3] = 0.f;
  w_stream<T, NT, TG, GROUPED, BULK>(p, nb0, u_begin, u_end, acc, dsm, bars);
  __syncthreads();  // red zeroed by all threads
  const int lane = tid & 31, g = lane >> 2, q = lane & 3;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int tg = 0; tg < TG; ++tg) {
      float* r0 = red + (nt * 16 + g) * TM + tg * 8 + 2 * q;
      float* r1 = r0 + 8 * TM;
      atomicAdd(r0, acc[nt][tg][0]);
      atomicAdd(r0 + 1, acc[nt][tg][1]);
      atomicAdd(r1, acc[nt][tg][2]);
      atomicAdd(r1 + 1, acc[nt][tg][3]);
    }
  __syncthreads();
  const int n_base = nb0 * 16;
  bool mine = true;
  if (p.splits > 1) {
    for (int i = tid; i < ROWS * p.M; i += blockDim.x) {
      const int t = i / ROWS, nl = i % ROWS, n = n_base + nl;
      if (n < p.N) atomicAdd(&p.ws_y[static_cast<int64_t>(t) * p.N_pad + n], red[nl * TM + t]);
    }
    __threadfence();
    __syncthreads();
    if (tid == 0) s_last = atomicAdd(&p.ws_cnt[ng], 1u) == static_cast<unsigned>(p.splits - 1);
    __syncthreads();
    mine = s_last;
    if (mine) {
      __threadfence();
      for (int i = tid; i < ROWS * p.M; i += blockDim.x) {
        const int t = i / ROWS, nl = i % ROWS, n = n_base + nl;
        if (n < p.N) {
          float* cell = &p.ws_y[static_cast<int64_t>(t) * p.N_pad + n];
          red[nl * TM + t] = __ldcg(cell);
          __stcg(cell, 0.f);
        }
      }
      if (tid == 0) p.ws_cnt[ng] = 0u;
      __syncthreads();
    }
  }
  if (p.ec) cp_async_wait<0>();
  if (!mine) return;
  unsigned seen = 0;
  if (p.ec) {
    if (p.ec == 1) {  // u complete: every A item counted (their warps run early in the launch)
      if (tid == 0)
        while (ld_acquire(&p.ctrl[1]) < static_cast<unsigned>(p.nA)) __nanosleep(32);
      __syncthreads();
    }
    for (int i = tid; i < p.M * p.r_pad; i += blockDim.x) {
      const float uu = __ldcg(&p.u[i]);
      vsm[i] = apply_gate(p.gate, uu, p.gate_g, p.gate_c, i % p.r_pad);  // kFull: u as it is
    }
    __syncthreads();  // also: this block's reads of u are complete
    // the full gate mixes the r coordinates of a token: on the whole rows, now in vsm
    // (split mode gets u already gated: run_typed sets the identity gate then)
    if (p.gate == kGateFull) gate_full_rows(vsm, p.M, p.r_pad, p.gate_g, p.gate_c, tid, blockDim.x);
    // Fused: count this block as a reader of u; the last reader zeroes u and the counters.
    if (p.ec == 1 && tid == 0) seen = atomicAdd(&p.ctrl[2], 1u);
  }
  store_rows<T>(p, n_base, ROWS, TM, red, vsm, bsm);
  if (p.ec == 1) {
    if (tid == 0) s_fin = seen == static_cast<unsigned>(p.NG - 1);
    __syncthreads();
    if (s_fin) {
      __threadfence();
      for (int i = tid; i < p.M * p.r_pad; i += blockDim.x) __stcg(&p.u[i], 0.f);
      if (tid == 0) {
        p.ctrl[1] = 0u;
        p.ctrl[2] = 0u;
      }
    }
  }
}

// Split EC, step 1: u (M, r_pad) += A x for one (A item, 8 TG-token chunk); u zeroed first.
template <typename T, int TG>
__global__ void __launch_bounds__(256) ec_u_kernel(const DecodeParams p) {
  __shared__ float red[16 * TG * 8];
  for (int i = threadIdx.x; i < 16 * TG * 8; i += blockDim.x) red[i] = 0.f;
  __syncthreads();
  const int t0 = blockIdx.y * TG * 8;
  const T* x = static_cast<const T*>(p.x) + static_cast<int64_t>(t0) * p.ldx;
  a_item<T, TG>(p, x, min(TG * 8, p.M - t0), p.u + static_cast<int64_t>(t0) * p.r_pad, blockIdx.x, red);
}

// ---------------------------------------------------------------------------------------
// Prefill: block tile 128 outputs (8 blocks of 16) x BM tokens, 128 of K per stage,
// STAGES-deep cp.async pipeline, 8 warps as 2 (outputs, 64 each) x 4 (tokens, BM/4 each).
// Split-K (splits > 1, one token tile: M <= 64): blockIdx.z takes 1/splits of the K units;
// every block adds its scaled partial sums into ws_y (fp32, zero between calls), and the
// last of a tile's splits to arrive (ws_cnt) takes the totals back, zeroes ws_y and its
// counter, and runs the epilogue (EC, store). At M = 16..64 the plain grid holds N/128
// blocks, fewer than the SMs for most Llama shapes; splits fill the GPU.
struct PrefillParams {
  const void* x;
  int64_t ldx;
  void* y;
  int64_t ldy;
  int M, N, K;
  const uint4* qw;
  const float* scales;
  const uint8_t* zeros;
  int N_pad, KB, KU, upg;
  int ec;  // 0 none, 2 u given
  const void* ec_b;
  const float* u;
  const float* gate_g;
  const float* gate_c;
  int gate, r_pad;
  int splits;        // K splits (blockIdx.z); 1 = none
  float* ws_y;       // splits > 1: (M, N_pad) partial sums, zero between calls
  unsigned* ws_cnt;  // splits > 1: arrival counter per 128-output tile, zero between calls
};

constexpr int kPrefillStages = 4;
template <int BM>
constexpr int prefill_smem_bytes() {
  return kPrefillStages * (8 * 2 * 512 + BM * 256);
}

template <typename T, bool GROUPED, int BM>
__global__ void __launch_bounds__(256, 1) w4_prefill_kernel(const PrefillParams p) {
  extern __shared__ __align__(128) unsigned char smem[];
  constexpr int S = kPrefillStages, WBYTES = 8 * 2 * 512, XBYTES = BM * 256, TGW = BM / 32;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, q = lane & 3;
  const int wn = warp & 1, wm = warp >> 1;
  const int NB = p.N_pad >> 4;
  const int nb0 = blockIdx.x * 8, m0 = blockIdx.y * BM;
  const T* __restrict__ x = static_cast<const T*>(p.x);
  const uint32_t sbase = smem_u32(smem);

  auto load_stage = [&](int slot, int un) {
    const uint32_t sw = sbase + slot * (WBYTES + XBYTES), sx = sw + WBYTES;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int c = tid + i * 256;
      const int nbl = c >> 6, kb2 = (c >> 5) & 1, ln = c & 31;
      const int nb = nb0 + nbl;
      const bool ok = nb < NB;
      const uint4* src = p.qw + (static_cast<int64_t>(ok ? nb : 0) * p.KB + 2 * un + kb2) * 32 + ln;
      cp_async16(sw + c * 16, src, ok);
    }
#pragma unroll
    for (int i = 0; i < BM * 16 / 256; ++i) {
      const int c = tid + i * 256;
      const int t = c >> 4, ch = c & 15;
      const int k = un * 128 + ch * 8;
      const bool ok = (m0 + t < p.M) && (k < p.K);
      const T* src = ok ? x + static_cast<int64_t>(m0 + t) * p.ldx + k : x;
      cp_async16(sx + t * 256 + ((ch ^ (t & 7)) << 4), src, ok);
    }
  };

  float acc[4][TGW][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int tg = 0; tg < TGW; ++tg) acc[i][tg][0] = acc[i][tg][1] = acc[i][tg][2] = acc[i][tg][3] = 0.f;

  uint32_t zr0[4], zr1[4], sh0[4], sh1[4];
  auto load_meta = [&](int grp) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int n = min(nb0 + wn * 4 + i, NB - 1) * 16 + g;
      const int idx = grp * p.N_pad + n;
      zr0[i] = zero_pair<T>(p.zeros, idx);
      zr1[i] = zero_pair<T>(p.zeros, idx + 8);
      if (GROUPED) {
        sh0[i] = Traits<T>::pack2(p.scales[idx], p.scales[idx]);
        sh1[i] = Traits<T>::pack2(p.scales[idx + 8], p.scales[idx + 8]);
      }
    }
  };
  // this block's K units: [u_begin, u_end)
  const int ks = blockIdx.z;
  const int u_begin = static_cast<int>(static_cast<int64_t>(p.KU) * ks / p.splits);
  const int u_end = static_cast<int>(static_cast<int64_t>(p.KU) * (ks + 1) / p.splits);
  const int nu = u_end - u_begin;
  load_meta(u_begin / p.upg);

#pragma unroll
  for (int s = 0; s < S - 1; ++s) {
    if (s < nu) load_stage(s, u_begin + s);
    cp_async_commit();
  }
  for (int li = 0; li < nu; ++li) {
    const int un = u_begin + li;
    cp_async_wait<S - 2>();
    __syncthreads();
    {
      const int nx = li + S - 1;
      if (nx < nu) load_stage(nx % S, u_begin + nx);
      cp_async_commit();
    }
    if (GROUPED && li > 0 && (un % p.upg) == 0) load_meta(un / p.upg);
    const int slot = li % S;
    const uint32_t sw = sbase + slot * (WBYTES + XBYTES), sx = sw + WBYTES;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      uint4 wv[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) wv[i] = lds128(sw + (((wn * 4 + i) * 2 + h) * 32 + lane) * 16);
      uint4 xv[TGW][2];
#pragma unroll
      for (int tg = 0; tg < TGW; ++tg) {
        const int t = wm * (BM / 4) + tg * 8 + g;
        const int ch = h * 8 + q * 2;
        xv[tg][0] = lds128(sx + t * 256 + ((ch ^ (t & 7)) << 4));
        xv[tg][1] = lds128(sx + t * 256 + (((ch + 1) ^ (t & 7)) << 4));
      }
#pragma unroll
      for (int s = 0; s < 4; ++s) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          uint32_t a[4];
          dequant_word<T>(word_of(wv[i], s), zr0[i], zr1[i], a);
          if (GROUPED) {
            a[0] = Traits<T>::mul2(a[0], sh0[i]);
            a[1] = Traits<T>::mul2(a[1], sh1[i]);
            a[2] = Traits<T>::mul2(a[2], sh0[i]);
            a[3] = Traits<T>::mul2(a[3], sh1[i]);
          }
#pragma unroll
          for (int tg = 0; tg < TGW; ++tg) mma16816<T>(acc[i][tg], a, xb0(xv[tg], s), xb1(xv[tg], s));
        }
      }
    }
  }
  cp_async_wait<0>();
  __syncthreads();

  if (!GROUPED) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int n = min(nb0 + wn * 4 + i, NB - 1) * 16 + g;
      const float s0 = p.scales[n], s1 = p.scales[n + 8];
#pragma unroll
      for (int tg = 0; tg < TGW; ++tg) {
        acc[i][tg][0] *= s0;
        acc[i][tg][1] *= s0;
        acc[i][tg][2] *= s1;
        acc[i][tg][3] *= s1;
      }
    }
  }
  if (p.splits > 1) {  // split-K: partial sums into ws_y; the tile's last block continues
    __shared__ unsigned s_last_split;
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int tg = 0; tg < TGW; ++tg)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int n = (nb0 + wn * 4 + i) * 16 + g + (e >> 1) * 8;
          const int t = m0 + wm * (BM / 4) + tg * 8 + 2 * q + (e & 1);
          if (n < p.N && t < p.M) atomicAdd(&p.ws_y[static_cast<int64_t>(t) * p.N_pad + n], acc[i][tg][e]);
        }
    __threadfence();
    __syncthreads();
    if (tid == 0) s_last_split = atomicAdd(&p.ws_cnt[blockIdx.x], 1u) == static_cast<unsigned>(p.splits - 1);
    __syncthreads();
    if (!s_last_split) return;
    __threadfence();
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int tg = 0; tg < TGW; ++tg)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int n = (nb0 + wn * 4 + i) * 16 + g + (e >> 1) * 8;
          const int t = m0 + wm * (BM / 4) + tg * 8 + 2 * q + (e & 1);
          if (n < p.N && t < p.M) {
            float* cell = &p.ws_y[static_cast<int64_t>(t) * p.N_pad + n];
            acc[i][tg][e] = __ldcg(cell);
            __stcg(cell, 0.f);
          }
        }
    if (tid == 0) p.ws_cnt[blockIdx.x] = 0u;
  }
  if (p.ec) {  // y += B v with v = gamma(u) * u, as r_pad/16 more k16 steps of mma
    T* vs = reinterpret_cast<T*>(smem);  // (BM, r_pad + 8) in T; +8 staggers banks
    const int ldv = p.r_pad + 8;
    for (int i = tid; i < BM * p.r_pad; i += 256) {
      const int t = i / p.r_pad, j = i % p.r_pad;
      float v = 0.f;
      if (m0 + t < p.M) {
        const float uu = p.u[static_cast<int64_t>(m0 + t) * p.r_pad + j];
        v = apply_gate(p.gate, uu, p.gate_g, p.gate_c, j);
      }
      vs[t * ldv + j] = Traits<T>::from_f(v);
    }
    __syncthreads();
    const T* B = static_cast<const T*>(p.ec_b);
    for (int jt = 0; jt < p.r_pad / 16; ++jt) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int nb = nb0 + wn * 4 + i;
        if (nb >= NB) continue;
        const T* b0 = B + static_cast<int64_t>(nb * 16 + g) * p.r_pad + jt * 16 + 2 * q;
        const T* b1 = b0 + 8 * p.r_pad;
        const uint32_t a[4] = {*reinterpret_cast<const uint32_t*>(b0), *reinterpret_cast<const uint32_t*>(b1),
                               *reinterpret_cast<const uint32_t*>(b0 + 8), *reinterpret_cast<const uint32_t*>(b1 + 8)};
#pragma unroll
        for (int tg = 0; tg < TGW; ++tg) {
          const T* vr = vs + (wm * (BM / 4) + tg * 8 + g) * ldv + jt * 16 + 2 * q;
          mma16816<T>(acc[i][tg], a, *reinterpret_cast<const uint32_t*>(vr),
                      *reinterpret_cast<const uint32_t*>(vr + 8));
        }
      }
    }
  }
  T* y = static_cast<T*>(p.y);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int n0 = (nb0 + wn * 4 + i) * 16 + g;
#pragma unroll
    for (int tg = 0; tg < TGW; ++tg) {
      const int t0 = m0 + wm * (BM / 4) + tg * 8 + 2 * q;
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int n = n0 + (e >> 1) * 8, t = t0 + (e & 1);
        if (n < p.N && t < p.M) y[static_cast<int64_t>(t) * p.ldy + n] = Traits<T>::from_f(acc[i][tg][e]);
      }
    }
  }
}

// Programmatic dependent launch of the decode kernel (w4a16_set_pdl; default on unless
// $SPEAR_W4A16_PDL=0).
bool pdl_enabled();

// Launchers, instantiated per activation type in w4a16_f16.cu / w4a16_bf16.cu.
template <typename T>
cudaError_t launch_decode(const DecodeParams& p, int nt, int tg, bool grouped, bool bulk, int grid, int threads,
                          size_t smem, cudaStream_t s);
// Blocks of this decode instantiation that fit on one SM at once (0 on error).
template <typename T>
int decode_blocks_per_sm(int nt, int tg, bool grouped, bool bulk, int threads, size_t smem);
template <typename T>
cudaError_t launch_ec_u(const DecodeParams& p, int tg, int grid_x, int grid_y, int threads, cudaStream_t s);
// The batch kernel (w4a16_batch.cuh) and its blocks per SM (0 on error).
template <typename T>
cudaError_t launch_batch(const DecodeParams& p, int nt, int tg, bool grouped, int grid, int threads, size_t smem,
                         cudaStream_t s);
template <typename T>
int batch_blocks_per_sm(int nt, int tg, bool grouped, int threads, size_t smem);
template <typename T>
cudaError_t launch_prefill(const PrefillParams& p, int bm, bool grouped, cudaStream_t s);

}  // namespace spear::cuda::detail
