#include "io/model_config.h"

#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "core/error.h"

namespace spear {
namespace {

using json = nlohmann::json;

// Sizes beyond these are not a Llama we can serve; refusing them early keeps a
// hostile config.json from driving huge allocations later.
constexpr int64_t kMaxDim = 1 << 20;
constexpr int64_t kMaxVocab = 1 << 24;
constexpr int64_t kMaxLayers = 1024;

int64_t get_int(const json& j, const char* key, int64_t lo, int64_t hi, bool required,
                int64_t fallback = 0) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) {
    SPEAR_CHECK(!required, std::string("config.json: missing field '") + key + "'");
    return fallback;
  }
  SPEAR_CHECK(it->is_number_integer() || it->is_number_unsigned(),
              std::string("config.json: field '") + key + "' must be an integer");
  int64_t v = it->is_number_unsigned() && it->get<uint64_t>() > static_cast<uint64_t>(INT64_MAX)
                  ? INT64_MAX
                  : it->get<int64_t>();
  SPEAR_CHECK(v >= lo && v <= hi, std::string("config.json: field '") + key + "' = " +
                                      std::to_string(v) + " is outside [" + std::to_string(lo) +
                                      ", " + std::to_string(hi) + "]");
  return v;
}

double get_num(const json& j, const char* key, double fallback) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return fallback;
  SPEAR_CHECK(it->is_number(), std::string("config.json: field '") + key + "' must be a number");
  return it->get<double>();
}

RopeConfig parse_rope(const json& j) {
  RopeConfig rope;
  // transformers 5: rope_parameters holds theta and the scaling; transformers 4:
  // rope_theta at top level and an optional rope_scaling object.
  const json* scaling = nullptr;
  if (auto it = j.find("rope_parameters"); it != j.end() && !it->is_null()) {
    SPEAR_CHECK(it->is_object(), "config.json: 'rope_parameters' must be an object");
    scaling = &*it;
    rope.theta = get_num(*it, "rope_theta", get_num(j, "rope_theta", 10000.0));
  } else {
    rope.theta = get_num(j, "rope_theta", 10000.0);
    if (auto s = j.find("rope_scaling"); s != j.end() && !s->is_null()) {
      SPEAR_CHECK(s->is_object(), "config.json: 'rope_scaling' must be an object or null");
      scaling = &*s;
    }
  }
  SPEAR_CHECK(rope.theta > 0 && rope.theta < 1e12, "config.json: rope_theta must be positive");
  if (!scaling) return rope;
  std::string type = "default";
  for (const char* key : {"rope_type", "type"}) {
    if (auto t = scaling->find(key); t != scaling->end() && !t->is_null()) {
      SPEAR_CHECK(t->is_string(), std::string("config.json: rope '") + key + "' must be a string");
      type = t->get<std::string>();
      break;
    }
  }
  if (type == "default") {
    rope.type = RopeConfig::Type::Default;
  } else if (type == "linear") {
    rope.type = RopeConfig::Type::Linear;
    rope.factor = get_num(*scaling, "factor", 1.0);
  } else if (type == "llama3") {
    rope.type = RopeConfig::Type::Llama3;
    rope.factor = get_num(*scaling, "factor", 8.0);
    rope.low_freq_factor = get_num(*scaling, "low_freq_factor", 1.0);
    rope.high_freq_factor = get_num(*scaling, "high_freq_factor", 4.0);
    rope.original_max_position_embeddings =
        get_int(*scaling, "original_max_position_embeddings", 1, kMaxDim * 64, false, 8192);
    SPEAR_CHECK(rope.high_freq_factor > rope.low_freq_factor,
                "config.json: llama3 rope needs high_freq_factor > low_freq_factor");
  } else {
    throw Error("config.json: unsupported rope type '" + type +
                "' (supported: default, linear, llama3)");
  }
  SPEAR_CHECK(rope.factor > 0 && rope.factor < 1e6, "config.json: rope factor must be positive");
  return rope;
}

}  // namespace

int64_t ModelConfig::num_parameters() const {
  int64_t per_layer = hidden_size * q_dim() + 2 * hidden_size * kv_dim() + q_dim() * hidden_size +
                      3 * hidden_size * intermediate_size + 2 * hidden_size;
  int64_t n = vocab_size * hidden_size + num_layers * per_layer + hidden_size;
  if (!tie_word_embeddings) n += vocab_size * hidden_size;
  return n;
}

