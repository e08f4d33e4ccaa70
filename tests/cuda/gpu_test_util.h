#pragma once
// What every GPU test shares: skip with a clear message where no CUDA device is present
// (CI compiles these tests but has no GPU; they run on the device machine).
#include <gtest/gtest.h>
#include <cuda_runtime.h>

namespace spear::test {

inline bool gpu_present() {
  int n = 0;
  const bool ok = cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
  cudaGetLastError();  // clear the error a machine without a driver leaves behind
  return ok;
}

}  // namespace spear::test

#define REQUIRE_GPU()                                                                          \
  if (!::spear::test::gpu_present())                                                     \
  GTEST_SKIP() << "no CUDA device (cudaGetDeviceCount failed or returned 0): GPU test skipped; " \
                  "run on a machine with an sm_90 GPU"
