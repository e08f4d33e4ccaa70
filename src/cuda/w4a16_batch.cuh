#pragma once
// The batch kernel (Kernel::kBatch): batched decode and chunked prefill, 9..64 tokens per
// launch. Each weight is read from HBM once per launch and dequantized once, and serves
// every token of the launch from registers. Design and measurements: docs/KERNELS.md.
// First run on a GPU 2026-12-07 (H100: GPU tests, memcheck, bench_w4a16); on by default,
// SPEAR_W4A16_BATCH=0 leaves it out of the dispatcher (w4a16.h).
//
// Why a third kernel: at M = 16..64 the decode kernel reads x per warp from L1/L2 (x
// bytes per weight byte = M / 4 for one 16-row block: 16x at M = 64), and the prefill
// kernel splits its 8 warps 2 (outputs) x 4 (tokens), so every weight is dequantized four
// times and read from shared memory four times, on a grid of N / 128 blocks (fewer than
// the SMs for most Llama shapes). Here:
//   * the 8 (or 4) warps of a block split the outputs only: warp w owns the 16-row blocks
//     nb0 + w NT .. + NT - 1 and all TM = 8 TG tokens, so a weight is dequantized once;
//   * x is staged in shared memory once per block and read by every warp: shared-memory
//     traffic per weight byte is TM / (4 NT) (NT = 2, TM = 64: 8 B of x per B of weights,
//     which the SM's 128 B/clk serve well within the HBM time of the weights);
//   * weights and x move through a kBatchStages-deep cp.async pipeline of 128-input units
//     (the block's weights for the first stages are issued before griddepcontrol.wait, so
//     they stream while the previous kernel drains);
//   * split-K across blocks fills the GPU when N / (16 NT warps) tiles are fewer than the
//     SMs; the splits of a tile add up in order through the workspace (split_k_serial), so
//     a split costs one coalesced fp32 store and load of the tile per split, and the result
//     is the same bits on every run (fp32 atomics cost ~15 us at 7B gate+up M = 64 on the
//     H100, and their order changed the last bits from run to run);
//   * the EC: split (u given) or fused (A items on blocks of their own at the front of the
//     grid, as in the decode kernel); B v is added as r_pad / 16 more k16 steps of mma in
//     registers, as in the prefill kernel.
#include "cuda/w4a16_kernels.cuh"
#include "quant/gpu_batch_tiles.h"

