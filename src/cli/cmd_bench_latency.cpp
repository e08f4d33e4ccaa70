// spear bench-latency --config llama-2-7b: the GPU engine's decode and prefill latency at
// real sizes (runtime/bench_latency.h).
#include <cstdio>

#include "cli/commands.h"
#include "core/error.h"
#include "io/model_config.h"
#include "runtime/bench_latency.h"

namespace spear::cli {

namespace {

std::vector<int> int_list(const std::string& s, const char* what) {
  std::vector<int> out;
  for (const std::string& t : split_list(s)) {
    try {
      size_t used = 0;
      int v = std::stoi(t, &used);
      SPEAR_CHECK(used == t.size() && v > 0, "");
      out.push_back(v);
    } catch (...) {
      throw Error(std::string("bench-latency: bad ") + what + " '" + t + "' (positive integers, comma-separated)");
    }
  }
  return out;
}

}  // namespace

void register_bench_latency(CLI::App& app) {
  auto* cmd = app.add_subcommand("bench-latency",
                                 "GPU decode/prefill latency at real model sizes (random weights made on the GPU)");
  struct Opts {
    std::string configs = "llama-3.2-1b", variants = "fp16,w4,w4ec-naive,w4ec,w4ec-full";
    std::string batches = "1,8,32", contexts = "512,2048", prefill = "512,2048";
    double ec_budget = 0.01;
    int ec_rank = 32, group = 0, iters = 20, dequant_mb = 256;
    bool autotune = false, no_fuse = false, breakdown = false;
    std::string json, md;
  };
  auto o = std::make_shared<Opts>();
  cmd->add_option("--config", o->configs, "Named architectures, comma-separated: llama-3.2-1b, llama-3.2-3b, llama-3-8b, llama-2-7b, tiny")
      ->capture_default_str();
  cmd->add_option("--variants", o->variants, "fp16, w4, w4ec-naive, w4ec (per-coordinate gate), w4ec-full (r×r gate, fused) (comma-separated)")->capture_default_str();
  cmd->add_option("--batches", o->batches, "Decode batch sizes")->capture_default_str();
  cmd->add_option("--contexts", o->contexts, "Decode context lengths")->capture_default_str();
  cmd->add_option("--prefill", o->prefill, "Prefill lengths")->capture_default_str();
  cmd->add_option("--ec-budget", o->ec_budget, "EC bytes / quantized model bytes")->capture_default_str();
  cmd->add_option("--ec-rank", o->ec_rank, "EC rank")->capture_default_str();
  cmd->add_option("--group", o->group, "W4 group size (0 = per output channel)")->capture_default_str();
  cmd->add_option("--iters", o->iters, "Timed decode steps per case (median reported)")->capture_default_str();
  cmd->add_flag("--autotune", o->autotune, "Autotune the W4 kernels for each shape first");
  cmd->add_flag("--no-fuse", o->no_fuse, "One GEMM per module (no stacked Q|K|V, Gate|Up)");
  cmd->add_option("--dequant-mb", o->dequant_mb,
                  "Scratch for the W4 dequantize + cuBLAS path at prefill sizes (0 = that path off)")
      ->capture_default_str();
  cmd->add_flag("--breakdown", o->breakdown,
                "Per decode case: each op timed alone outside the graph, their sum against the graph step");
  cmd->add_option("--json", o->json, "Write all measurements as JSON");
  cmd->add_option("--md", o->md, "Write the tables as markdown");
  cmd->callback([o] {
    BenchLatencyOptions b;
    b.configs = split_list(o->configs);
    for (const std::string& c : b.configs) parse_flag("bench-latency: --config", c, named_config);
    for (const std::string& v : split_list(o->variants)) b.variants.push_back(parse_latency_variant(v));
    b.batches = int_list(o->batches, "batch");
    b.contexts = int_list(o->contexts, "context");
    b.prefills = int_list(o->prefill, "prefill length");
    b.ec_budget = o->ec_budget;
    b.ec_rank = o->ec_rank;
    b.group = o->group;
    b.iters = o->iters;
    b.autotune = o->autotune;
    b.fuse = !o->no_fuse;
    b.breakdown = o->breakdown;
    SPEAR_CHECK(o->dequant_mb >= 0 && o->dequant_mb <= 65536, "bench-latency: --dequant-mb out of range (0..65536)");
    b.dequant_scratch_mb = o->dequant_mb;
    const BenchLatencyResult r = bench_latency(b);
    std::printf("%s", r.markdown.c_str());
    if (!o->json.empty()) write_text_file(o->json, r.json);
    if (!o->md.empty()) write_text_file(o->md, r.markdown);
  });
}

}  // namespace spear::cli
