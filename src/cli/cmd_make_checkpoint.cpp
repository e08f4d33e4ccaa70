// spear make-checkpoint --config NAME --out DIR: a Hugging Face Llama directory of a named
// architecture with random weights (model/random_checkpoint.h), so the whole pipeline runs on
// real shapes without a download.
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>

#include "cli/commands.h"
#include "core/error.h"
#include "io/model_config.h"
#include "model/random_checkpoint.h"

namespace spear::cli {

// The default tokenizer: models/stories260K-hf/tokenizer.json and tokenizer_config.json,
// compiled into the binary (CMakeLists.txt generates embedded_tokenizer.cpp), so the command
// works from an installed binary with no repository beside it.
extern const unsigned char kEmbeddedTokenizerJson[];
extern const size_t kEmbeddedTokenizerJsonSize;
extern const unsigned char kEmbeddedTokenizerConfigJson[];
extern const size_t kEmbeddedTokenizerConfigJsonSize;

void register_make_checkpoint(CLI::App& app) {
  struct Opts {
    std::string config, out, dtype = "bf16", tokenizer;
    uint64_t seed = 0;
    double shard_mb = 5000;
    double init_std = 0.02;
    bool random = false, force = false;
  };
  auto o = std::make_shared<Opts>();
  auto* cmd = app.add_subcommand(
      "make-checkpoint",
      "Write a Hugging Face Llama directory of a named architecture with random weights (real shapes, "
      "no download; quality meaningless)");
  std::string names;
  for (const std::string& n : named_config_names()) names += (names.empty() ? "" : ", ") + n;
  cmd->add_option("--config", o->config, "Architecture: " + names)->required();
  cmd->add_option("--out", o->out, "Directory to write (created; must be empty unless --force)")->required();
  cmd->add_flag("--random", o->random, "Random weights (the only kind for now; accepted for clarity)");
  cmd->add_option("--seed", o->seed, "Seed of the weights (the same seed, the same bytes)")->capture_default_str();
  cmd->add_option("--shard-mb", o->shard_mb, "Largest shard, MB of tensor data (10^6 bytes)")->capture_default_str();
  cmd->add_option("--dtype", o->dtype, "bf16 or f16")->capture_default_str();
  cmd->add_option("--init-std", o->init_std, "Standard deviation of the weights (norms are 1)")
      ->capture_default_str();
  cmd->add_option("--tokenizer", o->tokenizer,
                  "tokenizer.json to copy (with the tokenizer_config.json beside it, if any); default: "
                  "the stories260K tokenizer built into spear (512 tokens)");
  cmd->add_flag("--force", o->force,
                "Write into a non-empty directory: replace a checkpoint there (stale shards removed)");
  cmd->callback([o] {
    const ModelConfig cfg = parse_flag("make-checkpoint: --config", o->config, named_config);
    RandomCheckpointOptions r;
    r.seed = o->seed;
    SPEAR_CHECK(o->dtype == "bf16" || o->dtype == "f16",
                "make-checkpoint: --dtype must be bf16 or f16, not '" + o->dtype + "'");
    r.dtype = o->dtype == "bf16" ? DType::BF16 : DType::F16;
    SPEAR_CHECK(std::isfinite(o->shard_mb) && o->shard_mb > 0 && o->shard_mb <= 1e7,
                "make-checkpoint: --shard-mb must be in (0, 1e7]");
    r.shard_bytes = static_cast<uint64_t>(std::max(1.0, o->shard_mb * 1e6));
    r.init_std = o->init_std;
    r.overwrite = o->force;
    if (o->tokenizer.empty()) {
      r.tokenizer_json.assign(reinterpret_cast<const char*>(kEmbeddedTokenizerJson), kEmbeddedTokenizerJsonSize);
      r.tokenizer_config_json.assign(reinterpret_cast<const char*>(kEmbeddedTokenizerConfigJson),
                                     kEmbeddedTokenizerConfigJsonSize);
    } else {
      r.tokenizer_json = read_text_file(o->tokenizer);
      namespace fs = std::filesystem;
      const fs::path side = fs::path(o->tokenizer).parent_path() / "tokenizer_config.json";
      if (fs::exists(side)) r.tokenizer_config_json = read_text_file(side.string());
    }
    Progress progress("make-checkpoint (MB)");
    bool started = false;
    r.progress = [&](uint64_t done, uint64_t total) {
      if (!started) {  // once the directory was accepted: an error stays the only line
        std::fprintf(stderr, "spear: %s: %lld parameters, %.2f GB of %s in %s\n", o->config.c_str(),
                     static_cast<long long>(cfg.num_parameters()), static_cast<double>(total) * 1e-9,
                     o->dtype.c_str(), o->out.c_str());
        started = true;
      }
      progress.update(static_cast<int64_t>(done / 1000000), static_cast<int64_t>(total / 1000000));
    };
    const auto t0 = std::chrono::steady_clock::now();
    const RandomCheckpointResult res = write_random_checkpoint(cfg, o->out, r);
    progress.finish();
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::printf("wrote %s: %lld tensors in %d shard%s, %.3f GB, %.1f s\n", o->out.c_str(),
                static_cast<long long>(res.tensors), res.shards, res.shards == 1 ? "" : "s",
                static_cast<double>(res.bytes) * 1e-9, s);
  });
}

}  // namespace spear::cli
