// bench-latency: the GPU engine at real sizes with random weights made on the GPU. See
// runtime/bench_latency.h.
#include "runtime/bench_latency.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <map>

#include <nlohmann/json.hpp>

#include "core/error.h"
#ifdef SPEAR_WITH_CUDA
#include "gpu/gpu_model.h"
#endif

namespace spear {

std::string_view latency_variant_name(LatencyVariant v) {
  switch (v) {
    case LatencyVariant::kFp16: return "fp16";
    case LatencyVariant::kW4: return "w4";
    case LatencyVariant::kW4EcNaive: return "w4ec-naive";
    case LatencyVariant::kW4Ec: return "w4ec";
    case LatencyVariant::kW4EcFull: return "w4ec-full";
  }
  return "?";
}

LatencyVariant parse_latency_variant(std::string_view s) {
  for (LatencyVariant v : {LatencyVariant::kFp16, LatencyVariant::kW4, LatencyVariant::kW4EcNaive, LatencyVariant::kW4Ec,
                           LatencyVariant::kW4EcFull})
    if (latency_variant_name(v) == s) return v;
  throw Error("bench-latency: unknown variant '" + std::string(s) + "' (fp16, w4, w4ec-naive, w4ec, w4ec-full)");
}

#ifndef SPEAR_WITH_CUDA
BenchLatencyResult bench_latency(const BenchLatencyOptions&) {
  throw Error("bench-latency: this spear was built without CUDA");
}
#else
namespace {
double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

std::string fmt_ms(double ms) {
  char b[32];
  std::snprintf(b, sizeof b, "%.3f", ms);
  return b;
}

// One decode case's breakdown as markdown: µs per step by op, share of the ops' sum, and
// (with ECs) the same op without them.
std::string breakdown_table(const std::string& title, const cuda::StepProfile& p, const cuda::StepProfile* plain) {
  std::string md = "\n" + title + "\n\n| op | calls/step | µs/step | % of ops |" +
                   (plain ? " µs without ECs | EC share |" : "") + "\n|---|---:|---:|---:|" +
                   (plain ? "---:|---:|" : "") + "\n";
  char row[256];
  for (const cuda::StepProfile::Op& op : p.ops) {
    std::snprintf(row, sizeof row, "| %s | %d | %.1f | %.1f%% |", op.name.c_str(), op.calls, op.us,
                  100.0 * op.us / p.sum_us);
    md += row;
    if (plain) {
      double base = 0;
      for (const cuda::StepProfile::Op& q : plain->ops)
        if (q.name == op.name) base = q.us;
      std::snprintf(row, sizeof row, " %.1f | %+.1f%% |", base, base > 0 ? 100.0 * (op.us - base) / base : 0.0);
      md += row;
    }
    md += "\n";
  }
  std::snprintf(row, sizeof row, "| **sum of ops** | | %.1f | 100%% |", p.sum_us);
  md += row;
  if (plain) {
    std::snprintf(row, sizeof row, " %.1f | %+.1f%% |", plain->sum_us, 100.0 * (p.sum_us - plain->sum_us) / plain->sum_us);
    md += row;
  }
  std::snprintf(row, sizeof row, "\n| **graph step** | | %.1f | %.1f%% of the sum |", p.graph_us,
                100.0 * p.graph_us / p.sum_us);
  md += row;
  if (plain) {
    std::snprintf(row, sizeof row, " %.1f | %+.1f%% |", plain->graph_us,
                  100.0 * (p.graph_us - plain->graph_us) / plain->graph_us);
    md += row;
  }
  return md + "\n";
}
}  // namespace

BenchLatencyResult bench_latency(const BenchLatencyOptions& o) {
  using namespace spear::cuda;
  using clock = std::chrono::steady_clock;
  std::string why;
  SPEAR_CHECK(cuda_available(&why), "bench-latency: no usable CUDA device (" + why + ")");
  const std::vector<int>& batches = o.batches;
  const std::vector<int>& contexts = o.contexts;
  const std::vector<int>& prefills = o.prefills;
  SPEAR_CHECK(!batches.empty() && !contexts.empty() && !prefills.empty(), "bench-latency: empty list");
  SPEAR_CHECK(o.iters >= 1 && o.iters <= 10000, "bench-latency: bad --iters");
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
  std::string md_models, md_breakdown;
  const int maxB = *std::max_element(batches.begin(), batches.end());
  const int maxC = *std::max_element(contexts.begin(), contexts.end());
  const int maxP = *std::max_element(prefills.begin(), prefills.end());
  for (const std::string& cname : o.configs) {
    const ModelConfig cfg = named_config(cname);
    std::map<std::string, double> base;  // "fp16|B|C" -> ms, "w4|B|C" -> ms, prefill "fp16|P"
    for (const LatencyVariant variant : o.variants) {
      const std::string var(latency_variant_name(variant));
      SyntheticSpec spec;
      spec.kind = variant == LatencyVariant::kFp16 ? WeightKind::kFp16
                  : variant == LatencyVariant::kW4 ? WeightKind::kW4
                                                   : WeightKind::kW4Ec;
      spec.group = o.group;
      spec.ec_budget = o.ec_budget;
      spec.ec_rank = o.ec_rank;
      // the calibrated r x r gate: fused (w4ec-full) or as separate launches (w4ec-naive)
      spec.ec_full_gate = variant == LatencyVariant::kW4EcNaive || variant == LatencyVariant::kW4EcFull;
      GpuOptions go;
      go.max_batch = maxB;
      go.max_tokens = std::max(maxP, maxB);
      go.max_len = std::max(maxC, maxP);
      go.ec_path = variant == LatencyVariant::kW4EcNaive ? EcPath::kNaive : EcPath::kDispatch;
      go.autotune = o.autotune;
      go.fuse_projections = o.fuse;
      go.dequant_scratch_mb = o.dequant_scratch_mb;
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
          for (int i = 0; i < o.iters; ++i) {
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
          if (o.breakdown) {
            const bool has_ec = spec.kind == WeightKind::kW4Ec;
            const StepProfile prof = m->profile_decode_step(B, 7);
            StepProfile plain;
            if (has_ec) {  // the same step without the ECs: what they cost, op by op
              m->set_ec_enabled(false);
              plain = m->profile_decode_step(B, 7);
              m->set_ec_enabled(true);
            }
            md_breakdown += breakdown_table(cname + " " + var + ", batch " + std::to_string(B) + ", ctx " +
                                                std::to_string(C) + ": graph step " + fmt_ms(med) + " ms (" +
                                                fmt_ms(floor_ms) + " ms bytes floor)",
                                            prof, has_ec ? &plain : nullptr);
            nlohmann::json ops = nlohmann::json::array();
            for (const StepProfile::Op& op : prof.ops)
              ops.push_back({{"op", op.name}, {"calls", op.calls}, {"us", op.us}});
            out["breakdown"].push_back({{"config", cname}, {"variant", var}, {"batch", B}, {"ctx", C},
                                        {"ops", ops}, {"sum_us", prof.sum_us}, {"graph_us", prof.graph_us},
                                        {"plain_sum_us", has_ec ? plain.sum_us : 0.0}});
          }
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
                         std::to_string(static_cast<int>(ceiling)) + " GB/s; Q|K|V and Gate|Up " +
                         (o.fuse ? "stacked (one GEMM each)" : "separate (--no-fuse)") +
                         "; W4 dequantize + cuBLAS path " +
                         (o.dequant_scratch_mb > 0 ? "on (" + std::to_string(o.dequant_scratch_mb) + " MB scratch)" : "off") + "\n\nDecode (per step, all sequences):\n\n" +
                         md_decode + "\nPrefill (one sequence):\n\n" + md_prefill +
                         (md_breakdown.empty() ? "" : "\nDecode step breakdown (each op timed alone, outside the graph):\n" + md_breakdown) +
                         "\nModels:\n\n" + md_models;
  return {md, out.dump(1) + "\n"};
}
#endif

}  // namespace spear
