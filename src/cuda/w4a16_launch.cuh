#pragma once
// Launcher bodies, included once per activation type (w4a16_f16.cu, w4a16_bf16.cu) so the
// two sets of kernel instantiations compile in parallel.
#include <map>
#include <mutex>
#include <utility>

#include "cuda/pdl_launch.cuh"
#include "cuda/w4a16_batch.cuh"
#include "cuda/w4a16_kernels.cuh"

namespace spear::cuda::detail {

constexpr int kMaxDecodeSmem = 227 * 1024;  // sm_90 opt-in limit per block

template <typename Kern>
static cudaError_t allow_big_smem(Kern k) {
  cudaFuncAttributes a;
  cudaError_t e = cudaFuncGetAttributes(&a, k);
  if (e != cudaSuccess) return e;
  return cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize,
                              kMaxDecodeSmem - static_cast<int>(a.sharedSizeBytes));
}

template <typename T, int NT, int TG, bool GROUPED, bool BULK>
static cudaError_t decode_inst(const DecodeParams& p, int grid, int threads, size_t smem, cudaStream_t s) {
  auto kern = w4_decode_kernel<T, NT, TG, GROUPED, BULK>;
  static std::once_flag once;
  static cudaError_t attr_err = cudaSuccess;
  std::call_once(once, [&] { attr_err = allow_big_smem(kern); });
  if (attr_err != cudaSuccess) return attr_err;
  return launch_pdl(kern, dim3(grid), dim3(threads), smem, s, p);
}

template <typename T, int NT, int TG, bool GROUPED, bool BULK>
static int decode_occ(int threads, size_t smem) {
  auto kern = w4_decode_kernel<T, NT, TG, GROUPED, BULK>;
  static std::once_flag once;
  std::call_once(once, [&] { allow_big_smem(kern); });
  int n = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kern, threads, smem) != cudaSuccess) return 0;
  return n;
}

// The bulk (TMA) variant is instantiated for M <= 16 (tg 1, 2) only.
#define SPEAR_DEC_ALL(F, ...)                                                                  \
  if (bulk) {                                                                                  \
    if (tg == 1 && nt == 1) return grouped ? F<T, 1, 1, true, true>(__VA_ARGS__) : F<T, 1, 1, false, true>(__VA_ARGS__); \
    if (tg == 1 && nt == 2) return grouped ? F<T, 2, 1, true, true>(__VA_ARGS__) : F<T, 2, 1, false, true>(__VA_ARGS__); \
    if (tg == 1 && nt == 4) return grouped ? F<T, 4, 1, true, true>(__VA_ARGS__) : F<T, 4, 1, false, true>(__VA_ARGS__); \
    if (tg == 2 && nt == 1) return grouped ? F<T, 1, 2, true, true>(__VA_ARGS__) : F<T, 1, 2, false, true>(__VA_ARGS__); \
    if (tg == 2 && nt == 2) return grouped ? F<T, 2, 2, true, true>(__VA_ARGS__) : F<T, 2, 2, false, true>(__VA_ARGS__); \
    if (tg == 2 && nt == 4) return grouped ? F<T, 4, 2, true, true>(__VA_ARGS__) : F<T, 4, 2, false, true>(__VA_ARGS__); \
  } else {                                                                                     \
    if (tg == 1 && nt == 1) return grouped ? F<T, 1, 1, true, false>(__VA_ARGS__) : F<T, 1, 1, false, false>(__VA_ARGS__); \
    if (tg == 1 && nt == 2) return grouped ? F<T, 2, 1, true, false>(__VA_ARGS__) : F<T, 2, 1, false, false>(__VA_ARGS__); \
    if (tg == 1 && nt == 4) return grouped ? F<T, 4, 1, true, false>(__VA_ARGS__) : F<T, 4, 1, false, false>(__VA_ARGS__); \
    if (tg == 2 && nt == 1) return grouped ? F<T, 1, 2, true, false>(__VA_ARGS__) : F<T, 1, 2, false, false>(__VA_ARGS__); \
    if (tg == 2 && nt == 2) return grouped ? F<T, 2, 2, true, false>(__VA_ARGS__) : F<T, 2, 2, false, false>(__VA_ARGS__); \
    if (tg == 2 && nt == 4) return grouped ? F<T, 4, 2, true, false>(__VA_ARGS__) : F<T, 4, 2, false, false>(__VA_ARGS__); \
    if (tg == 4 && nt == 1) return grouped ? F<T, 1, 4, true, false>(__VA_ARGS__) : F<T, 1, 4, false, false>(__VA_ARGS__); \
    if (tg == 4 && nt == 2) return grouped ? F<T, 2, 4, true, false>(__VA_ARGS__) : F<T, 2, 4, false, false>(__VA_ARGS__); \
    if (tg == 8 && nt == 1) return grouped ? F<T, 1, 8, true, false>(__VA_ARGS__) : F<T, 1, 8, false, false>(__VA_ARGS__); \
  }

template <typename T>
cudaError_t launch_decode(const DecodeParams& p, int nt, int tg, bool grouped, bool bulk, int grid, int threads,
                          size_t smem, cudaStream_t s) {
  SPEAR_DEC_ALL(decode_inst, p, grid, threads, smem, s)
  return cudaErrorInvalidValue;
}

template <typename T>
int decode_blocks_per_sm(int nt, int tg, bool grouped, bool bulk, int threads, size_t smem) {
  SPEAR_DEC_ALL(decode_occ, threads, smem)
  return 0;
}
#undef SPEAR_DEC_ALL

