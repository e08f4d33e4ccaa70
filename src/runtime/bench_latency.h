#pragma once
// `spear bench-latency`: decode and prefill latency of the GPU engine at real sizes, with
// random weights made on the GPU (no download), for the FP16 engine, W4, W4+EC through
// separate launches (naive) and W4+EC as the dispatcher runs it; beside each, the bytes
// floor (bytes read per step over a bandwidth ceiling measured in the same run).
#include <string>
#include <string_view>
#include <vector>

namespace spear {

// w4ec: per-coordinate gate, fused; w4ec-full: calibration's full r×r gate, fused;
// w4ec-naive: the full gate as separate launches (the comparison).
enum class LatencyVariant { kFp16, kW4, kW4EcNaive, kW4Ec, kW4EcFull };
std::string_view latency_variant_name(LatencyVariant v);  // "fp16", "w4", "w4ec-naive", "w4ec", "w4ec-full"
LatencyVariant parse_latency_variant(std::string_view s);  // throws for other names

struct BenchLatencyOptions {
  std::vector<std::string> configs = {"llama-3.2-1b"};  // named architectures (io/model_config.h named_config)
  std::vector<LatencyVariant> variants;
  std::vector<int> batches, contexts, prefills;
  double ec_budget = 0.01;
  int ec_rank = 32, group = 0, iters = 20;
  bool autotune = false;
  bool fuse = true;  // Q|K|V and Gate|Up as one GEMM each (GpuOptions::fuse_projections)
  // Per decode case, where the step goes: each op timed alone outside the graph, their sum
  // against the graph step (GpuModel::profile_decode_step); with ECs, also without them.
  bool breakdown = false;
  int dequant_scratch_mb = 256;  // GpuOptions::dequant_scratch_mb (0: no dequantize + cuBLAS path)
};

struct BenchLatencyResult {
  std::string markdown;  // the tables
  std::string json;      // every measurement
};
// Throws spear::Error when the build has no CUDA or no GPU is usable.
BenchLatencyResult bench_latency(const BenchLatencyOptions& opt);

}  // namespace spear
