#pragma once
// Programmatic dependent launch (Hopper), shared by every kernel of a decode step: the W4
// GEMMs and the llama ops. A kernel launched this way may be scheduled while the one before
// it in the stream drains; it must wait (griddepcontrol.wait) before it reads or writes
// memory that kernel touches, and may let the next one be scheduled (launch_dependents).
// On unless $SPEAR_W4A16_PDL=0 or w4a16_set_pdl(false) (process-wide).
#include <cuda_runtime.h>

#include <utility>

#include "cuda/w4a16.h"
#include "cuda/w4a16_device.cuh"

namespace spear::cuda {

// The first statement of a kernel that needs nothing before the wait: wait for the
// predecessor's completion and memory, then let the successor be scheduled. The launch
// latency of each small kernel of a step is hidden behind its predecessor's tail.
__device__ __forceinline__ void pdl_enter() {
  detail::grid_dep_wait();
  detail::grid_dep_launch();
}

// kernel<<<grid, block, smem, stream>>>(args...) with the programmatic-serialization
// attribute when PDL is on.
template <typename... KArgs, typename... Args>
cudaError_t launch_pdl(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                       Args&&... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = w4a16_pdl() ? 1 : 0;
  return cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...);
}

}  // namespace spear::cuda
