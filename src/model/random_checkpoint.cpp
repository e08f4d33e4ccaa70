// A random Hugging Face Llama checkpoint, streamed to disk. See model/random_checkpoint.h.
#include "model/random_checkpoint.h"

#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <set>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "model/module.h"

namespace fs = std::filesystem;

namespace spear {

namespace {

constexpr char kStagingPrefix[] = ".make-checkpoint.tmp.";

inline uint64_t splitmix64(uint64_t z) {
  z += 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

inline uint64_t tensor_key(uint64_t seed, int64_t tensor) {
  return splitmix64(splitmix64(seed) ^ (0x632be59bd9b4e019ull * static_cast<uint64_t>(tensor + 1)));
}

// Four 16-bit uniforms summed (Irwin-Hall, n = 4): mean 4 * 32767.5, standard deviation
// sqrt(4 * (65536^2 - 1) / 12).
constexpr double kIrwinHallMean = 4 * 32767.5;
const double kIrwinHallStd = std::sqrt(4.0 * (65536.0 * 65536.0 - 1.0) / 12.0);

inline float draw(uint64_t key, uint64_t i, float scale) {
  const uint64_t v = splitmix64(key + i);
  const uint32_t s = static_cast<uint32_t>(v & 0xffff) + static_cast<uint32_t>((v >> 16) & 0xffff) +
                     static_cast<uint32_t>((v >> 32) & 0xffff) + static_cast<uint32_t>(v >> 48);
  return static_cast<float>(static_cast<double>(s) - kIrwinHallMean) * scale;
}

bool is_norm(const std::string& name) { return name.find("norm.weight") != std::string::npos; }

// Fills out[0, n) with elements [first, first + n) of a tensor, in its dtype.
void fill(uint16_t* out, int64_t n, uint64_t first, uint64_t key, bool ones, float scale, DType dtype) {
  const uint16_t one = dtype == DType::BF16 ? f32_to_bf16(1.0f) : f32_to_f16(1.0f);
  constexpr int64_t kBlock = 1 << 16;
  const int64_t blocks = (n + kBlock - 1) / kBlock;
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t lo = b * kBlock, hi = std::min(n, lo + kBlock);
    if (ones) {
      std::fill(out + lo, out + hi, one);
    } else if (dtype == DType::BF16) {
      for (int64_t i = lo; i < hi; ++i) out[i] = f32_to_bf16(draw(key, first + i, scale));
    } else {
      for (int64_t i = lo; i < hi; ++i) out[i] = f32_to_f16(draw(key, first + i, scale));
    }
  }
}

std::string dtype_torch_name(DType d) { return d == DType::BF16 ? "bfloat16" : "float16"; }

// config.json as transformers writes a LlamaConfig: the fields spear reads (ModelConfig::
// to_json, transformers-5 rope_parameters) plus the transformers-4 spellings of the rope
// (rope_theta, rope_scaling) and dtype (torch_dtype), and the fixed Llama fields.
nlohmann::json hf_config_json(const ModelConfig& c, double init_std) {
  nlohmann::json j = c.to_json();
  j["hidden_act"] = "silu";
  j["attention_bias"] = false;
  j["attention_dropout"] = 0.0;
  j["mlp_bias"] = false;
  j["initializer_range"] = init_std;
  j["pretraining_tp"] = 1;
  j["use_cache"] = true;
  j["torch_dtype"] = c.dtype;
  j["rope_theta"] = c.rope.theta;
  if (c.rope.type == RopeConfig::Type::Default) {
    j["rope_scaling"] = nullptr;
  } else {
    nlohmann::json s = j["rope_parameters"];
    s.erase("rope_theta");
    j["rope_scaling"] = s;
  }
  return j;
}

void write_text(const fs::path& p, const std::string& text) {
  std::ofstream o(p, std::ios::binary | std::ios::trunc);
  o.write(text.data(), static_cast<std::streamsize>(text.size()));
  o.flush();
  SPEAR_CHECK(o.good(), "make-checkpoint: cannot write " + p.string());
}

void fsync_dir(const fs::path& d) {
  FILE* f = std::fopen(d.c_str(), "r");
  if (f) {
    ::fsync(fileno(f));
    std::fclose(f);
  }
}

// Staging folders of runs that died (killed, power loss): their pid is gone.
void remove_dead_staging(const fs::path& dir) {
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    const std::string n = e.path().filename().string();
    if (n.rfind(kStagingPrefix, 0) != 0) continue;
    const long pid = std::strtol(n.c_str() + sizeof(kStagingPrefix) - 1, nullptr, 10);
    if (pid > 0 && pid != ::getpid() && ::kill(static_cast<pid_t>(pid), 0) != 0 && errno == ESRCH)
      fs::remove_all(e.path(), ec);
  }
}

bool is_shard_name(const std::string& n) {
  return n == "model.safetensors" || n == "model.safetensors.index.json" ||
         (n.rfind("model-", 0) == 0 && n.size() > 12 && n.compare(n.size() - 12, 12, ".safetensors") == 0);
}

}  // namespace

