#pragma once
// The OpenAI request bodies spear accepts, validated into one GenSpec. Every field
// is type- and range-checked; a field spear does not implement is refused with a
// clear 400 rather than silently ignored when ignoring it would change the result
// (n > 1, penalties, logit_bias, tools, JSON response formats, guided decoding).
// One policy for every other field on both endpoints: a field neither endpoint
// knows is refused (400, code unknown_parameter, naming it) unless the server runs
// with --allow-unknown-fields, which ignores it instead.
// Defaults as OpenAI's: temperature 1 (0 = greedy), a fresh random seed per request
// when none is given (a given seed is reproducible).
// A text prompt whose byte length cannot fit the context is refused before it is
// tokenized (ProtocolLimits::max_prompt_bytes); the exact token count is checked after.
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
  // A text prompt (each of a request's prompts; a chat's message contents together)
  // longer than this many bytes is refused before tokenizing; 0 = no bound. Set by
  // HttpServer::set_ready from prompt_byte_bound when left 0.
  int64_t max_prompt_bytes = 0;
  bool allow_unknown_fields = false;  // ignore fields spear does not know instead of a 400
};

// A byte length no text of at most max_model_len tokens can exceed: max_model_len times
// the longest token's text (vocabulary and added tokens), doubled for normalizers that
// shorten text. Cheap to check; the precise check runs on the tokens.
int64_t prompt_byte_bound(const Tokenizer& tok, int64_t max_model_len);

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
