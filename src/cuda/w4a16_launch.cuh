#pragma once
// Launcher bodies, included once per activation type (w4a16_f16.cu, w4a16_bf16.cu) so the
// two sets of kernel instantiations compile in parallel.
#include "cuda/w4a16_kernels.cuh"

namespace spear::cuda::detail {

template <typename T, int NT, int TG>
static cudaError_t decode_nt_tg(const DecodeParams& p, bool grouped, int grid, int threads, size_t smem,
                                cudaStream_t s) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(grid);
  cfg.blockDim = dim3(threads);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = s;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = pdl_enabled() ? 1 : 0;
  if (grouped) return cudaLaunchKernelEx(&cfg, w4_decode_kernel<T, NT, TG, true>, p);
  return cudaLaunchKernelEx(&cfg, w4_decode_kernel<T, NT, TG, false>, p);
}

template <typename T>
cudaError_t launch_decode(const DecodeParams& p, int nt, int tg, bool grouped, int grid, int threads, size_t smem,
                          cudaStream_t s) {
#define SPEAR_DEC(NT_, TG_) \
  if (nt == NT_ && tg == TG_) return decode_nt_tg<T, NT_, TG_>(p, grouped, grid, threads, smem, s);
  SPEAR_DEC(1, 1) SPEAR_DEC(2, 1) SPEAR_DEC(4, 1)
  SPEAR_DEC(1, 2) SPEAR_DEC(2, 2) SPEAR_DEC(4, 2)
  SPEAR_DEC(1, 4) SPEAR_DEC(2, 4)
  SPEAR_DEC(1, 8)
#undef SPEAR_DEC
  return cudaErrorInvalidValue;
}

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
  dim3 grid((p.N_pad / 16 + 7) / 8, (p.M + BM - 1) / BM);
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