namespace spear::cuda::detail {

constexpr int kBatchStages = 4;

// One pipeline stage: the block's weight tiles of one 128-input unit (warps x NT 16-row
// blocks, 1 KB each, in the layout's order: row block, k-block h, lane) and x for TM tokens
// x 128 inputs (256 B per token, 16-byte chunks XOR-swizzled by token: chunk ch of token t
// at t * 256 + ((ch ^ (t & 7)) << 4), so the 8 lanes of a phase hit 8 different banks).
__host__ __device__ constexpr int batch_w_bytes(int nt, int warps) { return warps * nt * 1024; }
__host__ __device__ constexpr int batch_stage_bytes(int nt, int tg, int warps) {
  return batch_w_bytes(nt, warps) + tg * 8 * 256;
}
// The epilogue reuses the pipeline's shared memory: v as fp32 (TM, r_pad), then in the
// activation type (TM, r_pad + 8) for the mma (+8 staggers the banks of consecutive tokens).
__host__ __device__ constexpr int batch_smem_bytes(int nt, int tg, int warps, int r_pad) {
  const int pipe = kBatchStages * batch_stage_bytes(nt, tg, warps);
  const int ep = r_pad ? tg * 8 * (r_pad * 4 + (r_pad + 8) * 2) : 0;
  return pipe > ep ? pipe : ep;
}

// Split-K, in order: split ks of a tile waits until the splits before it have added their
// partial sums into the tile's slice of ws_y (the counter reads ks), adds its own, and
// passes the running sum on; the last split takes the total into acc and gets true (it
// finishes the tile), after zeroing the slice and the counter for the next call. The sum is
// ((p0 + p1) + p2) + ... whichever block runs first, so the output bits do not depend on
// timing. The slice is the block's accumulators in fragment order, float4 j = (i, tg) of
// thread tid at (j * threads + tid): every store and load is one coalesced 16-byte access.
// Token groups past M are neither stored nor loaded. A block waits only for blocks of lower
// index (ks - 1 of the same tile), which the scheduler has started before it.
// Every thread of the block must call it.
template <int NI, int TGN>
__device__ __forceinline__ bool split_k_serial(float (&acc)[NI][TGN][4], int M, float* ws_tile, unsigned* cnt, int ks,
                                               int splits) {
  const int tid = threadIdx.x, nth = blockDim.x;
  const bool last = ks == splits - 1;
  if (tid == 0)
    while (ld_acquire(cnt) != static_cast<unsigned>(ks)) __nanosleep(20);
  __syncthreads();
  float4* slice = reinterpret_cast<float4*>(ws_tile);
#pragma unroll
  for (int i = 0; i < NI; ++i)
#pragma unroll
    for (int tg = 0; tg < TGN; ++tg) {
      if (tg * 8 >= M) continue;  // uniform over the block
      float4* cell = slice + (i * TGN + tg) * nth + tid;
      float (&a)[4] = acc[i][tg];
      if (ks > 0) {
        const float4 r = __ldcg(cell);
        a[0] = r.x + a[0];
        a[1] = r.y + a[1];
        a[2] = r.z + a[2];
        a[3] = r.w + a[3];
      }
      if (!last)
        __stcg(cell, make_float4(a[0], a[1], a[2], a[3]));
      else if (ks > 0)
        __stcg(cell, make_float4(0.f, 0.f, 0.f, 0.f));
    }
  if (last) {
    if (tid == 0) *cnt = 0u;  // the next launch waits for this grid to complete
    return true;
  }
  __threadfence();
  __syncthreads();
  if (tid == 0) atomicExch(cnt, static_cast<unsigned>(ks + 1));
  return false;
}

// DecodeParams fields used: x, ldx (x_vec required), y, ldy, M (<= TM), N, K, qw, scales,
// zeros, N_pad, KB, KU, upg, NG (= tiles), splits, ws_y, ws_cnt, ec (0, 1 fused, 2 u given),
// ec_a, ec_b, gate, gate_g, gate_c, r_pad, u, ctrl, nA, a_blocks.
// Grid (1-D): a_blocks A-item blocks (fused EC), then NG x splits weight blocks
// (block a_blocks + tile * splits + ks).
template <typename T, int NT, int TG, bool GROUPED>
__global__ void __launch_bounds__(256, 1) w4_batch_kernel(const DecodeParams p) {
  extern __shared__ __align__(128) unsigned char smem[];
  constexpr int S = kBatchStages, TM = TG * 8;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nthreads = blockDim.x, nw = nthreads >> 5;
  const int g = lane >> 2, q = lane & 3;
  grid_dep_launch();
  if (fused_a_block<T, TG>(p)) return;  // fused EC: the A items, one per warp
  const int item = blockIdx.x - (p.ec == 1 ? p.a_blocks : 0);
  const int tile = item / p.splits, ks = item % p.splits;
  const int NB = p.N_pad >> 4;
  const int nb0 = tile * nw * NT;       // first 16-row block of the block's tile
  const int nbw = nb0 + warp * NT;      // first 16-row block of this warp
  const int WBYTES = batch_w_bytes(NT, nw), SBYTES = WBYTES + TM * 256;
  const T* __restrict__ x = static_cast<const T*>(p.x);
  const uint32_t sbase = smem_u32(smem);
  namespace bt = spear::batch_tiles;  // the stage layout (quant/gpu_batch_tiles.h)
  const int u_begin = bt::split_begin(p.KU, ks, p.splits), u_end = bt::split_begin(p.KU, ks + 1, p.splits);
  const int nu = u_end - u_begin;

  auto load_w = [&](int slot, int un) {
    const uint32_t sw = sbase + slot * SBYTES;
    for (int c = tid; c < nw * NT * 64; c += nthreads) {
      const int rb = bt::w_chunk_rb(c), kb = bt::w_chunk_kb(c), ln = bt::w_chunk_lane(c);
      const int nb = nb0 + rb;
      const bool ok = nb < NB;
      const uint4* src = p.qw + (static_cast<int64_t>(ok ? nb : 0) * p.KB + 2 * un + kb) * 32 + ln;
      cp_async16(sw + bt::w_offset(rb, kb, ln), src, ok);
    }
  };
  auto load_x = [&](int slot, int un) {
    const uint32_t sx = sbase + slot * SBYTES + WBYTES;
    for (int c = tid; c < TM * 16; c += nthreads) {
      const int t = c >> 4, ch = c & 15;
      const int k = un * 128 + ch * 8;
      const bool ok = t < p.M && k < p.K;  // K % 8 == 0 (x_vec): a chunk is all in or all out
      const T* src = ok ? x + static_cast<int64_t>(t) * p.ldx + k : x;
      cp_async16(sx + bt::x_offset(t, ch), src, ok);
    }
  };

  // Zero points (and, grouped, the scale as a T pair multiplied into the weights before the
  // mma: one rounding per weight, as in the prefill kernel) of the warp's rows g, g + 8.
  uint32_t zr0[NT], zr1[NT], sh0[NT], sh1[NT];
  auto load_meta = [&](int grp) {
#pragma unroll
    for (int i = 0; i < NT; ++i) {
      const int n = min(nbw + i, NB - 1) * 16 + g;
      const int idx = grp * p.N_pad + n;
      zr0[i] = zero_pair<T>(p.zeros, idx);
      zr1[i] = zero_pair<T>(p.zeros, idx + 8);
      if (GROUPED) {
        sh0[i] = Traits<T>::pack2(p.scales[idx], p.scales[idx]);
        sh1[i] = Traits<T>::pack2(p.scales[idx + 8], p.scales[idx + 8]);
      }
    }
  };

  // Prologue: the weights of the first S - 1 stages before the wait (they do not depend on
  // the previous kernel), then x. Group 0 = weights 0..S-2 + x 0; group s = x s.
#pragma unroll
  for (int s = 0; s < S - 1; ++s)
    if (s < nu) load_w(s, u_begin + s);
  load_meta(u_begin / p.upg);
  grid_dep_wait();
#pragma unroll
  for (int s = 0; s < S - 1; ++s) {
    if (s < nu) load_x(s, u_begin + s);
    cp_async_commit();
  }

  float acc[NT][TG][4];
#pragma unroll
  for (int i = 0; i < NT; ++i)
#pragma unroll
    for (int tg = 0; tg < TG; ++tg) acc[i][tg][0] = acc[i][tg][1] = acc[i][tg][2] = acc[i][tg][3] = 0.f;

  for (int li = 0; li < nu; ++li) {
    const int un = u_begin + li;
    cp_async_wait<S - 2>();
    __syncthreads();  // stage li visible to all; stage li - 1's slot free for reuse
    {
      const int nx = li + S - 1;
      if (nx < nu) {
        load_w(nx % S, u_begin + nx);
        load_x(nx % S, u_begin + nx);
      }
      cp_async_commit();
    }
    if (GROUPED && li > 0 && (un % p.upg) == 0) load_meta(un / p.upg);
    const uint32_t sw = sbase + (li % S) * SBYTES, sx = sw + WBYTES;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      uint4 wv[NT];
#pragma unroll
      for (int i = 0; i < NT; ++i) wv[i] = lds128(sw + bt::w_offset(warp * NT + i, h, lane));
      // Lane (g, q)'s B operand of k-block h is x[token][64 h + 16 q .. + 16): chunks
      // 8 h + 2 q (sub-tiles 0, 1) and 8 h + 2 q + 1 (sub-tiles 2, 3); one chunk at a time
      // keeps 4 TG registers of x live instead of 8 TG.
#pragma unroll
      for (int sp = 0; sp < 2; ++sp) {
        uint4 xv[TG];
#pragma unroll
        for (int tg = 0; tg < TG; ++tg) {
          const int t = tg * 8 + g;
          xv[tg] = lds128(sx + bt::x_offset(t, bt::x_chunk(h, q, sp)));
        }
#pragma unroll
        for (int s2 = 0; s2 < 2; ++s2) {
          const int s = 2 * sp + s2;
#pragma unroll
          for (int i = 0; i < NT; ++i) {
            uint32_t a[4];
            dequant_word<T>(word_of(wv[i], s), zr0[i], zr1[i], a);
            if (GROUPED) {
              a[0] = Traits<T>::mul2(a[0], sh0[i]);
              a[1] = Traits<T>::mul2(a[1], sh1[i]);
              a[2] = Traits<T>::mul2(a[2], sh0[i]);
              a[3] = Traits<T>::mul2(a[3], sh1[i]);
            }
#pragma unroll
            for (int tg = 0; tg < TG; ++tg)
              mma16816<T>(acc[i][tg], a, word_of(xv[tg], 2 * s2), word_of(xv[tg], 2 * s2 + 1));
          }
        }
      }
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // the pipeline's shared memory is free from here on

  // acc[i][tg][e] is y[t][n], n = (nbw + i) 16 + g + 8 (e >> 1), t = 8 tg + 2 q + (e & 1).
  if (!GROUPED) {
#pragma unroll
    for (int i = 0; i < NT; ++i) {
      const int n = min(nbw + i, NB - 1) * 16 + g;
      const float s0 = p.scales[n], s1 = p.scales[n + 8];
#pragma unroll
      for (int tg = 0; tg < TG; ++tg) {
        acc[i][tg][0] *= s0;
        acc[i][tg][1] *= s0;
        acc[i][tg][2] *= s1;
        acc[i][tg][3] *= s1;
      }
    }
  }
  // split-K: partial sums into ws_y; the tile's last block continues
  if (p.splits > 1 &&
      !split_k_serial(acc, p.M, p.ws_y + static_cast<int64_t>(tile) * (NT * TG * 4) * nthreads, &p.ws_cnt[tile], ks,
                      p.splits))
    return;
  if (p.ec) {  // y += B v, v = gamma(u) * u (TM, r_pad), as r_pad / 16 more k16 steps
    __shared__ unsigned s_seen;
    float* vf = reinterpret_cast<float*>(smem);                        // (TM, r_pad) fp32
    T* vs = reinterpret_cast<T*>(smem + TM * p.r_pad * 4);             // (TM, ldv) in T
    const int ldv = p.r_pad + 8;
    if (p.ec == 1) {  // u complete: every A item counted (their warps ran early in the launch)
      if (tid == 0)
        while (ld_acquire(&p.ctrl[1]) < static_cast<unsigned>(p.nA)) __nanosleep(32);
      __syncthreads();
    }
    for (int i = tid; i < TM * p.r_pad; i += nthreads) {
      const int t = i / p.r_pad;
      vf[i] = t < p.M ? apply_gate(p.gate, __ldcg(&p.u[static_cast<int64_t>(t) * p.r_pad + i % p.r_pad]), p.gate_g,
                                   p.gate_c, i % p.r_pad)
                      : 0.f;  // kFull: u as it is, gated below
    }
    __syncthreads();  // also: this block's reads of u are complete
    if (p.ec == 1 && tid == 0) s_seen = atomicAdd(&p.ctrl[2], 1u);
    if (p.gate == kGateFull) gate_full_rows(vf, p.M, p.r_pad, p.gate_g, p.gate_c, tid, nthreads);
    for (int i = tid; i < TM * p.r_pad; i += nthreads) vs[(i / p.r_pad) * ldv + i % p.r_pad] = Traits<T>::from_f(vf[i]);
    __syncthreads();
    ec_bv_mma<T, NT, TG>(acc, static_cast<const T*>(p.ec_b), vs, ldv, nbw, 0, NB, p.r_pad);
    // Fused: the last tile to read u zeroes it and the counters for the next call (s_seen
    // was written before the barrier after the conversion above, so every thread sees it).
    if (p.ec == 1 && s_seen == static_cast<unsigned>(p.NG - 1)) {
      __threadfence();
      for (int i = tid; i < p.M * p.r_pad; i += nthreads) __stcg(&p.u[i], 0.f);
      if (tid == 0) {
        p.ctrl[1] = 0u;
        p.ctrl[2] = 0u;
      }
    }
  }
  T* y = static_cast<T*>(p.y);
  for_cells(acc, nbw, 0, p.N, p.M,
            [&](int n, int t, float& v) { y[static_cast<int64_t>(t) * p.ldy + n] = Traits<T>::from_f(v); });
}

}  // namespace spear::cuda::detail
