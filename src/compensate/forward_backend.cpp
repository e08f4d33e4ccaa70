#include "compensate/forward_backend.h"

#include <utility>
#include <vector>

#include "core/error.h"

namespace spear {

namespace {

struct CpuActs final : ForwardBackend::Acts {
  std::vector<float> x;  // (rows, dim)
};

struct CpuTargets final : ForwardBackend::WindowTargets {
  explicit CpuTargets(TargetWindow w) : tw(std::move(w)) {}
  TargetWindow tw;
};

const CpuActs& cpu(const ForwardBackend::Acts& a) {
  const auto* p = dynamic_cast<const CpuActs*>(&a);
  SPEAR_CHECK(p, "CpuForward: activations of another backend");
  return *p;
}

}  // namespace

std::unique_ptr<ForwardBackend::Acts> CpuForward::embed(const int32_t* tokens, int64_t rows) const {
  auto a = std::make_unique<CpuActs>();
  a->rows = rows;
  a->x.resize(rows * run_.net().cfg.hidden_size);
  run_.embed(tokens, rows, a->x.data());
  return a;
}

std::unique_ptr<ForwardBackend::Acts> CpuForward::copy_rows(const Acts& x, int64_t row0,
                                                            int64_t rows) const {
  const CpuActs& s = cpu(x);
  const int64_t D = run_.net().cfg.hidden_size;
  SPEAR_CHECK(row0 >= 0 && rows >= 0 && row0 + rows <= s.rows, "CpuForward: rows out of range");
  auto a = std::make_unique<CpuActs>();
  a->rows = rows;
  a->x.assign(s.x.begin() + row0 * D, s.x.begin() + (row0 + rows) * D);
  return a;
}

void CpuForward::layer_forward(const LayerView& lv, int64_t layer, Acts& x, int64_t row0, int64_t B,
                               int64_t T) const {
  CpuActs& a = const_cast<CpuActs&>(cpu(x));
  SPEAR_CHECK(row0 >= 0 && row0 + B * T <= a.rows, "CpuForward: rows out of range");
  run_.layer_forward(lv, layer, &a.x[row0 * run_.net().cfg.hidden_size], B, T, nullptr);
}

std::unique_ptr<ForwardBackend::WindowTargets> CpuForward::window_targets(
    const CalibData& data, const TeacherTargets& targets, int64_t w) const {
  return std::make_unique<CpuTargets>(targets.window(w));
}

double CpuForward::window_kl(const Acts& x, int64_t row0, int64_t T, const WindowTargets& t) const {
  const CpuActs& a = cpu(x);
  const auto* ct = dynamic_cast<const CpuTargets*>(&t);
  SPEAR_CHECK(ct, "CpuForward: targets of another backend");
  SPEAR_CHECK(row0 >= 0 && row0 + T <= a.rows, "CpuForward: rows out of range");
  const int64_t D = run_.net().cfg.hidden_size, V = run_.net().cfg.vocab_size;
  std::vector<float> logits(T * V);  // (T, V)
  run_.head_forward(&a.x[row0 * D], T, logits.data(), nullptr);
  return ct->tw.kl(logits.data(), 0.0f, nullptr);
}

}  // namespace spear
