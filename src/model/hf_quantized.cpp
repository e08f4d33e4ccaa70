#include "model/hf_quantized.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>

#include "core/error.h"
#include "io/safetensors.h"
#include "io/sha256.h"

namespace fs = std::filesystem;

namespace spear {

namespace {

constexpr int kBits = 4;
constexpr int kPack = 32 / kBits;  // codes per int32 word

inline uint32_t word(const int32_t* p, int64_t i) { return static_cast<uint32_t>(p[i]); }
inline int nibble(uint32_t w, int64_t j) { return static_cast<int>((w >> (kBits * j)) & 15u); }

// Groups of the checkpoint: G groups of `gs` consecutive inputs (gs = K for one group).
struct Groups {
  int64_t gs = 0, G = 0, spear_group = -1;
};
Groups groups_of(int64_t K, int64_t group) {
  Groups g;
  g.gs = (group <= 0 || group >= K) ? K : group;
  g.G = (K + g.gs - 1) / g.gs;
  g.spear_group = g.gs == K ? -1 : g.gs;
  return g;
}

QuantizedMatrix empty_matrix(int64_t N, int64_t K, const Groups& g) {
  QuantizedMatrix q;
  q.N = N;
  q.K = K;
  q.scheme.bits = kBits;
  q.scheme.group = g.spear_group;
  q.codes.assign(static_cast<size_t>(N * q.row_bytes()), 0);
  q.scales.assign(static_cast<size_t>(N * g.G), 0.0f);
  q.zeros.assign(static_cast<size_t>(N * g.G), 0.0f);
  return q;
}

inline void put_code(QuantizedMatrix& q, int64_t n, int64_t k, int c) {
  uint8_t& b = q.codes[static_cast<size_t>(n * q.row_bytes() + k / 2)];
  b = (k & 1) ? static_cast<uint8_t>((b & 0x0f) | (c << 4)) : static_cast<uint8_t>((b & 0xf0) | c);
}

// Scales must be positive finite (what spear serves); zeros are set by the caller.
void check_scales(const QuantizedMatrix& q, const std::string& label) {
  for (size_t i = 0; i < q.scales.size(); ++i)
    if (!std::isfinite(q.scales[i]) || q.scales[i] <= 0)
      throw Error(label + ": scale " + std::to_string(q.scales[i]) + " at (output " +
                  std::to_string(i / (q.scales.size() / q.N)) + ", group " +
                  std::to_string(i % (q.scales.size() / q.N)) +
                  ") is not a positive finite number (spear needs positive scales)");
}

void set_symmetric(QuantizedMatrix& q, bool declared) {
  const float mid = static_cast<float>(1 << (kBits - 1));
  q.scheme.symmetric =
      declared && std::all_of(q.zeros.begin(), q.zeros.end(), [&](float z) { return z == mid; });
}

// g_idx must be k / gs for every k: spear's groups are consecutive inputs.
void check_g_idx(const int32_t* g_idx, int64_t K, const Groups& g, const std::string& field) {
  if (!g_idx) return;
  for (int64_t k = 0; k < K; ++k)
    if (g_idx[k] != k / g.gs)
      throw Error(field + "[" + std::to_string(k) + "] = " + std::to_string(g_idx[k]) + ", not k / group_size = " +
                  std::to_string(k / g.gs) +
                  ": the checkpoint was quantized with act-order groups (desc_act=true / "
                  "actorder=group), a permuted g_idx that spear's layout (groups of consecutive "
                  "inputs) cannot represent; re-quantize with desc_act=false (or static_groups=true)");
}

}  // namespace

// ---- layouts ----------------------------------------------------------------------

QuantizedMatrix unpack_gptq(const int32_t* qweight, const int32_t* qzeros, const float* scales,
                            const int32_t* g_idx, int64_t N, int64_t K, int64_t group, bool v1,
                            bool symmetric, const std::string& label) {
  SPEAR_CHECK(N > 0 && K > 0 && N % kPack == 0 && K % kPack == 0,
              label + ": GPTQ needs both dimensions a multiple of 8, got (" + std::to_string(N) + ", " +
                  std::to_string(K) + ")");
  const Groups g = groups_of(K, group);
  check_g_idx(g_idx, K, g, label + ".g_idx");
  QuantizedMatrix q = empty_matrix(N, K, g);
  for (int64_t r = 0; r < K / kPack; ++r)
    for (int64_t n = 0; n < N; ++n) {
      const uint32_t w = word(qweight, r * N + n);
      for (int64_t j = 0; j < kPack; ++j) put_code(q, n, r * kPack + j, nibble(w, j));
    }
  for (int64_t gi = 0; gi < g.G; ++gi)
    for (int64_t n = 0; n < N; ++n) {
      const int z = nibble(word(qzeros, gi * (N / kPack) + n / kPack), n % kPack) + (v1 ? 1 : 0);
      if (z > 15)
        throw Error(label + ".qzeros: output " + std::to_string(n) + ", group " + std::to_string(gi) +
                    " stores 15, i.e. zero point 16 in a GPTQ v1 checkpoint (stored zero + 1), outside "
                    "the 4-bit codes 0..15 spear's layout holds");
      q.zeros[n * g.G + gi] = static_cast<float>(z);
      q.scales[n * g.G + gi] = scales[gi * N + n];
    }
  check_scales(q, label + ".scales");
  set_symmetric(q, symmetric);
  return q;
}

QuantizedMatrix unpack_awq(const int32_t* qweight, const int32_t* qzeros, const float* scales,
                           int64_t N, int64_t K, int64_t group, const std::string& label) {
  SPEAR_CHECK(N > 0 && K > 0 && N % kPack == 0,
              label + ": AWQ needs the output size a multiple of 8, got " + std::to_string(N));
  static constexpr int kPos[kPack] = {0, 4, 1, 5, 2, 6, 3, 7};  // nibble holding output n%8
  const Groups g = groups_of(K, group);
  QuantizedMatrix q = empty_matrix(N, K, g);
  const int64_t W = N / kPack;
  for (int64_t k = 0; k < K; ++k)
    for (int64_t c = 0; c < W; ++c) {
      const uint32_t w = word(qweight, k * W + c);
      for (int64_t j = 0; j < kPack; ++j) put_code(q, c * kPack + j, k, nibble(w, kPos[j]));
    }
  for (int64_t gi = 0; gi < g.G; ++gi)
    for (int64_t n = 0; n < N; ++n) {
      q.zeros[n * g.G + gi] = static_cast<float>(nibble(word(qzeros, gi * W + n / kPack), kPos[n % kPack]));
      q.scales[n * g.G + gi] = scales[gi * N + n];
    }
  check_scales(q, label + ".scales");
  set_symmetric(q, false);
  return q;
}

QuantizedMatrix unpack_compressed_tensors(const int32_t* packed, const float* scales,
                                          const int32_t* zero_packed, const int32_t* g_idx,
                                          int64_t N, int64_t K, int64_t group, bool symmetric,
                                          const std::string& label) {
  SPEAR_CHECK(N > 0 && K > 0, label + ": empty weight");
  const Groups g = groups_of(K, group);
  check_g_idx(g_idx, K, g, label + ".weight_g_idx");
  QuantizedMatrix q = empty_matrix(N, K, g);
  const int64_t W = (K + kPack - 1) / kPack;
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < W; ++c) {
      const uint32_t w = word(packed, n * W + c);
      for (int64_t j = 0; j < kPack && c * kPack + j < K; ++j) put_code(q, n, c * kPack + j, nibble(w, j));
    }
  for (int64_t n = 0; n < N; ++n)
    for (int64_t gi = 0; gi < g.G; ++gi) {
      // The zero point is stored as zp + 8 (zp signed, 0 when symmetric): spear's zero.
      const int z = zero_packed ? nibble(word(zero_packed, (n / kPack) * g.G + gi), n % kPack) : 8;
      q.zeros[n * g.G + gi] = static_cast<float>(z);
      q.scales[n * g.G + gi] = scales[n * g.G + gi];
    }
  check_scales(q, label + ".weight_scale");
  set_symmetric(q, symmetric);
  return q;
}

