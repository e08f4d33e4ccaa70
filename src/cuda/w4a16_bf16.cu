// bf16 instantiations of the W4A16 kernels.
#include "cuda/w4a16_launch.cuh"

namespace spear::cuda::detail {
template cudaError_t launch_decode<__nv_bfloat16>(const DecodeParams&, int, int, bool, bool, int, int, size_t, cudaStream_t);
template int decode_blocks_per_sm<__nv_bfloat16>(int, int, bool, bool, int, size_t);
template cudaError_t launch_ec_u<__nv_bfloat16>(const DecodeParams&, int, int, int, int, cudaStream_t);
template cudaError_t launch_batch<__nv_bfloat16>(const DecodeParams&, int, int, bool, int, int, size_t, cudaStream_t);
template int batch_blocks_per_sm<__nv_bfloat16>(int, int, bool, int, size_t);
template cudaError_t launch_prefill<__nv_bfloat16>(const PrefillParams&, int, bool, cudaStream_t);
}  // namespace spear::cuda::detail
