// spear bench-latency --config llama-2-7b: decode and prefill latency of the GPU engine at
// real sizes, with random weights made on the GPU (no download), for the FP16 engine, W4,
// W4+EC through separate launches (naive) and W4+EC as the dispatcher runs it; beside
// each, the bytes floor (bytes read per step over a bandwidth ceiling measured in the
// same run).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <map>
#include <sstream>

#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "core/error.h"
#ifdef SPEAR_WITH_CUDA
#include "cuda/gpu_model.h"
#endif

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

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

}  // namespace

void register_bench_latency(CLI::App& app) {
  auto* cmd = app.add_subcommand("bench-latency",
                                 "GPU decode/prefill latency at real model sizes (random weights made on the GPU)");
  struct Opts {
    std::string configs = "llama-3.2-1b", variants = "fp16,w4,w4ec-naive,w4ec";
    std::string batches = "1,8,32", contexts = "512,2048", prefill = "512,2048";
    double ec_budget = 0.01;
    int ec_rank = 32, group = 0, iters = 20;
    bool autotune = false;
    std::string json, md;
  };
  auto o = std::make_shared<Opts>();
  cmd->add_option("--config", o->configs, "llama-3.2-1b, llama-3.2-3b, llama-2-7b (comma-separated)")
      ->capture_default_str();
  cmd->add_option("--variants", o->variants, "fp16, w4, w4ec-naive, w4ec (comma-separated)")->capture_default_str();
  cmd->add_option("--batches", o->batches, "Decode batch sizes")->capture_default_str();
  cmd->add_option("--contexts", o->contexts, "Decode context lengths")->capture_default_str();
  cmd->add_option("--prefill", o->prefill, "Prefill lengths")->capture_default_str();
  cmd->add_option("--ec-budget", o->ec_budget, "EC bytes / quantized model bytes")->capture_default_str();
  cmd->add_option("--ec-rank", o->ec_rank, "EC rank")->capture_default_str();
  cmd->add_option("--group", o->group, "W4 group size (0 = per output channel)")->capture_default_str();
  cmd->add_option("--iters", o->iters, "Timed decode steps per case (median reported)")->capture_default_str();
  cmd->add_flag("--autotune", o->autotune, "Autotune the W4 kernels for each shape first");
  cmd->add_option("--json", o->json, "Write all measurements as JSON");
  cmd->add_option("--md", o->md, "Write the tables as markdown");
  cmd->callback([o] {
#ifndef SPEAR_WITH_CUDA
    throw Error("bench-latency: this spear was built without CUDA");
#else
    using namespace spear::cuda;
    using clock = std::chrono::steady_clock;
    std::string why;
    SPEAR_CHECK(cuda_available(&why), "bench-latency: no usable CUDA device (" + why + ")");
    const std::vector<int> batches = int_list(o->batches, "batch"), contexts = int_list(o->contexts, "context"),
                           prefills = int_list(o->prefill, "prefill length");
    SPEAR_CHECK(o->iters >= 1 && o->iters <= 10000, "bench-latency: bad --iters");
    for (const std::string& v : split_list(o->variants))
      SPEAR_CHECK(v == "fp16" || v == "w4" || v == "w4ec-naive" || v == "w4ec",
                  "bench-latency: unknown variant '" + v + "'");
    cudaDeviceProp prop{};
    cudaGetDeviceProperties(&prop, 0);
    const double ceiling = measure_copy_bandwidth_gbs(size_t(1) << 31);
    std::fprintf(stderr, "spear: %s, bandwidth ceiling (2 GiB device copy) %.0f GB/s\n", prop.name, ceiling);
    nlohmann::json out{{"gpu", prop.name}, {"ceiling_gbs", ceiling}, {"decode", nlohmann::json::array()},
                       {"prefill", nlohmann::json::array()}};
    std::string md_decode =
        "| config | variant | batch | ctx | ms/step | floor ms | x floor | speedup vs FP16 | time vs W4 |\n"
        "|---|---|---:|---:|---:|---:|---:|---:|---:|\n";
    std::string md_prefill = "| config | variant | tokens | ms | tok/s | vs FP16 |\n|---|---|---:|---:|---:|---:|\n";
    std::string md_models;
    const int maxB = *std::max_element(batches.begin(), batches.end());
    const int maxC = *std::max_element(contexts.begin(), contexts.end());
    const int maxP = *std::max_element(prefills.begin(), prefills.end());
    for (const std::string& cname : split_list(o->configs)) {
      const ModelConfig cfg = named_config(cname);
      std::map<std::string, double> base;  // "fp16|B|C" -> ms, "w4|B|C" -> ms, prefill "fp16|P"
      for (const std::string& var : split_list(o->variants)) {
        SyntheticSpec spec;
        spec.kind = var == "fp16" ? WeightKind::kFp16 : var == "w4" ? WeightKind::kW4 : WeightKind::kW4Ec;
        spec.group = o->group;
        spec.ec_budget = o->ec_budget;
        spec.ec_rank = o->ec_rank;
        spec.ec_full_gate = var == "w4ec-naive";  // the calibrated r x r gate, as separate launches
        GpuOptions go;
        go.max_batch = maxB;
        go.max_tokens = std::max(maxP, maxB);
        go.max_len = std::max(maxC, maxP);
        go.ec_path = var == "w4ec-naive" ? EcPath::kNaive : EcPath::kDispatch;
        go.autotune = o->autotune;
        auto t0 = clock::now();
        auto m = GpuModel::synthetic(cfg, spec, go);
        const GpuMemory& mem = m->memory();
        std::fprintf(stderr, "spear: %s %s built in %.1f s: %s\n", cname.c_str(), var.c_str(),
                     std::chrono::duration<double>(clock::now() - t0).count(), mem.str().c_str());
        md_models += "- " + cname + " " + var + ": " + mem.str() + "\n";
        // Bytes a decode step reads: every linear layer, the head, the ECs, and the KV of
        // every sequence; the embedding table only when it is the (tied) head.
        const int64_t embed_bytes = cfg.vocab_size * cfg.hidden_size * 2;
        const int64_t weight_read = mem.weights - (cfg.tie_word_embeddings ? 0 : embed_bytes) + mem.ec;
        // decode
        for (int C : contexts)
          for (int B : batches) {
            for (int b = 0; b < B; ++b) m->fake_context(b, C);
            for (int i = 0; i < 3; ++i) m->decode_step_bench(B, 7);  // graph capture, warm-up
            m->synchronize();
            std::vector<double> ms;
            for (int i = 0; i < o->iters; ++i) {
              auto s0 = clock::now();
              m->decode_step_bench(B, 7);
              m->synchronize();
              ms.push_back(std::chrono::duration<double, std::milli>(clock::now() - s0).count());
            }
            const double med = median(ms);
            const int64_t kv_read = static_cast<int64_t>(B) * C * cfg.num_layers * cfg.kv_dim() * 2 * 2;
            const double floor_ms = static_cast<double>(weight_read + kv_read) / (ceiling * 1e9) * 1e3;
            const std::string key = std::to_string(B) + "|" + std::to_string(C);
            base[var + "|" + key] = med;
            // speedup over the FP16 engine; time relative to plain W4 (the EC's overhead)
            auto fmt = [&](const std::string& v, bool speedup) -> std::string {
              auto it = base.find(v + "|" + key);
              if (it == base.end() || var == v) return "";
              char b[32];
              std::snprintf(b, sizeof b, "%.2fx", speedup ? it->second / med : med / it->second);
              return b;
            };
            char row[256];
            std::snprintf(row, sizeof row, "| %s | %s | %d | %d | %.3f | %.3f | %.2f | %s | %s |\n", cname.c_str(),
                          var.c_str(), B, C, med, floor_ms, med / floor_ms, fmt("fp16", true).c_str(),
                          fmt("w4", false).c_str());
            md_decode += row;
            std::fputs(row, stderr);
            out["decode"].push_back({{"config", cname}, {"variant", var}, {"batch", B}, {"ctx", C},
                                     {"ms_median", med}, {"ms_min", *std::min_element(ms.begin(), ms.end())},
                                     {"floor_ms", floor_ms}, {"bytes_read", weight_read + kv_read}});
          }
        for (int b = 0; b < maxB; ++b) m->reset(b);
        // prefill: one sequence of P tokens, logits of the last one
        for (int P : prefills) {
          std::vector<int32_t> toks(P);
          for (int i = 0; i < P; ++i) toks[i] = static_cast<int32_t>((i * 7919 + 13) % cfg.vocab_size);
          std::vector<double> ms;
          for (int i = 0; i < 4; ++i) {
            m->reset(0);
            GpuChunk c{0, toks.data(), P, 0, false};
            auto s0 = clock::now();
            m->forward(std::span<const GpuChunk>(&c, 1));
            m->synchronize();
            if (i > 0) ms.push_back(std::chrono::duration<double, std::milli>(clock::now() - s0).count());
          }
          const double med = median(ms);
          base[var + "|P" + std::to_string(P)] = med;
          auto it = base.find("fp16|P" + std::to_string(P));
          char sp[32] = "";
          if (it != base.end() && var != "fp16") std::snprintf(sp, sizeof sp, "%.2fx", it->second / med);
          char row[256];
          std::snprintf(row, sizeof row, "| %s | %s | %d | %.2f | %.0f | %s |\n", cname.c_str(), var.c_str(), P, med,
                        P / (med * 1e-3), sp);
          md_prefill += row;
          std::fputs(row, stderr);
          out["prefill"].push_back({{"config", cname}, {"variant", var}, {"tokens", P}, {"ms_median", med},
                                    {"tokens_per_s", P / (med * 1e-3)}});
        }
        m->reset(0);
      }
    }
    const std::string md = std::string("GPU: ") + prop.name + ", copy-bandwidth ceiling " +
                           std::to_string(static_cast<int>(ceiling)) + " GB/s\n\nDecode (per step, all sequences):\n\n" +
                           md_decode + "\nPrefill (one sequence):\n\n" + md_prefill + "\nModels:\n\n" + md_models;
    std::printf("%s", md.c_str());
    if (!o->json.empty()) write_text_file(o->json, out.dump(1) + "\n");
    if (!o->md.empty()) write_text_file(o->md, md);
#endif
  });
}

}  // namespace spear::cli
