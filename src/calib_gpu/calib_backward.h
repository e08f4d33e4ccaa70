#pragma once
// fp32 kernels of the calibration backward pass on the GPU (issue 12): the operations of
// compensate/network.cpp's Runner::layer_backward / head_backward other than the GEMMs
// (cuBLAS), and the KL's gradient against device teacher targets. Each mirrors the CPU
// formula it replaces (named below). Every pointer is device memory, row-major; every
// launcher is asynchronous on `stream` and returns the launch error.
#include <cstdint>

#include <cuda_runtime.h>

namespace spear::calib_gpu {

// RMSNorm backward (Runner's rms_bwd), the inverse RMS recomputed from x as rmsnorm_rows:
//   dx (rows, D) (+)= rstd·(dy ⊙ w) − x·rstd³/D·Σ(dy ⊙ w ⊙ x)
// x (rows, D) the norm's input, w (D), dy (rows, D) the gradient of its output.
// accumulate: add into dx; else overwrite it.
cudaError_t rmsnorm_backward_rows(const float* x, const float* w, const float* dy, float* dx,
                                  int64_t rows, int64_t D, float eps, bool accumulate,
                                  cudaStream_t stream);

// RoPE backward in place on g (rows, heads * HD): the inverse rotation at position
// row % T (Runner's unrope), cos, sin as rope_rows.
cudaError_t rope_backward_rows(float* g, int64_t rows, int64_t heads, int64_t HD, int64_t T,
                               const float* cos, const float* sin, cudaStream_t stream);

// SwiGLU backward: h = silu(g) ⊙ u; dg (n), du (n) from dh (n), g (n), u (n).
cudaError_t swiglu_backward(const float* g, const float* u, const float* dh, float* dg, float* du,
                            int64_t n, cudaStream_t stream);

// The EC gate's backward (linear_ec_backward, gated): with t = γ − 1 = tanh(G z + c),
//   da (M, r) = ds ⊙ z ⊙ (1 − t²),  dz (M, r) = ds ⊙ γ   (dz += da·G is a GEMM after this)
cudaError_t ec_gate_backward(const float* ds, const float* z, const float* gamma, float* da, float* dz,
                             int64_t M, int64_t r, cudaStream_t stream);

// out (r) += Σ_m a (M, r) [m, :]  (the gradient of c).
cudaError_t col_sum_add(const float* a, float* out, int64_t M, int64_t r, cudaStream_t stream);

// Causal GQA attention backward inside each of B windows of T tokens, the forward being
// causal_attention (calib_kernels.h) with the same q (B*T, NH*HD), k, v (B*T, NKV*HD) and
// its output att (B*T, NH*HD); datt (B*T, NH*HD) = dL/d att. Writes (not accumulates)
//   dq (B*T, NH*HD), dk, dv (B*T, NKV*HD)
// (Runner::layer_backward's dP = dO Vᵀ, dS = P ⊙ (dP − rowsum(dO ⊙ O)), dQ = scale dS K,
// dK = scale dSᵀ Q, dV = Pᵀ dO, summed over the heads of a KV group). The probabilities
// are recomputed exactly as the forward computes them. stats: scratch (B*NH*T, 3) floats.
// HD ≤ 256.
cudaError_t causal_attention_backward(const float* q, const float* k, const float* v, const float* att,
                                      const float* datt, float* dq, float* dk, float* dv, float* stats,
                                      int64_t B, int64_t T, int64_t NH, int64_t NKV, int64_t HD,
                                      float scale, cudaStream_t stream);

// The KL and its gradient per row against dense device targets (compensate's kl_rows):
// kl (rows) = KL(p_ref ‖ softmax(z)) in double; dlogits (rows, V) = scale · (softmax(z) − p_ref).
// ref_logp (rows, V) log-probabilities. dlogits may alias z.
cudaError_t kl_grad_rows(const float* z, const float* ref_logp, double* kl, float* dlogits, float scale,
                         int64_t rows, int64_t V, cudaStream_t stream);

}  // namespace spear::calib_gpu
