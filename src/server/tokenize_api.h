#pragma once
// POST /tokenize and POST /detokenize, with vLLM's request and response shapes.
//
// /tokenize, a text:  {"prompt": "...", "add_special_tokens": true, "return_token_strs": false}
//           a chat:   {"messages": [...], "add_generation_prompt": true,
//                      "add_special_tokens": <as chat encodes>, "return_token_strs": false}
//   -> {"count": N, "max_model_len": M, "tokens": [ids], "token_strs": [pieces] | null}
//   The messages are rendered with the server's chat template and encoded exactly as
//   /v1/chat/completions encodes them (special tokens added only for the plain
//   template, unless add_special_tokens says otherwise). The empty text is the BOS
//   token alone where the tokenizer adds one, as everywhere else.
// /detokenize: {"tokens": [ids]} -> {"prompt": "text"} (special tokens kept, as
//   Hugging Face's decode).
// Both take "model" (checked by the caller) and follow the unknown-field policy.
#include <nlohmann/json.hpp>

#include "server/chat_template.h"
#include "server/protocol.h"

namespace spear {
class Tokenizer;
}

namespace spear::server {

// Throw ApiError on any invalid field. *model gets the requested model ("" if none).
nlohmann::json tokenize_response(const nlohmann::json& body, const Tokenizer& tok,
                                 const ChatTemplate& tmpl, const ProtocolLimits& lim,
                                 std::string* model);
nlohmann::json detokenize_response(const nlohmann::json& body, const Tokenizer& tok,
                                   const ProtocolLimits& lim, std::string* model);

}  // namespace spear::server
