// stack_modules (model/weights.h): Q|K|V and Gate|Up as one module. The stacked module's
// output must be the members' outputs side by side, for dense and quantized weights and for
// ECs stacked from gated, ungated and absent members (block-diagonal B and G).
#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "core/error.h"
#include "model/load_hf.h"
#include "quant/cpu_model.h"
#include "quant/rtn.h"
#include "test_paths.h"

using namespace spear;

namespace {

ECParams random_ec(int64_t in, int64_t out, int64_t r, bool gated, std::mt19937& g) {
  std::normal_distribution<float> nd(0.0f, 1.0f);
  ECParams p;
  p.in = in;
  p.out = out;
  p.rank = r;
  p.gated = gated;
  p.A.resize(r * in);
  p.B.resize(out * r);
  for (float& v : p.A) v = nd(g) / std::sqrt(static_cast<float>(in));
  for (float& v : p.B) v = 0.1f * nd(g);
  if (gated) {
    p.G.resize(r * r);
    p.c.resize(r);
    for (float& v : p.G) v = 0.3f * nd(g);
    for (float& v : p.c) v = 0.3f * nd(g);
  }
  return p;
}

// y_stacked (M, sum out) against [y_1 | y_2 | ...] of the members, all on the CPU.
void expect_stack_matches(const LlamaWeights& w, int64_t l, const std::vector<Module>& ms) {
  std::optional<ModuleWeights> st = stack_modules(w, l, ms, 1 << 20);
  ASSERT_TRUE(st.has_value());
  const int64_t K = module_shape(w.config, ms[0]).in, M = 5;
  std::mt19937 g(11);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<float> x(M * K);
  for (float& v : x) v = nd(g);
  auto stacked = make_cpu_linear(*st);
  const int64_t N = stacked->out_features();
  std::vector<float> y(M * N);
  stacked->forward(x.data(), M, y.data());
  int64_t n0 = 0;
  for (Module m : ms) {
    auto one = make_cpu_linear(w.at(l, m));
    const int64_t n = one->out_features();
    std::vector<float> ym(M * n);
    one->forward(x.data(), M, ym.data());
    for (int64_t r = 0; r < M; ++r)
      for (int64_t i = 0; i < n; ++i)
        ASSERT_NEAR(y[r * N + n0 + i], ym[r * n + i], 1e-4 + 1e-4 * std::fabs(ym[r * n + i]))
            << module_name(m) << " row " << r << " col " << i;
    n0 += n;
  }
  EXPECT_EQ(n0, N);
}

}  // namespace

TEST(StackModules, DenseQkvAndGateUp) {
  LlamaWeights w = load_hf_weights(test::tiny_model_dir());
  expect_stack_matches(w, 0, {Module::Q, Module::K, Module::V});
  expect_stack_matches(w, 1, {Module::Gate, Module::Up});
}

TEST(StackModules, QuantizedWithMixedEcs) {
  LlamaWeights w = load_hf_weights(test::tiny_model_dir());
  std::mt19937 g(3);
  for (Module m : kAllModules) {
    ModuleWeights& mw = w.at(0, m);
    const ModuleShape s = module_shape(w.config, m);
    mw.quant = quantize_rtn(mw.dense.to_f32().data(), s.out, s.in, QuantScheme{4, -1, false});
    mw.dense = WeightTensor{};
  }
  const int64_t D = w.config.hidden_size;
  w.at(0, Module::Q).ec = random_ec(D, module_shape(w.config, Module::Q).out, 4, true, g);   // gated
  w.at(0, Module::V).ec = random_ec(D, module_shape(w.config, Module::V).out, 3, false, g);  // ungated
  expect_stack_matches(w, 0, {Module::Q, Module::K, Module::V});
  w.at(0, Module::Up).ec = random_ec(D, module_shape(w.config, Module::Up).out, 2, false, g);
  expect_stack_matches(w, 0, {Module::Gate, Module::Up});  // ungated only: γ ≡ 1
  // Members stored differently do not stack; nor a stack over the rank limit.
  std::string why;
  EXPECT_FALSE(stack_modules(w, 0, {Module::Q, Module::K, Module::V}, 6, &why).has_value());
  EXPECT_NE(why.find("rank"), std::string::npos) << why;
  w.at(0, Module::K).quant->scheme.symmetric = true;
  EXPECT_FALSE(stack_modules(w, 0, {Module::Q, Module::K}, 64, &why).has_value());
  EXPECT_NE(why.find("scheme"), std::string::npos) << why;
  EXPECT_FALSE(stack_modules(w, 1, {Module::Q, Module::O}, 64, &why).has_value());  // inputs may differ
}
