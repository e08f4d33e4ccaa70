#pragma once
// The OpenAI request bodies spear accepts, validated into one GenSpec. Every field
// is type- and range-checked; a field spear does not implement is refused with a
// clear 400 rather than silently ignored when ignoring it would change the result
// (best_of other than n, logit_bias, tools, JSON response formats, guided decoding).
// One policy for every other field on both endpoints: a field neither endpoint
// knows is refused (400, code unknown_parameter, naming it) unless the server runs
// with --allow-unknown-fields, which ignores it instead.
// Defaults as OpenAI's: temperature 1 (0 = greedy), a fresh random seed per choice
// when none is given (a given seed is reproducible: choice j of each prompt samples
// with seed + j, as vLLM's n); the model's generation_config.json defaults
// (GenerationDefaults) replace OpenAI's where present.
// A text prompt whose byte length cannot fit the context is refused before it is
// tokenized (ProtocolLimits::max_prompt_bytes); the exact token count is checked after.
//
// POST /v1/completions: prompt (a string, a list of strings, a list of token ids,
//   or a list of token-id lists), max_tokens (default 16), temperature, top_p,
//   top_k*, min_p*, presence_penalty, frequency_penalty, repetition_penalty*, seed,
//   stop, stop_token_ids*, stream, stream_options.include_usage, echo, logprobs (0-20),
//   ignore_eos*, n (choices per prompt), best_of (= n), user, model.
// POST /v1/chat/completions: messages (role system/developer/user/assistant/tool;
//   content a string or text parts), max_tokens / max_completion_tokens (default:
//   the rest of the context), temperature, top_p, top_k*, min_p*, presence_penalty,
//   frequency_penalty, repetition_penalty*, seed, stop, stop_token_ids*, stream,
//   stream_options, logprobs (bool), top_logprobs (0-20), ignore_eos*,
//   response_format {"type": "text"}, n, user, model.
// (* = extensions, as in vLLM.)
#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "engine/sampler.h"
#include "server/chat_template.h"
#include "server/generation_defaults.h"

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
  int64_t max_n = 128;            // choices per prompt
  int64_t max_choices = 128;      // prompts x n in one request
  int64_t max_stop_token_ids = 64;
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
  std::vector<std::vector<int32_t>> prompts;  // token ids per prompt
  int64_t n = 1;                              // choices per prompt
  int64_t max_tokens = 16;
  SamplingParams sampling;                    // .seed: seeds[0]
  std::vector<uint64_t> seeds;                // per choice j of a prompt (n entries)
  std::vector<std::string> stop;
  std::vector<int32_t> stop_token_ids;        // finish ("stop") on these; their text is not shown
  bool stream = false, include_usage = false;
  bool echo = false;      // completions: prefix the prompt (and its logprobs)
  int logprobs = -1;      // -1: none; k >= 0: chosen token + top k
  bool ignore_eos = false;
};

// Throw ApiError on any invalid field. `tok` encodes text prompts and messages.
GenSpec parse_completion_request(const nlohmann::json& body, const Tokenizer& tok,
                                 const ProtocolLimits& lim, const GenerationDefaults& defaults = {});
GenSpec parse_chat_request(const nlohmann::json& body, const Tokenizer& tok,
                           const ChatTemplate& tmpl, const ProtocolLimits& lim,
                           const GenerationDefaults& defaults = {});

// The `messages` of a chat request (also /tokenize's): roles checked ("developer" is
// "system"), content strings or text parts joined, the total bounded by
// lim.max_prompt_bytes. Throws ApiError naming the bad entry.
std::vector<ChatMessage> parse_messages(const nlohmann::json* messages, const ProtocolLimits& lim);

// Refuses (400, context_length_exceeded) a text prompt of more than
// lim.max_prompt_bytes bytes, before it is tokenized.
void check_prompt_bytes(size_t bytes, const ProtocolLimits& lim, const char* param);

// Refuses (or, with lim.allow_unknown_fields, ignores) every field of `body` that is
// not in `known`: 400, code unknown_parameter, naming the field.
void check_known_fields(const nlohmann::json& body, const std::vector<std::string>& known,
                        const ProtocolLimits& lim);

// A JSON list of token ids, each in [0, lim.vocab_size); `max` entries at most.
std::vector<int32_t> parse_token_ids(const nlohmann::json& a, const std::string& param,
                                     const ProtocolLimits& lim, int64_t max, bool allow_empty);

}  // namespace spear::server
