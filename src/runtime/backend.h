#pragma once
// Backends built from a model description, on the device asked for. This layer (and only
// this one) knows which devices the build has: commands call it and never test for CUDA.
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "engine/generate.h"
#include "engine/step_model.h"
#include "eval/perplexity.h"
#include "model/weights.h"
#include "runtime/device.h"

namespace spear {

// One sequence at a time: perplexity windows and generation.
class SequenceRunner {
 public:
  virtual ~SequenceRunner() = default;
  virtual const ModelConfig& config() const = 0;
  // The perplexity protocol (eval/perplexity.h). KL against opt.ref_model is computed on
  // the CPU only (a GPU runner reduces the NLL on the device and ignores ref_model).
  virtual PplResult perplexity(const std::vector<int32_t>& ids, const PplOptions& opt) = 0;
  virtual GenerateResult generate(const std::vector<int32_t>& prompt, const GenerateOptions& opt) = 0;
  // "weights ... MiB, KV cache ..." for a device backend; empty on the CPU.
  virtual std::string memory_report() const { return ""; }
};

struct SequenceOptions {
  int64_t max_len = 0;     // positions per sequence; 0 = the model's context
  int64_t max_tokens = 0;  // tokens per forward call; 0 = max_len
  bool graphs = true;      // CUDA graphs for decode steps
  bool autotune = false;   // GPU: time the W4 kernel configs of each shape on first use (saved)
};
std::unique_ptr<SequenceRunner> make_sequence_runner(const LlamaWeights& w, Device d,
                                                     const SequenceOptions& opt);

// The serving engine's step model (engine/step_model.h).
struct ServeDeviceOptions {
  int max_batch = 32;
  int max_tokens = 2048;
  int max_len = 2048;
  int block_size = 16;
  double gpu_memory_fraction = 0.9;
  bool autotune = false;   // as SequenceOptions::autotune
};
std::unique_ptr<StepModel> make_step_model(const LlamaWeights& w, Device d, const ServeDeviceOptions& opt);

}  // namespace spear
