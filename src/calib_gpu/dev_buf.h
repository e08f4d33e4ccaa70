#pragma once
// Device memory of the GPU calibration (host C++): a growable allocation and the error
// checks that turn CUDA / cuBLAS failures into spear::Error.
#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include "core/error.h"

namespace spear::calib_gpu {

inline void cuda_ok(cudaError_t e, const char* what) {
  if (e != cudaSuccess)
    throw Error(std::string("GPU calibration: ") + what + ": " + cudaGetErrorString(e));
}

inline void blas_ok(cublasStatus_t s, const char* what) {
  if (s != CUBLAS_STATUS_SUCCESS)
    throw Error(std::string("GPU calibration: cuBLAS ") + what + " failed (status " +
                std::to_string(static_cast<int>(s)) + ")");
}

// A device allocation, grown on demand (contents are not kept when it grows).
class DevBuf {
 public:
  DevBuf() = default;
  DevBuf(const DevBuf&) = delete;
  DevBuf& operator=(const DevBuf&) = delete;
  DevBuf(DevBuf&& o) noexcept : p_(std::exchange(o.p_, nullptr)), bytes_(std::exchange(o.bytes_, 0)) {}
  ~DevBuf() {
    if (p_) cudaFree(p_);
  }
  void ensure(size_t bytes) {
    if (bytes <= bytes_) return;
    if (p_) cuda_ok(cudaFree(p_), "cudaFree");
    p_ = nullptr;
    bytes_ = 0;
    cuda_ok(cudaMalloc(&p_, bytes), ("cudaMalloc of " + std::to_string(bytes) + " bytes").c_str());
    bytes_ = bytes;
  }
  // Grown to hold n floats (at least one).
  float* floats(int64_t n) {
    ensure(static_cast<size_t>(n > 0 ? n : 1) * sizeof(float));
    return f();
  }
  // Grown to hold n doubles (at least one).
  double* doubles(int64_t n) {
    ensure(static_cast<size_t>(n > 0 ? n : 1) * sizeof(double));
    return d();
  }
  float* f() const { return static_cast<float*>(p_); }
  double* d() const { return static_cast<double*>(p_); }
  int32_t* i() const { return static_cast<int32_t*>(p_); }
  size_t bytes() const { return bytes_; }

 private:
  void* p_ = nullptr;
  size_t bytes_ = 0;
};

// Row-major C (M, N) = alpha · op(A) · op(B) + beta · C, op(X) = Xᵀ when tX; lda, ldb, ldc
// the row strides of the stored matrices. Column-major, this is Cᵀ (N, M) = op(B)ᵀ · op(A)ᵀ
// on the same buffers. T: float (SGEMM) or double (DGEMM).
template <typename T>
void gemm_rm(cublasHandle_t h, bool ta, bool tb, int64_t M, int64_t N, int64_t K, T alpha, const T* A,
             int64_t lda, const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  const cublasOperation_t oa = ta ? CUBLAS_OP_T : CUBLAS_OP_N, ob = tb ? CUBLAS_OP_T : CUBLAS_OP_N;
  const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
  if constexpr (sizeof(T) == sizeof(float))
    blas_ok(cublasSgemm(h, ob, oa, m, n, k, &alpha, B, static_cast<int>(ldb), A, static_cast<int>(lda), &beta, C,
                        static_cast<int>(ldc)),
            "sgemm");
  else
    blas_ok(cublasDgemm(h, ob, oa, m, n, k, &alpha, B, static_cast<int>(ldb), A, static_cast<int>(lda), &beta, C,
                        static_cast<int>(ldc)),
            "dgemm");
}

// Copies n floats of host memory into buf (grown to hold them), in stream order.
inline void upload(DevBuf& buf, const float* host, int64_t n, cudaStream_t s) {
  buf.floats(n);
  if (n) cuda_ok(cudaMemcpyAsync(buf.f(), host, n * sizeof(float), cudaMemcpyHostToDevice, s), "upload");
}

}  // namespace spear::calib_gpu
