#pragma once
// The GPU Llama engine (issue 6): the same forward pass as src/model/llama.h, on one
// CUDA device. Residual stream float32, matrix activations and KV cache fp16, linear
// layers as FP16 (cuBLAS), W4 (the W4A16 dispatcher, src/cuda/w4a16.h) or W4 with an
// Error Compensator — fused into the W4 kernel, or as separate launches ("naive":
// W4 GEMM, z = x Aᵀ, the gate, y += s Bᵀ).
//
// Built from the model description (model/weights.h: an HF directory or a .spear
// artifact; 16-bit tensors go up straight from the mapped file, 4-bit modules are
// repacked to the GPU layout one at a time) or, for bench-latency, from a config alone
// with random weights made on the GPU. No CPU model is involved.
//
// KV cache: paged (block_size positions per block, one pool per layer); sequences are
// "slots" 0..max_batch-1 that own blocks from a free list. Decode steps (every chunk one
// token) run as CUDA graphs, one per batch size, captured on first use.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "cuda/sampling.h"
#include "io/model_config.h"

namespace spear {
struct LlamaWeights;
}

namespace spear::cuda {

// How EC modules run. kDispatch: the W4A16 dispatcher's fused or split kernel (every gate
// calibration produces: static, per-coordinate, full r×r); kNaive: separate launches
// (z = x Aᵀ, the gate, y += s Bᵀ), kept as the comparison.
enum class EcPath { kDispatch, kNaive };

struct GpuOptions {
  int device = 0;
  int max_batch = 8;        // sequences (slots)
  int max_tokens = 2048;    // tokens in one forward call
  int max_len = 0;          // positions per sequence; 0 = the model's context
  int block_size = 16;
  int64_t kv_blocks = 0;    // 0: from gpu_memory_fraction, or max_batch full-length sequences
  double gpu_memory_fraction = 0;  // > 0: the KV cache takes what is left under this share
  EcPath ec_path = EcPath::kDispatch;
  bool graphs = true;       // CUDA graphs for decode steps
  // Q|K|V and Gate|Up as one GEMM each over their stacked weights (and stacked ECs); off:
  // one GEMM per module (the comparison in tests and bench-latency --no-fuse).
  bool fuse_projections = true;
  bool autotune = false;    // autotune the W4 kernels for each shape (and M bucket) on first use
  bool save_tuning = true;  // with autotune: write the dispatcher's table to its cache file
                            // ($SPEAR_W4A16_CACHE or ~/.cache/spear/w4a16-<GPU>.txt) after
                            // each new shape, so later runs start tuned
  // Scratch for the W4 GEMMs' dequantize + cuBLAS path (prefill-sized M): the largest
  // module's expanded rows up to this cap (then in chunks); 0 = that path off.
  int dequant_scratch_mb = 256;
  bool verbose = false;
};

// Bytes on the device, by use (reported at load and by `spear info --device cuda`).
struct GpuMemory {
  int64_t weights = 0;      // linear layers (fp16 or packed W4 + scales + zeros), embeddings, head, norms
  int64_t ec = 0;           // EC factors and gates
  int64_t kv_cache = 0;
  int64_t activations = 0;  // scratch buffers, logits, workspaces
  int64_t total() const { return weights + ec + kv_cache + activations; }
  std::string str() const;
};

// Synthetic models for bench-latency.
enum class WeightKind { kFp16, kW4, kW4Ec };
struct SyntheticSpec {
  WeightKind kind = WeightKind::kW4;
  int group = 0;            // W4: 0 per channel, else 128
  double ec_budget = 0.01;  // EC bytes / quantized-model bytes
  int ec_rank = 32;
  bool ec_full_gate = false;  // calibration's r×r gate instead of the per-coordinate one
  uint64_t seed = 1;
};
// Architectures by name: spear::named_config (io/model_config.h).

struct GpuChunk {
  int slot = 0;             // which sequence (distinct per call, < max_batch)
  const int32_t* tokens = nullptr;
  int n_tokens = 0;
  int start_pos = 0;        // positions [start_pos, start_pos + n_tokens)
  bool all_logits = false;
  // Optional: the sequence's block table from a caller that manages blocks itself (the
  // serving engine's pool, same block size, ids < kv_blocks_total()). Then the slot's
  // own blocks and length are not used.
  const int32_t* blocks = nullptr;
  int n_blocks = 0;
};

// Where a decode step's time goes (bench-latency --breakdown). Each op of the step is timed
// on its own, outside the graph: the step is queued behind a spin kernel (so host launch
// time does not count) with an event before every op; ops of one name are summed per step.
// Beside it, the same step as its CUDA graph (where launches overlap: programmatic
// dependent launch of the W4 kernels). Times are medians over the repetitions.
struct StepProfile {
  struct Op {
    std::string name;  // "gemm q|k|v", "attention", "add + rmsnorm", ... in order of first use
    int calls = 0;     // per step
    double us = 0;     // per step
  };
  std::vector<Op> ops;
  double sum_us = 0;    // of the ops
  double graph_us = 0;  // the graph step
};

class GpuModel {
 public:
  // Uploads a model description. Throws spear::Error for what the GPU path cannot run
  // (bits other than 4, no CUDA device) or when memory runs out. `w` may be dropped
  // (its mapping closed) once this returns.
  static std::unique_ptr<GpuModel> create(const LlamaWeights& w, const GpuOptions& opt);
  static std::unique_ptr<GpuModel> synthetic(const ModelConfig& cfg, const SyntheticSpec& spec,
                                             const GpuOptions& opt);
  ~GpuModel();
  GpuModel(const GpuModel&) = delete;
  GpuModel& operator=(const GpuModel&) = delete;

