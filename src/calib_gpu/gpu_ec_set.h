#pragma once
// Error Compensators and their gradients in device memory, for the GPU calibration's
// training (issue 12): the parameters are uploaded once per optimizer step, the gradients
// accumulated on the device over the step's windows and downloaded once.
#include <cstdint>
#include <optional>
#include <vector>

#include <cuda_runtime.h>

#include "calib_gpu/dev_buf.h"
#include "compensate/network.h"
#include "model/module.h"

namespace spear::calib_gpu {

// One EC's parameters in device memory (shapes as ECParams).
struct DevEC {
  int64_t in = 0, out = 0, rank = 0;
  bool gated = false;
  const float* A = nullptr;  // (r, in) device
  const float* B = nullptr;  // (out, r) device
  const float* G = nullptr;  // (r, r) device; null when !gated
  const float* c = nullptr;  // (r) device; null when !gated
};

// One EC's gradient buffers in device memory (accumulated into; shapes as DevEC).
struct DevECGrad {
  float* A = nullptr;  // (r, in) device
  float* B = nullptr;  // (out, r) device
  float* G = nullptr;  // (r, r) device; null when !gated
  float* c = nullptr;  // (r) device; null when !gated
};

// The ECs of a model (layers*7, module_index order) on the device, with gradients.
class GpuECSet {
 public:
  // Uploads ecs on stream s (pageable copies, in stream order); the gradient buffers are
  // sized and zeroed. Absent ECs have none.
  void upload(const std::vector<std::optional<ECParams>>& ecs, cudaStream_t s);
  // The same from pointers (nullptr = none); with_grads false: no gradient buffers (a
  // forward-only upload; grads() then has none).
  void upload(const std::vector<const ECParams*>& ecs, cudaStream_t s, bool with_grads = true);
  void zero_grads(cudaStream_t s);
  // grads[i] (resized like ECGrad::zero_like) = the device gradients of EC i, for every
  // present EC; other entries are untouched. Synchronizes s.
  void download_grads(std::vector<ECGrad>& grads, cudaStream_t s) const;
  size_t size() const { return e_.size(); }
  // Per module of `layer`: the EC (nullptr where none).
  PerModule<const DevEC*> params(int64_t layer) const;
  PerModule<const DevECGrad*> grads(int64_t layer) const;

 private:
  struct Entry {
    bool present = false;
    DevBuf A, B, G, c;      // parameters
    DevBuf dA, dB, dG, dc;  // gradients
    DevEC ec;
    DevECGrad g;
  };
  std::vector<Entry> e_;
  bool with_grads_ = false;
};

}  // namespace spear::calib_gpu