ModelConfig ModelConfig::from_json(const json& j) {
  SPEAR_CHECK(j.is_object(), "config.json: top level must be a JSON object");
  ModelConfig c;
  if (auto a = j.find("architectures"); a != j.end() && !a->is_null()) {
    SPEAR_CHECK(a->is_array() && !a->empty() && (*a)[0].is_string(),
                "config.json: 'architectures' must be a non-empty list of strings");
    c.architecture = (*a)[0].get<std::string>();
  }
  std::string model_type = "llama";
  if (auto m = j.find("model_type"); m != j.end() && m->is_string()) model_type = *m;
  SPEAR_CHECK(c.architecture == "LlamaForCausalLM" && model_type == "llama",
              "config.json: unsupported architecture '" + c.architecture + "' (model_type '" +
                  model_type + "'); spear runs LlamaForCausalLM");
  for (const char* flag : {"attention_bias", "mlp_bias"}) {
    auto it = j.find(flag);
    SPEAR_CHECK(it == j.end() || it->is_null() || (it->is_boolean() && !it->get<bool>()),
                std::string("config.json: '") + flag + "' = true is not supported");
  }
  if (auto act = j.find("hidden_act"); act != j.end() && !act->is_null())
    SPEAR_CHECK(act->is_string() && act->get<std::string>() == "silu",
                "config.json: only hidden_act 'silu' (SwiGLU) is supported");

  c.vocab_size = get_int(j, "vocab_size", 1, kMaxVocab, true);
  c.hidden_size = get_int(j, "hidden_size", 1, kMaxDim, true);
  c.intermediate_size = get_int(j, "intermediate_size", 1, kMaxDim * 8, true);
  c.num_layers = get_int(j, "num_hidden_layers", 1, kMaxLayers, true);
  c.num_heads = get_int(j, "num_attention_heads", 1, 4096, true);
  c.num_kv_heads = get_int(j, "num_key_value_heads", 1, 4096, false, c.num_heads);
  SPEAR_CHECK(c.num_heads % c.num_kv_heads == 0,
              "config.json: num_attention_heads (" + std::to_string(c.num_heads) +
                  ") must be a multiple of num_key_value_heads (" +
                  std::to_string(c.num_kv_heads) + ")");
  SPEAR_CHECK(c.hidden_size % c.num_heads == 0 || j.contains("head_dim"),
              "config.json: hidden_size is not divisible by num_attention_heads and no head_dim");
  c.head_dim = get_int(j, "head_dim", 2, 4096, false, c.hidden_size / c.num_heads);
  SPEAR_CHECK(c.head_dim % 2 == 0, "config.json: head_dim must be even for RoPE");
  c.max_position_embeddings = get_int(j, "max_position_embeddings", 1, 1 << 24, false, 2048);
  c.rms_norm_eps = get_num(j, "rms_norm_eps", 1e-6);
  SPEAR_CHECK(c.rms_norm_eps > 0 && c.rms_norm_eps < 1, "config.json: rms_norm_eps out of range");
  c.rope = parse_rope(j);
  if (auto t = j.find("tie_word_embeddings"); t != j.end() && !t->is_null()) {
    SPEAR_CHECK(t->is_boolean(), "config.json: 'tie_word_embeddings' must be true or false");
    c.tie_word_embeddings = t->get<bool>();
  }
  c.bos_token_id = static_cast<int32_t>(get_int(j, "bos_token_id", -1, c.vocab_size - 1, false, -1));
  if (auto e = j.find("eos_token_id"); e != j.end() && !e->is_null()) {
    auto add = [&](const json& v) {
      SPEAR_CHECK(v.is_number_integer() && v.get<int64_t>() >= 0 && v.get<int64_t>() < c.vocab_size,
                  "config.json: eos_token_id must be a token id or a list of them");
      c.eos_token_ids.push_back(static_cast<int32_t>(v.get<int64_t>()));
    };
    if (e->is_array()) {
      for (const auto& v : *e) add(v);
    } else {
      add(*e);
    }
  }
  for (const char* key : {"dtype", "torch_dtype"}) {
    if (auto d = j.find(key); d != j.end() && d->is_string()) {
      c.dtype = *d;
      break;
    }
  }
  return c;
}

ModelConfig ModelConfig::from_json_text(std::string_view text) {
  json j = json::parse(text.begin(), text.end(), nullptr, /*allow_exceptions=*/false);
  SPEAR_CHECK(!j.is_discarded(), "config.json: not valid JSON");
  return from_json(j);
}

ModelConfig ModelConfig::load(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  SPEAR_CHECK(in.good(), "cannot open " + path);
  std::stringstream ss;
  ss << in.rdbuf();
  try {
    return from_json_text(ss.str());
  } catch (const Error& e) {
    throw Error(path + ": " + e.what());
  }
}

