#include "compensate/grad_backend.h"

#include "core/error.h"

namespace spear {

void CpuGrad::begin_step(const std::vector<std::optional<ECParams>>& ecs) {
  ecs_ = &ecs;
  grads_.resize(ecs.size());
  for (size_t i = 0; i < ecs.size(); ++i)
    if (ecs[i]) grads_[i].zero_like(*ecs[i]);
}

double CpuGrad::add_window(const CalibData& data, const TeacherTargets& targets, int64_t w, float scale) {
  SPEAR_CHECK(ecs_, "CpuGrad: add_window outside a step");
  const Network& net = run_.net();
  const std::vector<std::optional<ECParams>>& ecs = *ecs_;
  const int64_t L = net.cfg.num_layers, D = net.cfg.hidden_size, V = net.cfg.vocab_size, T = data.ctx;
  caches_.resize(L);
  x_.resize(T * D);
  dx_.resize(T * D);
  logits_.resize(T * V);
  run_.embed(data.window(w), T, x_.data());
  for (int64_t l = 0; l < L; ++l) run_.layer_forward(q_view(net, l, &ecs), l, x_.data(), 1, T, &caches_[l]);
  run_.head_forward(x_.data(), T, logits_.data(), &hrstd_);
  // Recompute: the FP forward of w runs here, before the student's logits are used.
  const double kl = targets.window(w).kl(logits_.data(), scale, logits_.data());
  run_.head_backward(x_.data(), hrstd_, logits_.data(), T, dx_.data());
  for (int64_t l = L - 1; l >= 0; --l) {
    PerModule<ECGrad*> g;
    for (Module m : kAllModules)
      if (ecs[module_index(l, m)]) g[m] = &grads_[module_index(l, m)];
    run_.layer_backward(q_view(net, l, &ecs), l, caches_[l], dx_.data(), 1, T, g);
  }
  return kl;
}

void CpuGrad::end_step(std::vector<ECGrad>& grads) {
  SPEAR_CHECK(ecs_ && grads.size() == grads_.size(), "CpuGrad: end_step without a step, or of other ECs");
  for (size_t i = 0; i < grads_.size(); ++i)
    if ((*ecs_)[i]) grads[i] = grads_[i];
  ecs_ = nullptr;
}

}  // namespace spear
