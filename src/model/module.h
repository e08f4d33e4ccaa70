#pragma once
// The seven linear modules of a Llama decoder layer, and a table typed by them.
//
// Every place that walks "the modules of a layer" uses Module and PerModule<T>; nothing
// indexes modules by bare integers. The shape of a module is a function of the config
// alone (module_shape), and this is the only table of it.
#include <array>
#include <cstdint>
#include <string_view>

#include "io/model_config.h"

namespace spear {

// Named as in Hugging Face checkpoints (module_name).
enum class Module : uint8_t { Q, K, V, O, Gate, Up, Down };
inline constexpr int kNumModules = 7;
inline constexpr std::array<Module, kNumModules> kAllModules = {
    Module::Q, Module::K, Module::V, Module::O, Module::Gate, Module::Up, Module::Down};

std::string_view module_name(Module m);  // "self_attn.q_proj", ..., "mlp.down_proj"
bool parse_module_name(std::string_view s, Module* out);

// (out, in) of a module's weight: y (out) = W (out, in) x (in).
struct ModuleShape {
  int64_t out = 0, in = 0;
};
//   q (n_heads*head_dim, dim)   k, v (n_kv_heads*head_dim, dim)   o (dim, n_heads*head_dim)
//   gate, up (intermediate, dim)   down (dim, intermediate)
ModuleShape module_shape(const ModelConfig& c, Module m);

// The activation a module reads. Modules with the same input (Q, K, V; Gate, Up) can run as
// one GEMM over their stacked weights (model/weights.h stack_modules).
enum class ModuleInput { AttnIn = 0, AttnOut = 1, FfnIn = 2, DownIn = 3 };
inline constexpr int kNumModuleInputs = 4;
// Q/K/V -> AttnIn (the attention norm's output), O -> AttnOut, Gate/Up -> FfnIn, Down -> DownIn
ModuleInput module_input(Module m);

// One T per module of a layer, indexed by Module.
template <class T>
struct PerModule {
  std::array<T, kNumModules> items{};
  T& operator[](Module m) { return items[static_cast<size_t>(m)]; }
  const T& operator[](Module m) const { return items[static_cast<size_t>(m)]; }
  auto begin() { return items.begin(); }
  auto end() { return items.end(); }
  auto begin() const { return items.begin(); }
  auto end() const { return items.end(); }
};

// Position of (layer, module) in a flat layer-major list (artifact module tables,
// per-module results): layer * kNumModules + module.
inline int64_t module_index(int64_t layer, Module m) {
  return layer * kNumModules + static_cast<int64_t>(m);
}

}  // namespace spear
