#pragma once
// The non-GEMM operations of the GPU Llama engine (issue 6): embeddings, RMSNorm with
// the residual add fused in, RoPE fused with the KV-cache write, paged attention
// (decode: split along positions, grouped-query heads; prefill: tiled, causal), SwiGLU,
// the EC gate of the split/naive path, and the row reductions the sampler and the
// perplexity need.
//
// FlashInfer style: plain device pointers with their shapes, a cudaStream_t, a
// cudaError_t back (cudaErrorInvalidValue for bad arguments; launch errors as CUDA
// reports them). Nothing allocates or synchronizes; every call is CUDA-graph capturable.
// The kernels of a decode step are launched with programmatic dependent launch (as the W4
// GEMMs are; off with $SPEAR_W4A16_PDL=0): each waits for its predecessor's completion
// (griddepcontrol.wait) before it touches memory, so it may be scheduled while that one drains.
//
// Numerics: the residual stream is float32 (it is what RMSNorm reads and what grows
// layer after layer); matrix inputs/outputs and the KV cache are fp16 ("half");
// every reduction (norms, softmax, attention dot products) accumulates in float32.
//
// Paged KV cache, one pool per layer and per K/V:
//   k_cache, v_cache: (num_slots, n_kv_heads, head_dim) fp16, num_slots = num_blocks * block_size
//   a position p of a sequence with block table bt lives in slot bt[p / block_size] * block_size
//   + p % block_size.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace spear::cuda {

// x (T, D) f32 = table[tokens[t]] (table (V, D) fp16). Tokens outside [0, V) give a row of 0.
cudaError_t embed_lookup(const int32_t* tokens, const __half* table, int64_t V, int T, int D, float* x,
                         cudaStream_t stream);

// out (T, D) fp16 = x / sqrt(mean(x^2) + eps) * w, x (T, D) f32, w (D) f32.
cudaError_t rmsnorm(const float* x, const float* w, float eps, int T, int D, __half* out, cudaStream_t stream);
// x (T, D) f32 += delta (T, D) fp16 (row stride ld_delta), then out = rmsnorm(x) as above.
// out may be nullptr (the add alone).
cudaError_t add_rmsnorm(float* x, const __half* delta, int64_t ld_delta, const float* w, float eps, int T, int D,
                        __half* out, cudaStream_t stream);

// Rotates q (T, n_heads, head_dim) and k (T, n_kv_heads, head_dim) in place with Hugging
// Face's half-split RoPE (dimension i pairs with i + head_dim/2):
//   x'[i] = x[i] cos - x[i + h/2] sin,  x'[i + h/2] = x[i + h/2] cos + x[i] sin,  i < h/2,
// angles from cos_tab/sin_tab (max_pos, head_dim/2) f32 at positions pos (T); then writes
// the rotated k and the v (T, n_kv_heads, head_dim) rows into k_cache/v_cache at slots
// slot (T). q, k, v have row strides ldq, ldk, ldv (elements); rows of one token are
// contiguous heads. A token with pos outside [0, max_pos) or slot < 0 is skipped.
cudaError_t rope_store_kv(__half* q, int64_t ldq, __half* k, int64_t ldk, const __half* v, int64_t ldv,
                          const int32_t* pos, const int32_t* slot, const float* cos_tab, const float* sin_tab,
                          int max_pos, int T, int n_heads, int n_kv_heads, int head_dim, __half* k_cache,
                          __half* v_cache, cudaStream_t stream);

struct PagedKV {
  const __half* k_cache = nullptr;     // (num_slots, n_kv_heads, head_dim)
  const __half* v_cache = nullptr;     // (num_slots, n_kv_heads, head_dim)
  const int32_t* block_tables = nullptr;  // (n_seqs, max_blocks) block ids
  int max_blocks = 0;                  // row stride of block_tables
  int block_size = 16;
  int n_kv_heads = 0, head_dim = 0;    // head_dim: a multiple of 8, at most 256 (stories260K has 8;
                                       // 64 and 128 are the ones to make fast); else cudaErrorInvalidValue
};

