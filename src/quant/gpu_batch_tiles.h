#pragma once
// The batch W4A16 kernel's (src/cuda/w4a16_batch.cuh) work split and shared-memory stage
// layout, as small functions shared by the kernel and its CPU emulation
// (tests/test_cuda_repack.cpp, BatchKernelEmulationMatchesQuantLinear), so the address
// arithmetic the kernel runs is the arithmetic CI checks against QuantLinear.
//
// A block covers the 16-row blocks [nb0, nb0 + warps * nt) (warp w: nb0 + w nt .. + nt - 1)
// for all TM = 8 tg tokens, over the K units (128 inputs) of its split. One pipeline stage
// holds one unit: first the block's weight tiles (warps * nt * 1 KB: local row block rb,
// k-block h (64 inputs), lane, 16 bytes each, as in the global layout of gpu_layout.h), then
// x (TM tokens x 256 bytes, 16-byte chunks XOR-swizzled by token).
#if defined(__CUDACC__)
#define SPEAR_BATCH_FN __host__ __device__ __forceinline__ constexpr
#else
#define SPEAR_BATCH_FN inline constexpr
#endif

namespace spear::batch_tiles {

// First K unit of split ks of `splits` over KU units (split ks covers [begin(ks), begin(ks + 1))).
SPEAR_BATCH_FN int split_begin(int KU, int ks, int splits) {
  return static_cast<int>(static_cast<long long>(KU) * ks / splits);
}

// Weight chunk c (16 bytes) of a stage, c < warps * nt * 64: its local row block, k-block and
// lane; it comes from global tile (nb0 + rb, 2 un + kb), lane's 16 bytes.
SPEAR_BATCH_FN int w_chunk_rb(int c) { return c >> 6; }
SPEAR_BATCH_FN int w_chunk_kb(int c) { return (c >> 5) & 1; }
SPEAR_BATCH_FN int w_chunk_lane(int c) { return c & 31; }
// Byte offset in the stage of lane's 16 bytes of local row block rb, k-block h (= 16 c for
// the chunk c that holds them: the stage keeps the global order).
SPEAR_BATCH_FN int w_offset(int rb, int h, int lane) { return ((rb * 2 + h) * 32 + lane) * 16; }

// Byte offset, from the start of the stage's x, of token t's 16-byte chunk ch (inputs
// 8 ch .. 8 ch + 7 of the unit). The XOR by t & 7 puts the 8 lanes of an LDS.128 phase
// (tokens g, g + 1 at chunks 2q + sp) on 8 different bank groups.
SPEAR_BATCH_FN int x_offset(int t, int ch) { return t * 256 + ((ch ^ (t & 7)) << 4); }
// The chunk lane quad q reads for k-block h, sub-tile pair sp (sub-tiles 2 sp, 2 sp + 1): its
// B operand is x[token][64 h + 16 q .. + 16), by the layout's permutation of K.
SPEAR_BATCH_FN int x_chunk(int h, int q, int sp) { return h * 8 + q * 2 + sp; }

}  // namespace spear::batch_tiles

#undef SPEAR_BATCH_FN
