#include "calib_gpu/gpu_ec_set.h"

#include <string>

namespace spear::calib_gpu {

void GpuECSet::upload(const std::vector<std::optional<ECParams>>& ecs, cudaStream_t s) {
  std::vector<const ECParams*> p(ecs.size());
  for (size_t i = 0; i < ecs.size(); ++i) p[i] = ecs[i] ? &*ecs[i] : nullptr;
  upload(p, s, true);
}

void GpuECSet::upload(const std::vector<const ECParams*>& ecs, cudaStream_t s, bool with_grads) {
  if (e_.size() != ecs.size()) {
    e_.clear();
    e_.resize(ecs.size());
  }
  with_grads_ = with_grads;
  for (size_t i = 0; i < ecs.size(); ++i) {
    Entry& e = e_[i];
    e.present = ecs[i] != nullptr;
    if (!e.present) continue;
    const ECParams& p = *ecs[i];
    const int64_t r = p.rank;
    SPEAR_CHECK(r > 0 && static_cast<int64_t>(p.A.size()) == r * p.in &&
                    static_cast<int64_t>(p.B.size()) == p.out * r &&
                    (!p.gated || (static_cast<int64_t>(p.G.size()) == r * r &&
                                  static_cast<int64_t>(p.c.size()) == r)),
                "GPU calibration: EC " + std::to_string(i) + " has inconsistent shapes");
    calib_gpu::upload(e.A, p.A.data(), r * p.in, s);
    calib_gpu::upload(e.B, p.B.data(), p.out * r, s);
    e.ec = DevEC{p.in, p.out, r, p.gated, e.A.f(), e.B.f(), nullptr, nullptr};
    if (p.gated) {
      calib_gpu::upload(e.G, p.G.data(), r * r, s);
      calib_gpu::upload(e.c, p.c.data(), r, s);
      e.ec.G = e.G.f();
      e.ec.c = e.c.f();
    }
    if (!with_grads) continue;
    e.g = DevECGrad{e.dA.floats(r * p.in), e.dB.floats(p.out * r), nullptr, nullptr};
    if (p.gated) {
      e.g.G = e.dG.floats(r * r);
      e.g.c = e.dc.floats(r);
    }
  }
  if (with_grads) zero_grads(s);
}

void GpuECSet::zero_grads(cudaStream_t s) {
  SPEAR_CHECK(with_grads_, "GpuECSet: uploaded without gradient buffers");
  for (Entry& e : e_) {
    if (!e.present) continue;
    const int64_t r = e.ec.rank;
    cuda_ok(cudaMemsetAsync(e.g.A, 0, r * e.ec.in * sizeof(float), s), "zero EC gradients");
    cuda_ok(cudaMemsetAsync(e.g.B, 0, e.ec.out * r * sizeof(float), s), "zero EC gradients");
    if (e.ec.gated) {
      cuda_ok(cudaMemsetAsync(e.g.G, 0, r * r * sizeof(float), s), "zero EC gradients");
      cuda_ok(cudaMemsetAsync(e.g.c, 0, r * sizeof(float), s), "zero EC gradients");
    }
  }
}

void GpuECSet::download_grads(std::vector<ECGrad>& grads, cudaStream_t s) const {
  SPEAR_CHECK(with_grads_, "GpuECSet: uploaded without gradient buffers");
  SPEAR_CHECK(grads.size() == e_.size(), "GpuECSet: gradients of another EC table");
  auto get = [&](std::vector<float>& h, const float* d, int64_t n) {
    h.resize(n);
    if (n) cuda_ok(cudaMemcpyAsync(h.data(), d, n * sizeof(float), cudaMemcpyDeviceToHost, s), "gradient download");
  };
  for (size_t i = 0; i < e_.size(); ++i) {
    const Entry& e = e_[i];
    if (!e.present) continue;
    const int64_t r = e.ec.rank;
    get(grads[i].A, e.g.A, r * e.ec.in);
    get(grads[i].B, e.g.B, e.ec.out * r);
    get(grads[i].G, e.g.G, e.ec.gated ? r * r : 0);
    get(grads[i].c, e.g.c, e.ec.gated ? r : 0);
  }
  cuda_ok(cudaStreamSynchronize(s), "gradient download");
}

PerModule<const DevEC*> GpuECSet::params(int64_t layer) const {
  PerModule<const DevEC*> p;
  for (Module m : kAllModules) {
    const size_t i = static_cast<size_t>(module_index(layer, m));
    SPEAR_CHECK(i < e_.size(), "GpuECSet: layer out of range");
    p[m] = e_[i].present ? &e_[i].ec : nullptr;
  }
  return p;
}

PerModule<const DevECGrad*> GpuECSet::grads(int64_t layer) const {
  SPEAR_CHECK(with_grads_, "GpuECSet: uploaded without gradient buffers");
  PerModule<const DevECGrad*> p;
  for (Module m : kAllModules) {
    const size_t i = static_cast<size_t>(module_index(layer, m));
    SPEAR_CHECK(i < e_.size(), "GpuECSet: layer out of range");
    p[m] = e_[i].present ? &e_[i].g : nullptr;
  }
  return p;
}

}  // namespace spear::calib_gpu
