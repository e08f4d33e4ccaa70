#pragma once
// Runs one validated completion or chat request against the engine and writes the
// HTTP answer: a JSON body, or an SSE stream of chunks ending in `data: [DONE]`.
// Token ids become text through a StreamDecoder per choice (UTF-8-safe), stop
// strings are matched on that text (held back until they cannot be a stop), and a
// client that goes away cancels its engine requests, which frees their KV blocks.
#include <atomic>
#include <cstdint>
#include <string>
#include <vector>

#include "server/chat_template.h"
#include "server/generation_defaults.h"
#include "server/protocol.h"

namespace httplib {
struct Request;
struct Response;
}  // namespace httplib

namespace spear {
class Engine;
class Tokenizer;
}  // namespace spear

namespace spear::server {

class Metrics;

// What a loaded model offers the request handlers.
struct ServeState {
  const Tokenizer* tok = nullptr;
  Engine* engine = nullptr;
  ChatTemplate tmpl = ChatTemplate::plain();
  std::string model_name;
  std::vector<int32_t> chat_stop_ids;  // e.g. the template's end-of-turn token
  ProtocolLimits limits;
  GenerationDefaults defaults;  // generation_config.json: used where a request omits a field
  int retry_after_s = 1;
};

// Throws ApiError for failures before anything is sent (429 queue full, 400, 503).
// `cancel` (the server is shutting down) ends the request: a stream with an error
// event and [DONE], a JSON request with a 503.
void run_generation(const ServeState& st, GenSpec spec, const httplib::Request& req,
                    httplib::Response& res, const std::atomic<bool>& cancel);

// The text OpenAI clients see for one token (logprobs `tokens` entries).
std::string token_text(const Tokenizer& tok, int32_t id);

}  // namespace spear::server
