#pragma once
// The calibration forward on the GPU (issue 12, first piece): Runner's layer_forward and
// head_forward (compensate/network.h) in fp32 on one CUDA device, cuBLAS SGEMM in its
// default (non-TF32) math, so that activations and logits agree with the CPU Runner to
// float rounding (~1e-6 relative); the log-softmax of the teacher logits and the KL per
// row on the device, so that mean_kl and the restoration gains never copy logits to the
// host. It implements ForwardBackend, which those algorithms are written against.
//
// The backward pass (issue 12, second piece): layer_backward_dev / head_backward_dev mirror
// Runner::layer_backward / head_backward (input gradients and EC gradients, every gate
// kind), recomputing a layer's internals from its input (only the layer inputs of a
// window are kept by the caller, so memory is one layer's activations); gradients()
// gives the GradBackend (calib_gpu/gpu_grad.h) that train_e2e runs on the GPU with.
//
// Memory: the shared tensors (embeddings, final norm, head, RoPE tables) are resident; the
// per-layer weights of both paths (fp and q, float32) are resident when they fit in
// `weight_fraction` of the free device memory at construction, else streamed: one layer
// per path is held and a layer is uploaded when another is asked for. ECs (small, and
// changing between calls) are uploaded on every layer_forward. Activations and scratch
// are sized by the rows of the largest call (grown on demand).
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <cuda_runtime.h>

#include "calib_gpu/gpu_ec_set.h"
#include "compensate/forward_backend.h"
#include "compensate/network.h"

namespace spear::calib_gpu {

// Whether a CUDA device is usable for calibration here; `why` says what is missing.
bool gpu_calib_available(std::string* why = nullptr);

class GpuRunner final : public ForwardBackend {
 public:
  // Throws spear::Error when no CUDA device is usable (naming why) or memory runs out.
  explicit GpuRunner(const Network& net, int device = 0, double weight_fraction = 0.8);
  ~GpuRunner() override;
  GpuRunner(const GpuRunner&) = delete;
  GpuRunner& operator=(const GpuRunner&) = delete;

  // --- ForwardBackend (device activations)
  const Network& net() const override { return net_; }
  std::string_view device() const override { return "cuda"; }
  std::unique_ptr<Acts> embed(const int32_t* tokens, int64_t rows) const override;
  std::unique_ptr<Acts> copy_rows(const Acts& x, int64_t row0, int64_t rows) const override;
  void layer_forward(const LayerView& lv, int64_t layer, Acts& x, int64_t row0, int64_t B,
                     int64_t T) const override;
  // Recompute targets: the FP forward of window w and its log-softmax, kept on the device.
  // Dense / TopK targets: the host TargetWindow (window_kl then copies the logits back).
  std::unique_ptr<WindowTargets> window_targets(const CalibData& data, const TeacherTargets& targets,
                                                int64_t w) const override;
  double window_kl(const Acts& x, int64_t row0, int64_t T, const WindowTargets& t) const override;
  // The logits and their log-softmax on the device; the NLL summed there.
  double window_nll(const Acts& x, int64_t row0, int64_t T, const int32_t* tokens) const override;
  // The static control on the device (calib_gpu/gpu_static.h): the moments stay there and
  // only each fit's factors come back.
  std::unique_ptr<Moments> layer_moments(int64_t layer, Acts& xf, Acts& xq, int64_t nw, int64_t T,
                                         const std::vector<std::optional<ECParams>>* ecs,
                                         unsigned sites) const override;
  std::vector<StaticFit> fit_site(const Moments& mo, int64_t layer, Site s,
                                  const std::vector<std::pair<Module, int64_t>>& mods, double damp,
                                  StaticMode mode) const override;
  // A GpuGrad over this runner (train_e2e on the GPU).
  std::unique_ptr<GradBackend> gradients() const override;