json ModelConfig::to_json() const {
  json j;
  j["architectures"] = {architecture};
  j["model_type"] = "llama";
  j["vocab_size"] = vocab_size;
  j["hidden_size"] = hidden_size;
  j["intermediate_size"] = intermediate_size;
  j["num_hidden_layers"] = num_layers;
  j["num_attention_heads"] = num_heads;
  j["num_key_value_heads"] = num_kv_heads;
  j["head_dim"] = head_dim;
  j["max_position_embeddings"] = max_position_embeddings;
  j["rms_norm_eps"] = rms_norm_eps;
  json rp;
  rp["rope_theta"] = rope.theta;
  switch (rope.type) {
    case RopeConfig::Type::Default: rp["rope_type"] = "default"; break;
    case RopeConfig::Type::Linear:
      rp["rope_type"] = "linear";
      rp["factor"] = rope.factor;
      break;
    case RopeConfig::Type::Llama3:
      rp["rope_type"] = "llama3";
      rp["factor"] = rope.factor;
      rp["low_freq_factor"] = rope.low_freq_factor;
      rp["high_freq_factor"] = rope.high_freq_factor;
      rp["original_max_position_embeddings"] = rope.original_max_position_embeddings;
      break;
  }
  j["rope_parameters"] = rp;
  j["tie_word_embeddings"] = tie_word_embeddings;
  if (bos_token_id >= 0) j["bos_token_id"] = bos_token_id;
  if (eos_token_ids.size() == 1) j["eos_token_id"] = eos_token_ids[0];
  else if (!eos_token_ids.empty()) j["eos_token_id"] = eos_token_ids;
  j["dtype"] = dtype;
  return j;
}

}  // namespace spear

namespace spear {

std::vector<std::string> named_config_names() {
  return {"llama-3.2-1b", "llama-3.2-3b", "llama-3-8b", "llama-2-7b", "tiny"};
}

ModelConfig named_config(const std::string& name) {
  ModelConfig c;
  c.bos_token_id = 1;
  c.eos_token_ids = {2};
  c.dtype = "bfloat16";
  c.rms_norm_eps = 1e-5;
  if (name == "llama-3.2-1b" || name == "llama-3.2-3b") {
    const bool one = name == "llama-3.2-1b";
    c.vocab_size = 128256;
    c.hidden_size = one ? 2048 : 3072;
    c.intermediate_size = 8192;
    c.num_layers = one ? 16 : 28;
    c.num_heads = one ? 32 : 24;
    c.num_kv_heads = 8;
    c.head_dim = one ? 64 : 128;  // hidden_size / num_heads, as in the published configs
    c.max_position_embeddings = 131072;
    c.rope.type = RopeConfig::Type::Llama3;
    c.rope.theta = 500000.0;
    c.rope.factor = 32.0;
    c.rope.low_freq_factor = 1.0;
    c.rope.high_freq_factor = 4.0;
    c.rope.original_max_position_embeddings = 8192;
    c.tie_word_embeddings = true;
    c.bos_token_id = 128000;
    c.eos_token_ids = {128001};
  } else if (name == "llama-3-8b") {
    c.vocab_size = 128256;
    c.hidden_size = 4096;
    c.intermediate_size = 14336;
    c.num_layers = 32;
    c.num_heads = 32;
    c.num_kv_heads = 8;
    c.head_dim = 128;
    c.max_position_embeddings = 8192;
    c.rope.theta = 500000.0;  // plain RoPE: Llama 3 (not 3.1) has no rope_scaling
    c.tie_word_embeddings = false;
    c.bos_token_id = 128000;
    c.eos_token_ids = {128001};
  } else if (name == "llama-2-7b") {
    c.vocab_size = 32000;
    c.hidden_size = 4096;
    c.intermediate_size = 11008;
    c.num_layers = 32;
    c.num_heads = 32;
    c.num_kv_heads = 32;
    c.head_dim = 128;
    c.max_position_embeddings = 4096;
    c.tie_word_embeddings = false;
  } else if (name == "tiny") {
    // For tests: every feature of the real ones (GQA, an untied head, widths that are
    // multiples of 128 for grouped quantization) in ~0.5M parameters. The vocabulary is the
    // shipped stories260K tokenizer's, whose <s> and </s> are 1 and 2.
    c.vocab_size = 512;
    c.hidden_size = 128;
    c.intermediate_size = 384;
    c.num_layers = 2;
    c.num_heads = 4;
    c.num_kv_heads = 2;
    c.head_dim = 32;
    c.max_position_embeddings = 2048;
    c.tie_word_embeddings = false;
  } else {
    std::string known;
    for (const std::string& n : named_config_names()) known += (known.empty() ? "" : ", ") + n;
    throw Error("unknown config '" + name + "' (known: " + known + ")");
  }
  return c;
}

}  // namespace spear