// ---- batch kernel (Kernel::kBatch): NT in {1, 2, 4}, TG in {2, 4, 8} --------------------
template <typename T, int NT, int TG, bool GROUPED>
static cudaError_t batch_inst(const DecodeParams& p, int grid, int threads, size_t smem, cudaStream_t s) {
  auto kern = w4_batch_kernel<T, NT, TG, GROUPED>;
  static std::once_flag once;
  static cudaError_t attr_err = cudaSuccess;
  std::call_once(once, [&] { attr_err = allow_big_smem(kern); });
  if (attr_err != cudaSuccess) return attr_err;
  return launch_pdl(kern, dim3(grid), dim3(threads), smem, s, p);
}

// Memoized per (threads, smem): the batch heuristic asks four instantiations on every
// untuned select(), which runs per GEMM call outside CUDA graphs (mixed and prefill steps).
template <typename T, int NT, int TG, bool GROUPED>
static int batch_occ(int threads, size_t smem) {
  auto kern = w4_batch_kernel<T, NT, TG, GROUPED>;
  static std::once_flag once;
  std::call_once(once, [&] { allow_big_smem(kern); });
  static std::mutex mu;
  static std::map<std::pair<int, size_t>, int> seen;
  std::lock_guard<std::mutex> lock(mu);
  const auto key = std::make_pair(threads, smem);
  if (auto it = seen.find(key); it != seen.end()) return it->second;
  int n = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kern, threads, smem) != cudaSuccess) return 0;
  seen[key] = n;
  return n;
}

#define SPEAR_BATCH_ALL(F, ...)                                                                         \
  if (tg == 2 && nt == 1) return grouped ? F<T, 1, 2, true>(__VA_ARGS__) : F<T, 1, 2, false>(__VA_ARGS__); \
  if (tg == 2 && nt == 2) return grouped ? F<T, 2, 2, true>(__VA_ARGS__) : F<T, 2, 2, false>(__VA_ARGS__); \
  if (tg == 2 && nt == 4) return grouped ? F<T, 4, 2, true>(__VA_ARGS__) : F<T, 4, 2, false>(__VA_ARGS__); \
  if (tg == 4 && nt == 1) return grouped ? F<T, 1, 4, true>(__VA_ARGS__) : F<T, 1, 4, false>(__VA_ARGS__); \
  if (tg == 4 && nt == 2) return grouped ? F<T, 2, 4, true>(__VA_ARGS__) : F<T, 2, 4, false>(__VA_ARGS__); \
  if (tg == 4 && nt == 4) return grouped ? F<T, 4, 4, true>(__VA_ARGS__) : F<T, 4, 4, false>(__VA_ARGS__); \
  if (tg == 8 && nt == 1) return grouped ? F<T, 1, 8, true>(__VA_ARGS__) : F<T, 1, 8, false>(__VA_ARGS__); \
  if (tg == 8 && nt == 2) return grouped ? F<T, 2, 8, true>(__VA_ARGS__) : F<T, 2, 8, false>(__VA_ARGS__); \
  if (tg == 8 && nt == 4) return grouped ? F<T, 4, 8, true>(__VA_ARGS__) : F<T, 4, 8, false>(__VA_ARGS__);

template <typename T>
cudaError_t launch_batch(const DecodeParams& p, int nt, int tg, bool grouped, int grid, int threads, size_t smem,
                         cudaStream_t s) {
  SPEAR_BATCH_ALL(batch_inst, p, grid, threads, smem, s)
  return cudaErrorInvalidValue;
}

template <typename T>
int batch_blocks_per_sm(int nt, int tg, bool grouped, int threads, size_t smem) {
  SPEAR_BATCH_ALL(batch_occ, threads, smem)
  return 0;
}
#undef SPEAR_BATCH_ALL

template <typename T>
cudaError_t launch_ec_u(const DecodeParams& p, int tg, int grid_x, int grid_y, int threads, cudaStream_t s) {
  dim3 grid(grid_x, grid_y);
  switch (tg) {
    case 1: ec_u_kernel<T, 1><<<grid, threads, 0, s>>>(p); break;
    case 2: ec_u_kernel<T, 2><<<grid, threads, 0, s>>>(p); break;
    case 4: ec_u_kernel<T, 4><<<grid, threads, 0, s>>>(p); break;
    case 8: ec_u_kernel<T, 8><<<grid, threads, 0, s>>>(p); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

template <typename T, bool GROUPED, int BM>
static cudaError_t prefill_bm(const PrefillParams& p, cudaStream_t s) {
  constexpr int smem = prefill_smem_bytes<BM>();
  static bool attr_set = false;  // benign race: setting the same attribute twice is harmless
  if (!attr_set) {
    cudaError_t e = cudaFuncSetAttribute(w4_prefill_kernel<T, GROUPED, BM>,
                                         cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (e != cudaSuccess) return e;
    attr_set = true;
  }
  dim3 grid((p.N_pad / 16 + 7) / 8, (p.M + BM - 1) / BM, p.splits);
  w4_prefill_kernel<T, GROUPED, BM><<<grid, 256, smem, s>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_prefill(const PrefillParams& p, int bm, bool grouped, cudaStream_t s) {
  if (bm == 64) return grouped ? prefill_bm<T, true, 64>(p, s) : prefill_bm<T, false, 64>(p, s);
  if (bm == 128) return grouped ? prefill_bm<T, true, 128>(p, s) : prefill_bm<T, false, 128>(p, s);
  return cudaErrorInvalidValue;
}

}  // namespace spear::cuda::detail
