#pragma once
// fp32 kernels of the calibration forward on the GPU (issue 12): the operations of
// compensate/network.cpp's Runner::layer_forward / head_forward other than the GEMMs
// (cuBLAS), and the log-softmax / KL of the teacher targets. Plain C++17 (nvcc compiles
// the .cu); every pointer is device memory, row-major; every launcher is asynchronous on
// `stream` and returns the launch error (cudaSuccess when the launch was accepted).
#include <cstdint>

#include <cuda_runtime.h>

namespace spear::calib_gpu {

// x (rows, D) = table[tok[r]] (V, D) rows; tok (rows) already range-checked.
cudaError_t embed_rows(const float* table, const int32_t* tok, float* x, int64_t rows, int64_t D,
                       cudaStream_t stream);

// y (rows, D) = w (D) ⊙ x / sqrt(mean(x²) + eps), as Runner's rms_fwd. y may not alias x.
cudaError_t rmsnorm_rows(const float* x, const float* w, float* y, int64_t rows, int64_t D, float eps,
                         cudaStream_t stream);

// RoPE in place on x (rows, heads * HD), Hugging Face half-split pairs (i, i + HD/2), at
// position row % T; cos, sin (≥ T, HD/2) as model/rope.h's rope_cos_sin.
cudaError_t rope_rows(float* x, int64_t rows, int64_t heads, int64_t HD, int64_t T, const float* cos,
                      const float* sin, cudaStream_t stream);

// Causal attention inside each of B windows of T tokens, GQA (head h reads kv head
// h / (NH / NKV)): att (B*T, NH*HD) = softmax(scale · q kᵀ, j ≤ i) v, q (B*T, NH*HD),
// k, v (B*T, NKV*HD).
cudaError_t causal_attention(const float* q, const float* k, const float* v, float* att, int64_t B,
                             int64_t T, int64_t NH, int64_t NKV, int64_t HD, float scale,
                             cudaStream_t stream);

// EC gate: s (M, r) = (1 + tanh(a + c)) ⊙ z, a = z Gᵀ (M, r) already computed, c (r);
// gamma (M, r) receives 1 + tanh(a + c) when not null.
cudaError_t ec_gate(const float* z, const float* a, const float* c, float* s, float* gamma, int64_t M,
                    int64_t r, cudaStream_t stream);

// h (n) = silu(g) ⊙ u = g / (1 + exp(−g)) · u. h may alias g.
cudaError_t swiglu(const float* g, const float* u, float* h, int64_t n, cudaStream_t stream);

// x (n) += y (n).
cudaError_t add_inplace(float* x, const float* y, int64_t n, cudaStream_t stream);

// out (rows, V) = log_softmax(z) per row (max and sum in double, as compensate's
// log_softmax_rows). out may alias z.
cudaError_t log_softmax_rows(const float* z, float* out, int64_t rows, int64_t V, cudaStream_t stream);

// kl (rows) = KL(p_ref ‖ softmax(z)) per row, ref_logp (rows, V) log-probabilities,
// in double as compensate's kl_rows.
cudaError_t kl_rows(const float* z, const float* ref_logp, double* kl, int64_t rows, int64_t V,
                    cudaStream_t stream);

}  // namespace spear::calib_gpu
