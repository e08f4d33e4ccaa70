#pragma once
// The OpenAI request bodies spear accepts, validated into one GenSpec. Every field
// is type- and range-checked; a field spear does not implement is refused with a
// clear 400 rather than silently ignored when ignoring it would change the result
// (n > 1, penalties, logit_bias, tools, JSON response formats).
//
// POST /v1/completions: prompt (a string, a list of strings, a list of token ids,
//   or a list of token-id lists), max_tokens (default 16), temperature, top_p,
//   top_k*, seed, stop, stream, stream_options.include_usage, echo, logprobs (0-20),
//   ignore_eos*, n = 1, best_of = 1, user, model.
// POST /v1/chat/completions: messages (role system/developer/user/assistant/tool;
//   content a string or text parts), max_tokens / max_completion_tokens (default:
//   the rest of the context), temperature, top_p, top_k*, seed, stop, stream,
//   stream_options, logprobs (bool), top_logprobs (0-20), ignore_eos*,
//   response_format {"type": "text"}, n = 1, user, model.
// (* = extensions, as in vLLM.)
#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "engine/sampler.h"
#include "server/chat_template.h"

namespace spear {
class Tokenizer;
}

namespace spear::server {

struct ProtocolLimits {
  int64_t max_model_len = 2048;
  int64_t vocab_size = 0;
  int64_t max_prompts = 64;       // prompts in one /v1/completions call
  int64_t max_logprobs = 20;
  int64_t max_messages = 1024;
  int64_t max_stop = 16;
  int64_t max_stop_len = 256;
};

struct GenSpec {
  bool chat = false;
  std::string model;                          // as requested (may be empty)
  std::vector<std::vector<int32_t>> prompts;  // token ids per choice
  int64_t max_tokens = 16;
  SamplingParams sampling;
  std::vector<std::string> stop;
  bool stream = false, include_usage = false;
  bool echo = false;      // completions: prefix the prompt (and its logprobs)
  int logprobs = -1;      // -1: none; k >= 0: chosen token + top k
  bool ignore_eos = false;
};

// Throw ApiError on any invalid field. `tok` encodes text prompts and messages.
GenSpec parse_completion_request(const nlohmann::json& body, const Tokenizer& tok,
                                 const ProtocolLimits& lim);
GenSpec parse_chat_request(const nlohmann::json& body, const Tokenizer& tok,
                           const ChatTemplate& tmpl, const ProtocolLimits& lim);

}  // namespace spear::server