  // --- the device API (raw device pointers, on stream())
  cudaStream_t stream() const { return stream_; }
  // x (rows, dim) device = embeddings of host tokens (rows); ids are range-checked.
  void embed_dev(const int32_t* tokens, int64_t rows, float* x) const;
  // One decoder layer in place on x (B*T, dim) device, with lv's (host) ECs.
  void layer_forward_dev(const LayerView& lv, int64_t layer, float* x, int64_t B, int64_t T) const;
  // The same with device ECs (per module, nullptr = none); lv.ec is ignored.
  void layer_forward_dev(const LayerView& lv, int64_t layer, const PerModule<const DevEC*>& ecs, float* x,
                         int64_t B, int64_t T) const;
  // Runner::layer_backward on the GPU. x_in (B*T, dim) device: the layer's input (its
  // internals are recomputed from it); dx (B*T, dim) device: in dL/d(layer output), out
  // dL/d(layer input). grads: per module with an EC (ecs, device; lv.ec is ignored),
  // accumulated into.
  void layer_backward_dev(const LayerView& lv, int64_t layer, const PerModule<const DevEC*>& ecs,
                          const float* x_in, float* dx, int64_t B, int64_t T,
                          const PerModule<const DevECGrad*>& grads) const;
  // Runner::head_backward: dx (rows, dim) device = dL/dx for the x (rows, dim) device given
  // to head_forward_dev, from dlogits (rows, vocab) device.
  void head_backward_dev(const float* x, const float* dlogits, int64_t rows, float* dx) const;
  // kl (rows) device = KL(exp(ref_logp) ‖ softmax(logits)) per row and dlogits (rows,
  // vocab) device = scale · (softmax(logits) − exp(ref_logp)); dlogits may be logits.
  void kl_grad_rows_dev(const float* logits, const float* ref_logp, int64_t rows, float scale, double* kl,
                        float* dlogits) const;
  // The head of the e2e objective for one window: x (T, dim) device its final hidden
  // states; returns Σ_rows KL against t (window_targets') and sets dx (T, dim) device =
  // scale · ∂KL/∂x through the head and the final norm (TargetWindow::kl's gradient, then
  // head_backward). Recompute targets stay on the device; Dense / TopK: the logits go to
  // the host for the KL and its gradient comes back.
  double window_kl_backward_dev(const float* x, int64_t T, const WindowTargets& t, float scale,
                                float* dx) const;
  // Host mirrors of the backward (host pointers, synchronous; for tests): x_in, dx
  // (B*T, dim) as layer_backward_dev, with lv.ec's ECs; grads (sized by zero_like) added into.
  void layer_backward(const LayerView& lv, int64_t layer, const float* x_in, float* dx, int64_t B,
                      int64_t T, const PerModule<ECGrad*>& grads) const;
  // x (rows, dim), dlogits (rows, vocab) -> dx (rows, dim), all host.
  void head_backward(const float* x, const float* dlogits, int64_t rows, float* dx) const;
  // logits (rows, vocab) device = head(final_norm(x)), x (rows, dim) device.
  void head_forward_dev(const float* x, int64_t rows, float* logits) const;
  // Row KLs: kl (rows) device = KL(exp(ref_logp) ‖ softmax(logits)), both (rows, vocab) device.
  void kl_rows_dev(const float* logits, const float* ref_logp, int64_t rows, double* kl) const;
  // In place: logits (rows, vocab) device -> log-probabilities.
  void log_softmax_dev(float* logits, int64_t rows) const;
  // Runner::forward on the GPU: host tokens (B*T) -> host logits (B*T, vocab).
  void forward(const int32_t* tokens, int64_t B, int64_t T, bool quantized,
               const std::vector<std::optional<ECParams>>* ecs, float* logits) const;
  bool weights_resident() const { return resident_; }
  int64_t device_weight_bytes() const { return weight_bytes_; }

 private:
  struct Impl;
  const Network& net_;
  cudaStream_t stream_ = nullptr;
  bool resident_ = false;
  int64_t weight_bytes_ = 0;
  std::unique_ptr<Impl> im_;
};

// The factory calibrate / diagnose take (CalibrateOptions::forward): a GpuRunner on device 0.
ForwardFactory gpu_forward_factory();

}  // namespace spear::calib_gpu
