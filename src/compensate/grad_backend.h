#pragma once
// The gradient of the end-to-end objective (train_e2e) on a backend: the CPU Runner
// (CpuGrad, the reference) or a GPU (calib_gpu/GpuGrad, issue 12). One optimizer step is
// begin_step (the ECs the step is taken at), add_window per window of the batch, end_step
// (the accumulated gradients to the host); Adam then runs on the host (ec_train.h).
#include <cstdint>
#include <optional>
#include <string_view>
#include <vector>

#include "compensate/calib_data.h"
#include "compensate/network.h"
#include "compensate/teacher_targets.h"

namespace spear {

class GradBackend {
 public:
  virtual ~GradBackend() = default;
  virtual std::string_view device() const = 0;  // "cpu" | "cuda"
  // Starts a step at these ECs (layers*7, module_index order; they must not change until
  // end_step) with zero gradients.
  virtual void begin_step(const std::vector<std::optional<ECParams>>& ecs) = 0;
  // Window w of data, quantized path with the step's ECs: adds scale · ∂KL_w/∂θ to the
  // step's gradients (KL_w = Σ over the window's T rows of KL(P_fp ‖ P_q) against the
  // targets) and returns KL_w.
  virtual double add_window(const CalibData& data, const TeacherTargets& targets, int64_t w,
                            float scale) = 0;
  // add_window for windows [w0, w1), each window's KL added to *kl_sum in window order.
  // The default calls add_window one window at a time; a backend may run them as one batch.
  virtual void add_windows(const CalibData& data, const TeacherTargets& targets, int64_t w0,
                           int64_t w1, float scale, double* kl_sum) {
    for (int64_t w = w0; w < w1; ++w) *kl_sum += add_window(data, targets, w, scale);
  }
  // The step's gradients: grads[i] (resized as ECGrad::zero_like) for every EC of the step,
  // other entries untouched.
  virtual void end_step(std::vector<ECGrad>& grads) = 0;
};

// The CPU reference: Runner's forward with saved activations, head_backward and
// layer_backward, exactly the loop train_e2e always ran.
class CpuGrad final : public GradBackend {
 public:
  explicit CpuGrad(const Runner& run) : run_(run) {}
  std::string_view device() const override { return "cpu"; }
  void begin_step(const std::vector<std::optional<ECParams>>& ecs) override;
  double add_window(const CalibData& data, const TeacherTargets& targets, int64_t w,
                    float scale) override;
  void end_step(std::vector<ECGrad>& grads) override;

 private:
  const Runner& run_;
  const std::vector<std::optional<ECParams>>* ecs_ = nullptr;
  std::vector<ECGrad> grads_;      // (layers*7) the step's gradients
  std::vector<LayerCache> caches_;  // (layers) one window's saved activations
  std::vector<float> x_, dx_, logits_, hrstd_;  // (T, dim), (T, dim), (T, vocab), (T)
};

}  // namespace spear
