#pragma once
// Kernels of the static control on the GPU (calib_gpu/gpu_static.h): float64 element-wise
// steps between the cuBLAS / cuSOLVER calls, and the next-token NLL of a window. Every
// pointer is device memory, row-major; every launcher is asynchronous on `stream` and
// returns the launch error.
#include <cstdint>

#include <cuda_runtime.h>

namespace spear::calib_gpu {

// dst (n) += src (n), float into double.
cudaError_t add_f32_to_f64(const float* src, double* dst, int64_t n, cudaStream_t stream);
// dst (n) = a (n) − b (n) in double; b null: dst = a.
cudaError_t sub_f32_to_f64(const float* a, const float* b, double* dst, int64_t n, cudaStream_t stream);
// R (n, n) = Rsum / tokens, then R_ii += damp · tr(R) / n + 1e-12 (whiten()'s damping).
cudaError_t damped_mean(const double* Rsum, double* R, int64_t n, double tokens, double damp,
                        cudaStream_t stream);
// Vs (n, n) row i = V row i · max(w_i, 1e-20)^e (w (n) eigenvalues, V's rows eigenvectors).
cudaError_t scale_rows_pow(const double* V, const double* w, double e, double* Vs, int64_t n,
                           cudaStream_t stream);
// out (1) = −Σ_{t < T−1} logp[t, tok[t+1]], logp (T, V), tok (T) in [0, V); summed in t order.
cudaError_t next_token_nll(const float* logp, const int32_t* tok, int64_t T, int64_t V, double* out,
                           cudaStream_t stream);

}  // namespace spear::calib_gpu