GptqPacked pack_gptq(const QuantizedMatrix& q, bool v1, const std::string& label) {
  SPEAR_CHECK(q.scheme.bits == kBits, label + ": GPTQ export writes 4-bit modules only (this one has " +
                                          std::to_string(q.scheme.bits) + " bits)");
  const int64_t N = q.N, K = q.K;
  SPEAR_CHECK(N % kPack == 0 && K % kPack == 0, label + ": GPTQ needs both dimensions a multiple of 8, got (" +
                                                    std::to_string(N) + ", " + std::to_string(K) + ")");
  const int64_t gs = q.scheme.group_size(K), G = q.scheme.num_groups(K);
  GptqPacked p;
  p.groups = G;
  p.qweight.assign(static_cast<size_t>(K / kPack * N), 0);
  p.qzeros.assign(static_cast<size_t>(G * (N / kPack)), 0);
  p.scales.assign(static_cast<size_t>(G * N), 0.0f);
  p.g_idx.resize(static_cast<size_t>(K));
  for (int64_t k = 0; k < K; ++k) p.g_idx[k] = static_cast<int32_t>(k / gs);
  for (int64_t r = 0; r < K / kPack; ++r)
    for (int64_t n = 0; n < N; ++n) {
      uint32_t w = 0;
      for (int64_t j = 0; j < kPack; ++j) w |= static_cast<uint32_t>(q.code(n, r * kPack + j)) << (kBits * j);
      p.qweight[r * N + n] = static_cast<int32_t>(w);
    }
  for (int64_t gi = 0; gi < G; ++gi)
    for (int64_t n = 0; n < N; ++n) {
      const int z = static_cast<int>(q.zeros[n * G + gi]) - (v1 ? 1 : 0);
      SPEAR_CHECK(z >= 0 && z <= 15, label + ": zero point " + std::to_string(z + (v1 ? 1 : 0)) +
                                         " cannot be stored in a GPTQ v1 checkpoint (zero - 1 must be in 0..15)");
      uint32_t& w = reinterpret_cast<uint32_t&>(p.qzeros[gi * (N / kPack) + n / kPack]);
      w |= static_cast<uint32_t>(z) << (kBits * (n % kPack));
      p.scales[gi * N + n] = q.scales[n * G + gi];
    }
  return p;
}

