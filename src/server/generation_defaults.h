#pragma once
// Sampling defaults from a model's generation_config.json, used when a request
// omits the field (as vLLM does): temperature, top_p, top_k, min_p,
// repetition_penalty and max_new_tokens (the default max_tokens / max_completion_tokens).
// Absent or unusable entries leave OpenAI's defaults (temperature 1, no top-p/top-k/
// min-p cut, no penalty; 16 new tokens on /v1/completions, the rest of the context in
// chat). `do_sample` is ignored, as vLLM ignores it.
#include <cstdint>
#include <optional>
#include <string>

namespace spear::server {

struct GenerationDefaults {
  std::optional<double> temperature, top_p, min_p, repetition_penalty;
  std::optional<int64_t> top_k, max_new_tokens;

  // From the text of a generation_config.json; empty text gives no defaults. An
  // entry of the wrong type or out of range is skipped and named in *note (the rest
  // are kept); text that is not a JSON object gives no defaults and a note.
  static GenerationDefaults from_json_text(const std::string& text, std::string* note = nullptr);
  bool empty() const;
  // "temperature=0.6 top_p=0.9" (or "none").
  std::string describe() const;
};

}  // namespace spear::server