// Decode: one query token per sequence. q (B, n_heads, head_dim) fp16 (row stride ldq),
// seq_lens (B) = number of cached positions to attend to (the new token's K/V already
// stored; 0 gives an output of 0). out (B, n_heads * head_dim) fp16, row stride ldo.
// Split along positions ("flash decoding"), grid (S, n_kv_heads, B), a second kernel merging
// the S partial results of each (sequence, head):
// - split_len = 0 (default): S is fixed per launch from the GPU's size (about two blocks per
//   SM over the B x n_kv_heads pairs, at most 64 and at most max_len / 64), and each sequence's
//   length is spread over the S splits at run time (whole tiles of 64 positions): a batch-1
//   step at a short context still fills the GPU, and the launch shape depends only on B and
//   max_len (CUDA-graph friendly).
// - split_len > 0 (a multiple of block_size): fixed chunks of split_len positions, S =
//   ceil(max_len / split_len); splits past a sequence's length exit at once.
// Each block handles all n_heads / n_kv_heads query heads of its KV head, reading each K/V
// row once. The last split of a (sequence, KV head) to finish merges them all (no second
// kernel), counted on arrival counters in ws.
// ws: decode_attention_ws_bytes(B, n_heads, head_dim, max_len, split_len) bytes for the largest
// B it will serve, zeroed once by decode_attention_ws_init; every call leaves its counters zero
// again (it may then serve any B and split_len the size admits).
size_t decode_attention_ws_bytes(int B, int n_heads, int head_dim, int max_len, int split_len = 0);
cudaError_t decode_attention_ws_init(void* ws, size_t ws_bytes, cudaStream_t stream);
cudaError_t decode_attention(const __half* q, int64_t ldq, const PagedKV& kv, const int32_t* seq_lens, int B,
                             int n_heads, float scale, int max_len, __half* out, int64_t ldo, void* ws,
                             size_t ws_bytes, cudaStream_t stream, int split_len = 0);

// Prefill (and mixed batches): T query tokens; token t belongs to sequence q_seq[t] (a row
// of block_tables) at position q_pos[t] and attends causally to positions [0, q_pos[t]]
// of that sequence (all already stored in the cache). q (T, n_heads, head_dim) fp16, row
// stride ldq; out (T, n_heads * head_dim) fp16, row stride ldo. Tokens of one sequence
// must be consecutive with increasing positions (chunks); max_pos bounds every q_pos.
cudaError_t prefill_attention(const __half* q, int64_t ldq, const PagedKV& kv, const int32_t* q_seq,
                              const int32_t* q_pos, int T, int n_heads, float scale, int max_pos, __half* out,
                              int64_t ldo, cudaStream_t stream);

// out (T, H) = silu(gate) * up, gate/up (T, H) fp16 with row strides ldg, ldu (they may be
// the two halves of one (T, 2H) buffer).
cudaError_t silu_mul(const __half* gate, int64_t ldg, const __half* up, int64_t ldu, int T, int H, __half* out,
                     cudaStream_t stream);

// The full EC gate of src/model/ec_layer.h, per token: s = (1 + tanh(G z + c)) ⊙ z.
// z (T, r) fp16, G (r, r) f32 row-major, c (r) f32, s (T, r) fp16; r <= 256.
// G == nullptr: the static control, s = z.
cudaError_t ec_gate(const __half* z, const float* G, const float* c, int T, int r, __half* s,
                    cudaStream_t stream);

// Row reductions over logits (T, V) f32 (row stride ld):
// argmax (first maximum wins, as std::max_element): ids (T).
cudaError_t argmax_rows(const float* logits, int64_t ld, int T, int V, int32_t* ids, cudaStream_t stream);
// nll (T) = logsumexp(row) - row[target[t]] (natural log); target < 0 gives 0.
cudaError_t nll_rows(const float* logits, int64_t ld, const int32_t* target, int T, int V, float* nll,
                     cudaStream_t stream);

// Conversions and synthetic data (bench-latency builds random models on the GPU).
cudaError_t f32_to_f16(const float* in, int64_t n, __half* out, cudaStream_t stream);
// data (n): bf16 bit patterns in, the same values rounded to fp16 out (nearest even).
cudaError_t bf16_to_f16_inplace(__half* data, int64_t n, cudaStream_t stream);
// out[i] = scale * u, u uniform in [-1, 1) from a counter-based hash of (seed, i).
cudaError_t fill_uniform_f16(__half* out, int64_t n, uint64_t seed, float scale, cudaStream_t stream);
cudaError_t fill_uniform_f32(float* out, int64_t n, uint64_t seed, float lo, float hi, cudaStream_t stream);
// Random bytes (random 4-bit codes when used for packed weights).
cudaError_t fill_random_bytes(uint8_t* out, int64_t n, uint64_t seed, cudaStream_t stream);

// One thread that waits `ns` nanoseconds of GPU time: the ops queued behind it start back to
// back, so that event timings measure GPU time and not host launch time (profiling).
cudaError_t gpu_spin(int64_t ns, cudaStream_t stream);

}  // namespace spear::cuda