// ---- directories --------------------------------------------------------------------

namespace {

std::string read_text(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  SPEAR_CHECK(in.good(), "cannot open " + p.string());
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

nlohmann::json parse_json_file(const fs::path& p) {
  try {
    return nlohmann::json::parse(read_text(p));
  } catch (const nlohmann::json::exception& e) {
    throw Error(p.string() + ": not valid JSON: " + e.what());
  }
}

std::string lower(std::string s) {
  for (char& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

std::string module_prefix(int64_t l, Module m) {
  return "model.layers." + std::to_string(l) + "." + std::string(module_name(m));
}

// Typed access to the checkpoint's tensors with errors naming the directory and tensor.
struct Reader {
  std::string dir, method;
  std::shared_ptr<TensorStore> store;
  std::set<std::string> used;

  [[noreturn]] void fail(const std::string& why) const {
    throw Error(dir + " (" + method + " checkpoint): " + why);
  }
  const TensorView* find(const std::string& name) {
    if (!store->has(name)) return nullptr;
    used.insert(name);
    return &store->get(name);
  }
  const TensorView& need(const std::string& name) {
    const TensorView* t = find(name);
    if (!t) fail("missing tensor '" + name + "'");
    return *t;
  }
  void expect_shape(const TensorView& t, const std::vector<int64_t>& shape) const {
    if (t.shape != shape)
      fail("tensor '" + t.name + "' has shape " + t.shape_str() + ", expected " + shape_str(shape));
  }
  std::vector<int32_t> ints(const std::string& name, const std::vector<int64_t>& shape) {
    const TensorView& t = need(name);
    if (t.dtype != DType::I32)
      fail("tensor '" + name + "' has dtype " + std::string(dtype_name(t.dtype)) + ", expected I32");
    expect_shape(t, shape);
    std::vector<int32_t> v(static_cast<size_t>(t.numel()));
    std::memcpy(v.data(), t.data, v.size() * 4);
    return v;
  }
  std::vector<float> floats(const std::string& name, const std::vector<int64_t>& shape) {
    const TensorView& t = need(name);
    if (t.dtype != DType::F16 && t.dtype != DType::BF16 && t.dtype != DType::F32)
      fail("tensor '" + name + "' has dtype " + std::string(dtype_name(t.dtype)) + ", expected F16, BF16 or F32");
    expect_shape(t, shape);
    return to_f32(t);
  }
  // Drops the pages of tensors whose bytes were copied out (as read_spear does), so that host
  // memory holds the converted codes, not also the packed words.
  void release_used_quantized() {
    for (const std::string& n : used)
      if (!released.count(n) && (n.find(".q") != std::string::npos || n.find(".weight_") != std::string::npos ||
                                 n.ends_with(".scales") || n.ends_with(".g_idx"))) {
        for (const auto& f : store->files())
          if (const TensorView* t = f->find(n)) f->release(*t);
        released.insert(n);
      }
  }
  std::set<std::string> released;
  // A bias is accepted only when it is all zeros (Llama's linear layers have none).
  void zero_bias(const std::string& prefix) {
    const TensorView* t = find(prefix + ".bias");
    if (!t) return;
    if (t->dtype != DType::F16 && t->dtype != DType::BF16 && t->dtype != DType::F32)
      fail("tensor '" + t->name + "' has dtype " + std::string(dtype_name(t->dtype)));
    for (float v : to_f32(*t))
      if (v != 0.0f) fail("tensor '" + t->name + "' is a non-zero bias; spear's Llama layers have no bias");
  }
};

int get_int(const nlohmann::json& q, std::initializer_list<const char*> keys, int dflt, bool* found = nullptr) {
  for (const char* k : keys)
    if (q.contains(k) && !q[k].is_null()) {
      if (!q[k].is_number_integer()) throw Error(std::string("quantization_config.") + k + " is not an integer");
      if (found) *found = true;
      return q[k].get<int>();
    }
  if (found) *found = false;
  return dflt;
}

bool get_bool(const nlohmann::json& q, const char* key, bool dflt) {
  if (!q.contains(key) || q[key].is_null()) return dflt;
  if (!q[key].is_boolean()) throw Error(std::string("quantization_config.") + key + " is not true/false");
  return q[key].get<bool>();
}

std::string get_str(const nlohmann::json& q, const char* key, const std::string& dflt) {
  if (!q.contains(key) || q[key].is_null()) return dflt;
  if (!q[key].is_string()) throw Error(std::string("quantization_config.") + key + " is not a string");
  return q[key].get<std::string>();
}

void check_bits(int bits, const std::string& where) {
  if (bits != kBits)
    throw Error(where + " = " + std::to_string(bits) +
                ": spear loads 4-bit checkpoints only (its quantized layout and kernels are W4)");
}

}  // namespace

std::optional<nlohmann::json> hf_quantization_config(const std::string& dir) {
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) return std::nullopt;
  const fs::path cfg = fs::path(dir) / "config.json";
  if (fs::is_regular_file(cfg)) {
    // An unreadable config.json is left to the full-precision loader's error.
    const std::string text = read_text(cfg);
    const nlohmann::json j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
    if (!j.is_discarded() && j.is_object() && j.contains("quantization_config") && !j["quantization_config"].is_null()) {
      nlohmann::json q = j["quantization_config"];
      if (!q.is_object()) throw Error(cfg.string() + ": quantization_config is not an object");
      if (!q.contains("quant_method"))
        throw Error(cfg.string() + ": quantization_config has no quant_method");
      return q;
    }
  }
  // Older tools wrote the settings beside config.json only.
  if (fs::is_regular_file(fs::path(dir) / "quantize_config.json")) {
    nlohmann::json q = parse_json_file(fs::path(dir) / "quantize_config.json");
    if (!q.is_object()) throw Error(dir + "/quantize_config.json is not a JSON object");
    if (!q.contains("quant_method")) q["quant_method"] = "gptq";
    return q;
  }
  if (fs::is_regular_file(fs::path(dir) / "quant_config.json")) {
    nlohmann::json q = parse_json_file(fs::path(dir) / "quant_config.json");
    if (!q.is_object()) throw Error(dir + "/quant_config.json is not a JSON object");
    if (!q.contains("quant_method")) q["quant_method"] = "awq";
    return q;
  }
  return std::nullopt;
}

SpearArtifact artifact_from_hf_quantized(const std::string& dir) {
  std::optional<nlohmann::json> qc_opt = hf_quantization_config(dir);
  SPEAR_CHECK(qc_opt.has_value(), dir + ": not a quantized checkpoint (config.json has no quantization_config)");
  const nlohmann::json& qc = *qc_opt;
  if (!qc["quant_method"].is_string()) throw Error(dir + ": quantization_config.quant_method is not a string");
  const std::string method = lower(qc["quant_method"].get<std::string>());
  auto refuse = [&](const std::string& why) -> void { throw Error(dir + " (" + method + " checkpoint): " + why); };
  if (method != "gptq" && method != "awq" && method != "compressed-tensors")
    throw Error(dir + ": quantization_config.quant_method '" + method +
                "' is not supported (spear loads gptq, awq and compressed-tensors pack-quantized 4-bit checkpoints)");

  // ---- settings ----
  nlohmann::json imported{{"format", method}, {"quantization_config", qc}};
  int64_t group = -1;
  bool sym = false, v1 = true;
  std::string ct_format;
  try {
    if (method == "gptq") {
      check_bits(get_int(qc, {"bits"}, 4), "quantization_config.bits");
      group = get_int(qc, {"group_size"}, -1);
      sym = get_bool(qc, "sym", true);
      std::string fmt = lower(get_str(qc, "checkpoint_format", get_str(qc, "format", "gptq")));
      if (get_bool(qc, "is_marlin_format", false)) fmt = "marlin";
      if (fmt == "gptq_v2") v1 = false;
      else if (fmt != "gptq")
        refuse("quantization_config.checkpoint_format '" + fmt + "' is not supported (gptq or gptq_v2)");
      const std::string pack = lower(get_str(qc, "pack_dtype", "int32"));
      if (pack != "int32" && pack != "torch.int32")
        refuse("quantization_config.pack_dtype '" + pack + "' is not supported (int32 words only)");
      if (get_bool(qc, "lm_head", false))
        refuse("quantization_config.lm_head = true (a quantized lm_head): spear keeps the head unquantized");
      if (qc.contains("dynamic") && !qc["dynamic"].is_null() && !qc["dynamic"].empty())
        refuse("quantization_config.dynamic (per-module overrides) is not supported");
      imported["checkpoint_format"] = v1 ? "gptq" : "gptq_v2";
      imported["desc_act"] = get_bool(qc, "desc_act", false);
    } else if (method == "awq") {
      check_bits(get_int(qc, {"bits", "w_bit"}, 4), "quantization_config.bits");
      group = get_int(qc, {"group_size", "q_group_size"}, 128);
      const std::string ver = lower(get_str(qc, "version", "gemm"));
      if (ver != "gemm")
        refuse("quantization_config.version '" + ver + "' is not supported (spear reads AWQ's gemm layout)");
      if (!get_bool(qc, "zero_point", true))
        refuse("quantization_config.zero_point = false is not supported (AWQ gemm checkpoints have zero points)");
    } else {
      const std::string fmt = lower(get_str(qc, "format", ""));
      const nlohmann::json groups = qc.value("config_groups", nlohmann::json());
      if (!groups.is_object() || groups.empty()) refuse("quantization_config.config_groups is missing or empty");
      if (qc.contains("sparsity_config") && !qc["sparsity_config"].is_null() && !qc["sparsity_config"].empty()) {
        const std::string sf = lower(qc["sparsity_config"].value("format", std::string("dense")));
        if (sf != "dense") refuse("quantization_config.sparsity_config (format '" + sf + "') is not supported");
      }
      if (qc.contains("transform_config") && !qc["transform_config"].is_null() && !qc["transform_config"].empty())
        refuse("quantization_config.transform_config (rotations) is not supported");
      const std::string status = lower(get_str(qc, "quantization_status", "compressed"));
      if (status != "compressed")
        refuse("quantization_config.quantization_status '" + status + "': spear reads compressed checkpoints only");
      const nlohmann::json* first = nullptr;
      for (auto it = groups.begin(); it != groups.end(); ++it) {
        const nlohmann::json& g = it.value();
        const std::string gname = "quantization_config.config_groups." + it.key();
        if (!g.is_object()) refuse(gname + " is not an object");
        const std::string gf = lower(g.value("format", fmt));
        if (gf != "pack-quantized")
          refuse(gname + ".format '" + (gf.empty() ? std::string("(none)") : gf) +
                 "' is not supported (spear reads pack-quantized int4 weights)");
        if (g.contains("input_activations") && !g["input_activations"].is_null())
          refuse(gname + ".input_activations is set: activation quantization is not supported (weight-only W4A16)");
        if (g.contains("output_activations") && !g["output_activations"].is_null())
          refuse(gname + ".output_activations is set: not supported");
        if (!g.contains("weights") || !g["weights"].is_object()) refuse(gname + ".weights is missing");
        const nlohmann::json& w = g["weights"];
        if (first && *first != w)
          refuse("config_groups with different weight schemes (" + gname + ") are not supported");
        first = &w;
      }
      const nlohmann::json& w = *first;
      check_bits(get_int(w, {"num_bits"}, 8), "quantization_config.config_groups.*.weights.num_bits");
      const std::string type = lower(get_str(w, "type", "int"));
      if (type != "int") refuse("weights.type '" + type + "' is not supported (int only)");
      if (get_bool(w, "dynamic", false)) refuse("weights.dynamic = true is not supported");
      sym = get_bool(w, "symmetric", true);
      const std::string strategy = lower(get_str(w, "strategy", "tensor"));
      if (strategy == "group") {
        group = get_int(w, {"group_size"}, -1);
        if (group <= 0) refuse("weights.strategy 'group' without a positive group_size");
      } else if (strategy == "channel") {
        group = -1;
      } else {
        refuse("weights.strategy '" + strategy + "' is not supported (group or channel)");
      }
      imported["actorder"] = w.contains("actorder") ? w["actorder"] : nlohmann::json();
      ct_format = "pack-quantized";
    }
  } catch (const nlohmann::json::exception& e) {
    refuse(std::string("bad quantization_config: ") + e.what());
  } catch (const Error& e) {
    const std::string m = e.what();
    if (m.rfind(dir, 0) == 0) throw;
    refuse(m);
  }

  // ---- the artifact ----
  SpearArtifact a;
  a.config_json = read_text(fs::path(dir) / "config.json");
  for (const auto& [file, text] : {std::pair<const char*, std::string*>{"tokenizer.json", &a.tokenizer_json},
                                   {"tokenizer_config.json", &a.tokenizer_config_json},
                                   {"generation_config.json", &a.generation_config_json}})
    if (fs::is_regular_file(fs::path(dir) / file)) *text = read_text(fs::path(dir) / file);
  LlamaWeights& w = a.weights;
  try {
    w.config = ModelConfig::from_json_text(a.config_json);
  } catch (const Error& e) {
    throw Error(dir + "/config.json: " + e.what());
  }
  const ModelConfig& cfg = w.config;
  Reader rd{dir, method, std::make_shared<TensorStore>(TensorStore::open(dir)), {}};
  w.layers.resize(cfg.num_layers);
  for (const auto& t : unquantized_tensors(w)) {
    const TensorView& v = rd.need(t.name);
    rd.expect_shape(v, t.shape);
    *t.tensor = WeightTensor::view(v.dtype, v.shape, v.data, rd.store);
  }
  if (cfg.tie_word_embeddings) rd.used.insert("lm_head.weight");
  for (const char* head : {"lm_head.qweight", "lm_head.weight_packed"})
    if (rd.store->has(head)) rd.fail(std::string("tensor '") + head + "': a quantized lm_head is not supported");

  for (int64_t l = 0; l < cfg.num_layers; ++l)
    for (Module m : kAllModules) {
      const std::string p = module_prefix(l, m);
      const ModuleShape s = module_shape(cfg, m);
      const int64_t N = s.out, K = s.in;
      if (rd.store->has(p + ".weight"))
        rd.fail("module " + p + " is stored unquantized (" + p +
                ".weight; modules_to_not_convert / ignore?): spear needs every decoder linear layer quantized");
      rd.zero_bias(p);
      const Groups g = groups_of(K, group);
      QuantizedMatrix q;
      if (method == "gptq") {
        if (N % kPack || K % kPack) rd.fail(p + ": shape (" + std::to_string(N) + ", " + std::to_string(K) + ") is not a multiple of 8");
        const auto qweight = rd.ints(p + ".qweight", {K / kPack, N});
        const auto qzeros = rd.ints(p + ".qzeros", {g.G, N / kPack});
        const auto scales = rd.floats(p + ".scales", {g.G, N});
        std::vector<int32_t> gidx;
        if (rd.store->has(p + ".g_idx")) gidx = rd.ints(p + ".g_idx", {K});
        q = unpack_gptq(qweight.data(), qzeros.data(), scales.data(), gidx.empty() ? nullptr : gidx.data(), N, K,
                        group, v1, sym, dir + ": " + p);
      } else if (method == "awq") {
        if (N % kPack) rd.fail(p + ": output size " + std::to_string(N) + " is not a multiple of 8");
        if (K % g.gs) rd.fail(p + ": input size " + std::to_string(K) + " is not a multiple of group_size " + std::to_string(g.gs));
        const auto qweight = rd.ints(p + ".qweight", {K, N / kPack});
        const auto qzeros = rd.ints(p + ".qzeros", {g.G, N / kPack});
        const auto scales = rd.floats(p + ".scales", {g.G, N});
        q = unpack_awq(qweight.data(), qzeros.data(), scales.data(), N, K, group, dir + ": " + p);
      } else {
        const TensorView& ws = rd.need(p + ".weight_shape");
        if ((ws.dtype != DType::I32 && ws.dtype != DType::I64) || ws.shape != std::vector<int64_t>{2})
          rd.fail("tensor '" + ws.name + "' must be I32 or I64 of shape (2)");
        int64_t dims[2];
        for (int i = 0; i < 2; ++i) {
          if (ws.dtype == DType::I64) std::memcpy(&dims[i], ws.data + 8 * i, 8);
          else {
            int32_t v;
            std::memcpy(&v, ws.data + 4 * i, 4);
            dims[i] = v;
          }
        }
        if (dims[0] != N || dims[1] != K)
          rd.fail("tensor '" + ws.name + "' says (" + std::to_string(dims[0]) + ", " + std::to_string(dims[1]) +
                  "), the config implies (" + std::to_string(N) + ", " + std::to_string(K) + ")");
        const auto packed = rd.ints(p + ".weight_packed", {N, (K + kPack - 1) / kPack});
        const auto scales = rd.floats(p + ".weight_scale", {N, g.G});
        std::vector<int32_t> zp;
        if (const TensorView* z = rd.find(p + ".weight_zero_point")) {
          if (sym) {
            // Written by some versions for symmetric schemes: must be all zeros.
            std::vector<float> zf;
            if (z->dtype == DType::I8 || z->dtype == DType::I32) {
              for (int64_t i = 0; i < z->numel(); ++i) {
                int32_t v = 0;
                if (z->dtype == DType::I8) v = static_cast<int8_t>(z->data[i]);
                else std::memcpy(&v, z->data + 4 * i, 4);
                if (v != 0) rd.fail("tensor '" + z->name + "' is not zero in a symmetric scheme");
              }
            } else if (z->dtype == DType::F16 || z->dtype == DType::BF16 || z->dtype == DType::F32) {
              for (float v : to_f32(*z))
                if (v != 0.0f) rd.fail("tensor '" + z->name + "' is not zero in a symmetric scheme");
            } else {
              rd.fail("tensor '" + z->name + "' has dtype " + std::string(dtype_name(z->dtype)));
            }
          } else if (z->dtype == DType::I32) {
            zp = rd.ints(p + ".weight_zero_point", {(N + kPack - 1) / kPack, g.G});
          } else if (z->dtype == DType::I8) {
            // Older releases: one signed zero point per (n, g), unpacked. Repack as packed.
            rd.expect_shape(*z, {N, g.G});
            zp.assign(static_cast<size_t>((N + kPack - 1) / kPack * g.G), 0);
            for (int64_t n = 0; n < N; ++n)
              for (int64_t gi = 0; gi < g.G; ++gi) {
                const int v = static_cast<int8_t>(z->data[n * g.G + gi]) + 8;
                if (v < 0 || v > 15) rd.fail("tensor '" + z->name + "': zero point outside the int4 range");
                reinterpret_cast<uint32_t&>(zp[(n / kPack) * g.G + gi]) |= static_cast<uint32_t>(v) << (kBits * (n % kPack));
              }
          } else {
            rd.fail("tensor '" + z->name + "' has dtype " + std::string(dtype_name(z->dtype)) + ", expected I32 (packed)");
          }
        } else if (!sym) {
          rd.fail("missing tensor '" + p + ".weight_zero_point' (an asymmetric scheme)");
        }
        std::vector<int32_t> gidx;
        if (rd.store->has(p + ".weight_g_idx")) gidx = rd.ints(p + ".weight_g_idx", {K});
        q = unpack_compressed_tensors(packed.data(), scales.data(), zp.empty() ? nullptr : zp.data(),
                                      gidx.empty() ? nullptr : gidx.data(), N, K, group, sym, dir + ": " + p);
      }
      a.at(l, m).quant = std::move(q);
      rd.release_used_quantized();
    }
  for (const std::string& n : rd.store->names())
    if (!rd.used.count(n) && n.find("rotary_emb") == std::string::npos)
      std::fprintf(stderr, "spear: warning: %s: ignoring unexpected tensor '%s'\n", dir.c_str(), n.c_str());

  const QuantizedMatrix& q0 = *a.at(0, Module::Q).quant;
  bool all_sym = true;
  for (const LlamaLayerWeights& L : w.layers)
    for (const ModuleWeights& mw : L.modules) all_sym = all_sym && mw.quant->scheme.symmetric;
  if (sym && !all_sym)
    std::fprintf(stderr, "spear: note: %s declares a symmetric scheme but some zero points are not 8: "
                         "those modules load as asymmetric (exact)\n", dir.c_str());
  a.meta["source_model"] = fs::absolute(dir).lexically_normal().string();
  a.meta["spear_version"] = SPEAR_VERSION;
  a.meta["imported"] = imported;
  a.meta["quantizer"] = {{"method", method},
                         {"bits", kBits},
                         {"group", q0.scheme.group},
                         {"symmetric", all_sym},
                         {"scheme", q0.scheme.name()},
                         {"imported_from", a.meta["source_model"]}};
  if (!ct_format.empty()) a.meta["imported"]["ct_format"] = ct_format;
  validate_artifact(a, dir);
  return a;
}

void check_base_matches_model(const SpearArtifact& quantized, const std::string& dir, const std::string& who) {
  if (!quantized.meta.contains("imported")) {
    const std::string want = quantized.meta.value("source_model_sha256", std::string());
    const std::string have = model_dir_hash(dir);
    SPEAR_CHECK(want == have, who + ": " + dir + " is not the model the artifact was quantized from "
                              "(source_model_sha256 " + want.substr(0, 12) + "..., directory " +
                                  have.substr(0, 12) + "...)");
    return;
  }
  const ModelConfig fp = ModelConfig::load((fs::path(dir) / "config.json").string());
  const ModelConfig& qc = quantized.config();
  auto same = [&](const char* what, int64_t a, int64_t b) {
    if (a != b)
      throw Error(who + ": " + dir + " does not have the architecture of the quantized checkpoint (" + what + " " +
                  std::to_string(a) + " vs " + std::to_string(b) + ")");
  };
  same("vocab_size", fp.vocab_size, qc.vocab_size);
  same("hidden_size", fp.hidden_size, qc.hidden_size);
  same("intermediate_size", fp.intermediate_size, qc.intermediate_size);
  same("num_hidden_layers", fp.num_layers, qc.num_layers);
  same("num_attention_heads", fp.num_heads, qc.num_heads);
  same("num_key_value_heads", fp.num_kv_heads, qc.num_kv_heads);
  same("head_dim", fp.head_dim, qc.head_dim);
  same("tie_word_embeddings", fp.tie_word_embeddings, qc.tie_word_embeddings);
  std::fprintf(stderr, "%s: note: the quantized base was imported from a %s checkpoint; that it was made from %s "
                       "cannot be verified (only the architecture matches)\n",
               who.c_str(), quantized.meta["imported"].value("format", std::string("?")).c_str(), dir.c_str());
}

SpearArtifact load_quantized_base(const std::string& path) {
  if (is_spear_path(path)) return read_spear(path);
  std::error_code ec;
  SPEAR_CHECK(fs::is_directory(path, ec), "quantized model not found: " + path +
                                              " (expected a .spear file or a GPTQ/AWQ/compressed-tensors directory)");
  if (!hf_quantization_config(path))
    throw Error(path + " is a full-precision checkpoint (its config.json has no quantization_config): "
                       "quantize it first (`spear quantize --model " + path + " --out m.spear`)");
  return artifact_from_hf_quantized(path);
}

}  // namespace spear
