#pragma once
// Single-sequence generation: prefill the prompt, then decode token by token,
// streaming each new id to a callback as soon as it is chosen.
#include <cstdint>
#include <functional>
#include <vector>

#include "engine/sampler.h"
#include "model/llama.h"

namespace spear {

struct GenerateOptions {
  int64_t max_new_tokens = 64;
  SamplingParams sampling;
  bool stop_at_eos = true;
  // Called with each generated id; return false to stop early.
  std::function<bool(int32_t id)> on_token;
};

struct GenerateResult {
  std::vector<int32_t> ids;  // generated ids only (no prompt)
  double prefill_seconds = 0, decode_seconds = 0;
  bool stopped_at_eos = false;
};

GenerateResult generate(const LlamaModel& model, const std::vector<int32_t>& prompt,
                        const GenerateOptions& opt);

// The same loop over any backend: step(tokens, n, start_pos, logits) runs positions
// [start_pos, start_pos + n) of the one sequence and writes the last one's logits
// (vocab_size floats). The GPU engine plugs in here.
using StepFn = std::function<void(const int32_t* tokens, int64_t n, int64_t start_pos, float* logits)>;
GenerateResult generate_with(const ModelConfig& cfg, const StepFn& step, const std::vector<int32_t>& prompt,
                             const GenerateOptions& opt);

}  // namespace spear
