#include "server/tokenize_api.h"

#include "core/error.h"
#include "server/api_error.h"
#include "server/json_fields.h"
#include "tokenizer/tokenizer.h"

namespace spear::server {

using nlohmann::json;

namespace {

std::vector<int32_t> encode(const Tokenizer& tok, const std::string& text, bool special, const char* param) {
  try {
    return tok.encode(text, special);
  } catch (const Error& e) {
    throw bad_field(param, std::string("cannot tokenize '") + param + "': " + e.what());
  }
}

}  // namespace

json tokenize_response(const json& body, const Tokenizer& tok, const ChatTemplate& tmpl,
                       const ProtocolLimits& lim, std::string* model) {
  Fields f(body);
  const bool chat = f.has("messages");
  if (chat && f.has("prompt")) throw bad_field("prompt", "give either 'prompt' or 'messages', not both");
  if (chat)
    check_known_fields(body, {"model", "messages", "add_generation_prompt", "continue_final_message",
                              "add_special_tokens", "return_token_strs"},
                       lim);
  else
    check_known_fields(body, {"model", "prompt", "add_special_tokens", "return_token_strs"}, lim);
  if (auto m = f.string("model", 256)) *model = *m;
  const bool strs = f.boolean("return_token_strs").value_or(false);
  std::vector<int32_t> ids;
  if (chat) {
    if (f.boolean("continue_final_message").value_or(false))
      throw ApiError(400, "'continue_final_message' is not supported by this server", "invalid_request_error",
                     "unsupported_parameter", "continue_final_message");
    std::vector<ChatMessage> conv = parse_messages(f.raw("messages"), lim);
    const bool gen = f.boolean("add_generation_prompt").value_or(true);
    std::string text;
    try {
      text = tmpl.render(conv, gen);
    } catch (const std::exception& e) {
      throw bad_field("messages", std::string("the chat template rejected the messages: ") + e.what());
    }
    ids = encode(tok, text, f.boolean("add_special_tokens").value_or(tmpl.encode_with_special_tokens()), "messages");
  } else {
    auto prompt = f.string("prompt", static_cast<size_t>(-1));
    if (!prompt)
      throw ApiError(400, "'prompt' (a string) or 'messages' is required", "invalid_request_error",
                     "missing_required_parameter", "prompt");
    check_prompt_bytes(prompt->size(), lim, "prompt");
    ids = encode(tok, *prompt, f.boolean("add_special_tokens").value_or(true), "prompt");
  }
  json token_strs = nullptr;
  if (strs) {
    token_strs = json::array();
    for (int32_t id : ids) {
      try {
        token_strs.push_back(tok.id_to_token(id));
      } catch (const Error&) {
        token_strs.push_back("");
      }
    }
  }
  return {{"count", ids.size()}, {"max_model_len", lim.max_model_len}, {"tokens", ids}, {"token_strs", token_strs}};
}

json detokenize_response(const json& body, const Tokenizer& tok, const ProtocolLimits& lim, std::string* model) {
  check_known_fields(body, {"model", "tokens"}, lim);
  Fields f(body);
  if (auto m = f.string("model", 256)) *model = *m;
  const json* t = f.raw("tokens");
  if (!t || t->is_null())
    throw ApiError(400, "'tokens' is required", "invalid_request_error", "missing_required_parameter", "tokens");
  // The body limit bounds the list; the ids must be in the vocabulary.
  std::vector<int32_t> ids = parse_token_ids(*t, "tokens", lim, int64_t{1} << 24, true);
  std::string text;
  try {
    text = tok.decode(ids, false);
  } catch (const Error& e) {
    throw bad_field("tokens", std::string("cannot decode 'tokens': ") + e.what());
  }
  return {{"prompt", text}};
}

}  // namespace spear::server
