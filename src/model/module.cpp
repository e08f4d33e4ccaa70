#include "model/module.h"

namespace spear {

namespace {
constexpr std::array<std::string_view, kNumModules> kModuleNames = {
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj",    "mlp.up_proj",      "mlp.down_proj"};
}  // namespace

std::string_view module_name(Module m) { return kModuleNames[static_cast<size_t>(m)]; }

bool parse_module_name(std::string_view s, Module* out) {
  for (Module m : kAllModules)
    if (module_name(m) == s) {
      *out = m;
      return true;
    }
  return false;
}

ModuleShape module_shape(const ModelConfig& c, Module m) {
  const int64_t D = c.hidden_size, H = c.intermediate_size;
  switch (m) {
    case Module::Q: return {c.q_dim(), D};
    case Module::K: return {c.kv_dim(), D};
    case Module::V: return {c.kv_dim(), D};
    case Module::O: return {D, c.q_dim()};
    case Module::Gate: return {H, D};
    case Module::Up: return {H, D};
    case Module::Down: return {D, H};
  }
  return {};
}

ModuleInput module_input(Module m) {
  switch (m) {
    case Module::Q: case Module::K: case Module::V: return ModuleInput::AttnIn;
    case Module::O: return ModuleInput::AttnOut;
    case Module::Gate: case Module::Up: return ModuleInput::FfnIn;
    case Module::Down: return ModuleInput::DownIn;
  }
  return ModuleInput::AttnIn;
}

}  // namespace spear