float random_weight(uint64_t seed, int64_t tensor, uint64_t i, double init_std) {
  return draw(tensor_key(seed, tensor), i, static_cast<float>(init_std / kIrwinHallStd));
}

std::vector<TensorDecl> hf_llama_tensors(const ModelConfig& c, DType dtype) {
  std::vector<TensorDecl> t;
  t.push_back({"model.embed_tokens.weight", dtype, {c.vocab_size, c.hidden_size}});
  for (int64_t l = 0; l < c.num_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    for (Module m : kAllModules) {
      const ModuleShape s = module_shape(c, m);
      t.push_back({p + std::string(module_name(m)) + ".weight", dtype, {s.out, s.in}});
    }
    t.push_back({p + "input_layernorm.weight", dtype, {c.hidden_size}});
    t.push_back({p + "post_attention_layernorm.weight", dtype, {c.hidden_size}});
  }
  t.push_back({"model.norm.weight", dtype, {c.hidden_size}});
  if (!c.tie_word_embeddings) t.push_back({"lm_head.weight", dtype, {c.vocab_size, c.hidden_size}});
  return t;
}

RandomCheckpointResult write_random_checkpoint(const ModelConfig& config, const std::string& dir_str,
                                               const RandomCheckpointOptions& o) {
  SPEAR_CHECK(o.dtype == DType::BF16 || o.dtype == DType::F16,
              "make-checkpoint: the dtype must be bf16 or f16");
  SPEAR_CHECK(o.shard_bytes > 0, "make-checkpoint: the shard size must be positive");
  SPEAR_CHECK(std::isfinite(o.init_std) && o.init_std > 0 && o.init_std < 10,
              "make-checkpoint: the init std must be in (0, 10)");
  SPEAR_CHECK(!o.tokenizer_json.empty(), "make-checkpoint: no tokenizer.json text");
  ModelConfig c = config;
  c.dtype = dtype_torch_name(o.dtype);
  // What spear's own loader will demand of the config (and a bad one fails before any byte).
  c = ModelConfig::from_json(hf_config_json(c, o.init_std));

  const fs::path dir(dir_str);
  std::error_code ec;
  if (fs::exists(dir)) {
    SPEAR_CHECK(fs::is_directory(dir), "make-checkpoint: " + dir_str + " exists and is not a directory");
    remove_dead_staging(dir);
    bool empty = true;
    for (const auto& e : fs::directory_iterator(dir))
      if (e.path().filename().string().rfind(kStagingPrefix, 0) != 0) empty = false;
    SPEAR_CHECK(empty || o.overwrite, "make-checkpoint: " + dir_str +
                                          " is not empty (--force replaces a checkpoint there)");
  } else {
    fs::create_directories(dir, ec);
    SPEAR_CHECK(!ec, "make-checkpoint: cannot create " + dir_str + ": " + ec.message());
  }

  // Shards: tensors in order, a new shard when the next tensor would pass the limit.
  const std::vector<TensorDecl> tensors = hf_llama_tensors(c, o.dtype);
  std::vector<std::vector<size_t>> shards;
  std::vector<uint64_t> tensor_bytes;
  uint64_t total = 0, in_shard = 0;
  for (size_t i = 0; i < tensors.size(); ++i) {
    uint64_t n = dtype_size(o.dtype);
    for (int64_t d : tensors[i].shape) n *= static_cast<uint64_t>(d);
    tensor_bytes.push_back(n);
    if (shards.empty() || (in_shard > 0 && in_shard + n > o.shard_bytes)) {
      shards.emplace_back();
      in_shard = 0;
    }
    shards.back().push_back(i);
    in_shard += n;
    total += n;
  }
  const int n_shards = static_cast<int>(shards.size());
  SPEAR_CHECK(n_shards <= 99999, "make-checkpoint: more than 99999 shards; raise the shard size");
  auto shard_name = [&](int s) {
    if (n_shards == 1) return std::string("model.safetensors");
    char b[64];
    std::snprintf(b, sizeof b, "model-%05d-of-%05d.safetensors", s + 1, n_shards);
    return std::string(b);
  };
  if (auto sp = fs::space(dir, ec); !ec && sp.available < total + (1u << 20))
    throw Error("make-checkpoint: " + dir_str + " has " + std::to_string(sp.available >> 20) +
                " MiB free; the checkpoint needs " + std::to_string((total >> 20) + 1) + " MiB");

  const fs::path staging = dir / (kStagingPrefix + std::to_string(::getpid()));
  fs::remove_all(staging, ec);
  fs::create_directory(staging, ec);
  SPEAR_CHECK(!ec, "make-checkpoint: cannot create " + staging.string() + ": " + ec.message());
  RandomCheckpointResult r;
  try {
    // Every tensor is made in chunks of this many elements, so host memory stays at one
    // chunk whatever the tensor's size.
    constexpr int64_t kChunk = int64_t{1} << 24;
    std::vector<uint16_t> buf;
    const float scale = static_cast<float>(o.init_std / kIrwinHallStd);
    uint64_t done = 0;
    nlohmann::ordered_json weight_map = nlohmann::ordered_json::object();
    for (int s = 0; s < n_shards; ++s) {
      std::vector<TensorDecl> decls;
      for (size_t i : shards[s]) decls.push_back(tensors[i]);
      SafetensorsWriter w((staging / shard_name(s)).string(), decls, {{"format", "pt"}});
      for (size_t i : shards[s]) {
        const uint64_t key = tensor_key(o.seed, static_cast<int64_t>(i));
        const bool ones = is_norm(tensors[i].name);
        const int64_t numel = static_cast<int64_t>(tensor_bytes[i] / 2);
        for (int64_t first = 0; first < numel; first += kChunk) {
          const int64_t n = std::min(kChunk, numel - first);
          buf.resize(static_cast<size_t>(n));
          fill(buf.data(), n, static_cast<uint64_t>(first), key, ones, scale, o.dtype);
          w.write(buf.data(), static_cast<size_t>(n) * 2);
          done += static_cast<uint64_t>(n) * 2;
          if (o.progress) o.progress(done, total);
        }
        weight_map[tensors[i].name] = shard_name(s);
        ++r.tensors;
      }
      w.commit();
      r.bytes += w.file_bytes();
      r.files.push_back(shard_name(s));
    }
    if (n_shards > 1) {
      nlohmann::ordered_json index;
      index["metadata"] = {{"total_size", total}};
      index["weight_map"] = weight_map;
      write_text(staging / "model.safetensors.index.json", index.dump(2) + "\n");
      r.files.push_back("model.safetensors.index.json");
    }
    write_text(staging / "tokenizer.json", o.tokenizer_json);
    r.files.push_back("tokenizer.json");
    if (!o.tokenizer_config_json.empty()) {
      write_text(staging / "tokenizer_config.json", o.tokenizer_config_json);
      r.files.push_back("tokenizer_config.json");
    }
    nlohmann::json gen{{"_from_model_config", true}, {"bos_token_id", c.bos_token_id}};
    if (c.eos_token_ids.size() == 1) gen["eos_token_id"] = c.eos_token_ids[0];
    else gen["eos_token_id"] = c.eos_token_ids;
    write_text(staging / "generation_config.json", gen.dump(2) + "\n");
    r.files.push_back("generation_config.json");
    write_text(staging / "config.json", hf_config_json(c, o.init_std).dump(2) + "\n");
    r.files.push_back("config.json");
    fsync_dir(staging);

    // Into place: config.json out first (the directory is incomplete until it is back),
    // then everything else, stale shards of an earlier checkpoint removed, config.json last.
    fs::remove(dir / "config.json", ec);
    const std::set<std::string> fresh(r.files.begin(), r.files.end());
    for (const std::string& f : r.files)
      if (f != "config.json") fs::rename(staging / f, dir / f);
    for (const auto& e : fs::directory_iterator(dir)) {
      const std::string n = e.path().filename().string();
      if (is_shard_name(n) && !fresh.count(n)) fs::remove(e.path());
    }
    fs::rename(staging / "config.json", dir / "config.json");
    fs::remove_all(staging, ec);
    fsync_dir(dir);
  } catch (...) {
    fs::remove_all(staging, ec);
    throw;
  }
  r.shards = n_shards;
  return r;
}

}  // namespace spear