  const ModelConfig& config() const;
  const GpuMemory& memory() const;
  const GpuOptions& options() const;
  int64_t kv_blocks_free() const;
  int64_t kv_blocks_total() const;
  // Turns the Error Compensators off and on (the serving cost model measures their share).
  void set_ec_enabled(bool on);
  std::string describe() const;  // one line per kind of linear: "q_proj: w4-pc-asym x 16 (+ec r=32 x 4)"

  // Frees a slot's blocks (a new sequence may then use it from position 0).
  void reset(int slot);
  // Pretends positions [0, n) of a slot are cached (random K/V already there), for
  // decode timing at a given context without a prefill.
  void fake_context(int slot, int n);

  // Runs the chunks as one batch; allocates blocks for new positions (throws when the
  // pool is exhausted). Logits rows: per chunk, n_tokens rows (all_logits) or one row;
  // returns the device pointer of those (rows, vocab) float32 logits, valid until the
  // next call.
  const float* forward(std::span<const GpuChunk> chunks);
  int last_rows() const;
  // GPU time of the last forward() (inputs uploaded to logits ready), in seconds; waits for
  // it to finish. -1 before the first.
  double last_forward_device_seconds() const;
  // Copies the last logits to the host (rows * vocab floats).
  void logits_to_host(float* dst) const;
  // Greedy ids for the last logits rows (argmax on the device).
  std::vector<int32_t> argmax_last() const;
  // One token per last logits row, drawn on the device (cuda/sampling.h: greedy rows are
  // the argmax); only the ids come back. Overwrites the sampled rows' logits.
  std::vector<int32_t> sample_last(std::span<const RowSampling> rows);
  // Sum of -log p(target) over the last logits rows (row i scored against targets[i];
  // -1 skips), on the device. Returns nats.
  double nll_last(const std::vector<int32_t>& targets) const;

  // One decode step for slots 0..B-1 at their current lengths, each fed token `tok`,
  // through the decode graph for B (captured on first use). Returns nothing; for timing.
  void decode_step_bench(int B, int32_t tok);
  // The breakdown of that step (slots as for decode_step_bench), plus greedy sampling
  // (argmax) of its logits as one more op.
  StepProfile profile_decode_step(int B, int32_t tok, int reps = 10);
  void synchronize() const;

  struct Impl;

 private:
  explicit GpuModel(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// The bandwidth ceiling: a device-to-device copy of `bytes` (read + write), best of a few
// runs, in GB/s (1e9 bytes per second).
double measure_copy_bandwidth_gbs(size_t bytes, int device = 0);

// True when a CUDA device is usable (for --device cuda errors and test skips).
bool cuda_available(std::string* why = nullptr);

}  // namespace spear::cuda
