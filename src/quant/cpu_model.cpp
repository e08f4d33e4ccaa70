#include "quant/cpu_model.h"

#include "core/error.h"
#include "model/ec_layer.h"
#include "quant/quantized_linear_layer.h"

namespace spear {

std::unique_ptr<Linear> make_cpu_linear(const ModuleWeights& mw) {
  std::unique_ptr<Linear> lin;
  if (mw.quant) lin = std::make_unique<QuantizedLinearLayer>(*mw.quant);
  else lin = make_dense_linear(mw);
  if (mw.ec) lin = std::make_unique<ECLinear>(std::move(lin), *mw.ec);
  return lin;
}

std::unique_ptr<LlamaModel> build_cpu_model(const LlamaWeights& w) { return LlamaModel::build(w, make_cpu_linear); }

}  // namespace spear
