#pragma once
// The end-to-end objective's gradient on the GPU (issue 12): a GradBackend over a
// GpuRunner, so that train_e2e runs each window's forward and backward on the device.
// Per step the ECs are uploaded once (GpuECSet) and their gradients accumulated on the
// device over the step's windows, then downloaded once; Adam stays on the host (the EC
// parameters are small next to one window's activations).
//
// Per batch of windows (train_e2e's step, add_windows): the quantized path's forward keeps
// only each layer's input, (layers, windows × T, dim) device; the teacher targets come from GpuRunner::window_targets (Recompute: the FP
// forward on the device); the head's KL gradient and backward; then layer after layer,
// last first, layer_backward_dev recomputes the layer's internals from its input.
#include <cstdint>
#include <optional>
#include <string_view>
#include <vector>

#include "calib_gpu/dev_buf.h"
#include "calib_gpu/gpu_ec_set.h"
#include "compensate/grad_backend.h"

namespace spear::calib_gpu {

class GpuRunner;

class GpuGrad final : public GradBackend {
 public:
  explicit GpuGrad(const GpuRunner& run) : run_(run) {}
  std::string_view device() const override { return "cuda"; }
  void begin_step(const std::vector<std::optional<ECParams>>& ecs) override;
  double add_window(const CalibData& data, const TeacherTargets& targets, int64_t w,
                    float scale) override;
  // The windows [w0, w1) as one batch: every layer's forward and backward over
  // (w1 − w0) × T rows (attention causal inside each window), the head per window.
  void add_windows(const CalibData& data, const TeacherTargets& targets, int64_t w0, int64_t w1,
                   float scale, double* kl_sum) override;
  void end_step(std::vector<ECGrad>& grads) override;

 private:
  const GpuRunner& run_;
  GpuECSet ecs_;
  bool in_step_ = false;
  DevBuf xin_;     // (layers, rows, dim) each layer's input of the current batch, rows = windows × T
  DevBuf x_, dx_;  // (rows, dim) the residual stream and its gradient
};

}  // namespace spear::calib_gpu
