#include "calib_gpu/gpu_grad.h"

#include "calib_gpu/gpu_runner.h"
#include "core/error.h"

namespace spear::calib_gpu {

void GpuGrad::begin_step(const std::vector<std::optional<ECParams>>& ecs) {
  SPEAR_CHECK(static_cast<int64_t>(ecs.size()) == run_.net().cfg.num_layers * kNumModules,
              "GpuGrad: the EC table is not (layers * 7)");
  ecs_.upload(ecs, run_.stream());  // gradients zeroed
  in_step_ = true;
}

double GpuGrad::add_window(const CalibData& data, const TeacherTargets& targets, int64_t w, float scale) {
  double kl = 0;
  add_windows(data, targets, w, w + 1, scale, &kl);
  return kl;
}

void GpuGrad::add_windows(const CalibData& data, const TeacherTargets& targets, int64_t w0, int64_t w1,
                          float scale, double* kl_sum) {
  SPEAR_CHECK(in_step_, "GpuGrad: add_windows outside a step");
  SPEAR_CHECK(w0 >= 0 && w1 <= data.windows && w0 <= w1, "GpuGrad: windows out of range");
  if (w0 == w1) return;
  const Network& net = run_.net();
  const int64_t L = net.cfg.num_layers, D = net.cfg.hidden_size, T = data.ctx, nb = w1 - w0, rows = nb * T;
  const cudaStream_t st = run_.stream();
  float* x = x_.floats(rows * D);         // (rows, dim)
  float* dx = dx_.floats(rows * D);       // (rows, dim)
  float* xin = xin_.floats(L * rows * D);  // (layers, rows, dim)
  run_.embed_dev(data.window(w0), rows, x);  // the windows are consecutive in data.tokens
  for (int64_t l = 0; l < L; ++l) {
    cuda_ok(cudaMemcpyAsync(xin + l * rows * D, x, rows * D * sizeof(float), cudaMemcpyDeviceToDevice, st),
            "save layer input");
    run_.layer_forward_dev(q_view(net, l, nullptr), l, ecs_.params(l), x, nb, T);
  }
  for (int64_t w = w0; w < w1; ++w) {
    // Recompute targets: the FP forward of w runs now, on the device.
    const std::unique_ptr<ForwardBackend::WindowTargets> t = run_.window_targets(data, targets, w);
    *kl_sum += run_.window_kl_backward_dev(x + (w - w0) * T * D, T, *t, scale, dx + (w - w0) * T * D);
  }
  for (int64_t l = L - 1; l >= 0; --l)
    run_.layer_backward_dev(q_view(net, l, nullptr), l, ecs_.params(l), xin + l * rows * D, dx, nb, T,
                            ecs_.grads(l));
}

void GpuGrad::end_step(std::vector<ECGrad>& grads) {
  SPEAR_CHECK(in_step_, "GpuGrad: end_step without a step");
  ecs_.download_grads(grads, run_.stream());
  in_step_ = false;
}

}  // namespace spear::calib_gpu
