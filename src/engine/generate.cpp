#include "engine/generate.h"

#include <algorithm>
#include <chrono>

#include "core/error.h"

namespace spear {

GenerateResult generate(const LlamaModel& model, const std::vector<int32_t>& prompt,
                        const GenerateOptions& opt) {
  const ModelConfig& cfg = model.config();
  const int64_t total = static_cast<int64_t>(prompt.size()) + std::max<int64_t>(opt.max_new_tokens, 0);
  const int64_t capacity = std::max<int64_t>(1, std::min<int64_t>(total, cfg.max_position_embeddings));
  ContiguousKVCache kv(cfg.num_layers, capacity, cfg.kv_dim());
  StepFn step = [&](const int32_t* tokens, int64_t n, int64_t start_pos, float* logits) {
    std::vector<float> l = model.forward(tokens, n, kv, start_pos, false);
    std::copy(l.begin(), l.end(), logits);
  };
  return generate_with(cfg, step, prompt, opt);
}

GenerateResult generate_with(const ModelConfig& cfg, const StepFn& step, const std::vector<int32_t>& prompt,
                             const GenerateOptions& opt) {
  using clock = std::chrono::steady_clock;
  SPEAR_CHECK(!prompt.empty(), "generate: the prompt is empty");
  SPEAR_CHECK(opt.max_new_tokens >= 0, "generate: max_new_tokens must be >= 0");
  const int64_t total = static_cast<int64_t>(prompt.size()) + opt.max_new_tokens;
  SPEAR_CHECK(static_cast<int64_t>(prompt.size()) < cfg.max_position_embeddings,
              "generate: the prompt has " + std::to_string(prompt.size()) +
                  " tokens; the model's context is " + std::to_string(cfg.max_position_embeddings));
  const int64_t capacity = std::min<int64_t>(total, cfg.max_position_embeddings);
  Sampler sampler(opt.sampling);
  GenerateResult res;
  if (opt.max_new_tokens == 0) return res;

  std::vector<float> logits(cfg.vocab_size);
  auto t0 = clock::now();
  step(prompt.data(), static_cast<int64_t>(prompt.size()), 0, logits.data());
  res.prefill_seconds = std::chrono::duration<double>(clock::now() - t0).count();
  t0 = clock::now();
  int64_t pos = static_cast<int64_t>(prompt.size());
  const auto& eos = cfg.eos_token_ids;
  while (true) {
    int32_t id = sampler.sample(logits.data(), cfg.vocab_size, {prompt, res.ids});
    res.ids.push_back(id);
    bool go_on = !opt.on_token || opt.on_token(id);
    if (opt.stop_at_eos && std::find(eos.begin(), eos.end(), id) != eos.end()) {
      res.stopped_at_eos = true;
      break;
    }
    if (!go_on || static_cast<int64_t>(res.ids.size()) >= opt.max_new_tokens || pos >= capacity)
      break;
    step(&id, 1, pos, logits.data());
    ++pos;
  }
  res.decode_seconds = std::chrono::duration<double>(clock::now() - t0).count();
  return res;
}

}  // namespace spear
