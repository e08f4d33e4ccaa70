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
  SPEAR_CHECK(in_step_, "GpuGrad: add_window outside a step");
  SPEAR_CHECK(w >= 0 && w < data.windows, "GpuGrad: window out of range");
  const Network& net = run_.net();
  const int64_t L = net.cfg.num_layers, D = net.cfg.hidden_size, T = data.ctx;
  const cudaStream_t st = run_.stream();
  float* x = x_.floats(T * D);
  float* dx = dx_.floats(T * D);
  float* xin = xin_.floats(L * T * D);
  run_.embed_dev(data.window(w), T, x);
  for (int64_t l = 0; l < L; ++l) {
    cuda_ok(cudaMemcpyAsync(xin + l * T * D, x, T * D * sizeof(float), cudaMemcpyDeviceToDevice, st),
            "save layer input");
    run_.layer_forward_dev(q_view(net, l, nullptr), l, ecs_.params(l), x, 1, T);
  }
  // Recompute targets: the FP forward of w runs now, on the device.
  const std::unique_ptr<ForwardBackend::WindowTargets> t = run_.window_targets(data, targets, w);
  const double kl = run_.window_kl_backward_dev(x, T, *t, scale, dx);
  for (int64_t l = L - 1; l >= 0; --l)
    run_.layer_backward_dev(q_view(net, l, nullptr), l, ecs_.params(l), xin + l * T * D, dx, 1, T,
                            ecs_.grads(l));
  return kl;
}

void GpuGrad::end_step(std::vector<ECGrad>& grads) {
  SPEAR_CHECK(in_step_, "GpuGrad: end_step without a step");
  ecs_.download_grads(grads, run_.stream());
  in_step_ = false;
}

}  // namespace spear::calib_gpu
