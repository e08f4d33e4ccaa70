#include "server/protocol.h"

#include <algorithm>
#include <limits>
#include <random>

#include "core/error.h"
#include "server/api_error.h"
#include "server/json_fields.h"
#include "tokenizer/tokenizer.h"

namespace spear::server {

namespace {

using nlohmann::json;

ApiError unsupported(const std::string& param, const std::string& what) {
  return ApiError(400, what + " is not supported by this server", "invalid_request_error",
                  "unsupported_parameter", param);
}

// The fields each endpoint reads. Anything else is unknown (see check_fields).
const char* const kCommonFields[] = {
    "model", "temperature", "top_p", "top_k", "min_p", "seed", "n", "best_of", "presence_penalty",
    "frequency_penalty", "repetition_penalty", "logit_bias", "user", "stop", "stop_token_ids", "stream",
    "stream_options", "ignore_eos",
    // Known and refused unless harmless (unsupported_parameter, on both endpoints):
    "tools", "functions", "tool_choice", "parallel_tool_calls", "response_format",
    "guided_json", "guided_regex", "guided_choice", "guided_grammar"};
const char* const kCompletionFields[] = {"prompt", "max_tokens", "suffix", "echo", "logprobs"};
const char* const kChatFields[] = {"messages", "max_tokens", "max_completion_tokens", "logprobs",
                                   "top_logprobs"};

// Refuses (or, with allow_unknown_fields, ignores) every field neither list names.
template <size_t N>
void check_fields(const json& body, const char* const (&own)[N], const ProtocolLimits& lim) {
  if (lim.allow_unknown_fields) return;
  for (auto it = body.begin(); it != body.end(); ++it) {
    const std::string& k = it.key();
    auto is = [&k](const char* f) { return k == f; };
    if (std::any_of(std::begin(kCommonFields), std::end(kCommonFields), is) ||
        std::any_of(std::begin(own), std::end(own), is))
      continue;
    throw ApiError(400,
                   "unrecognized request argument '" + k +
                       "' (the server refuses fields it does not implement; start it with "
                       "--allow-unknown-fields to ignore them)",
                   "invalid_request_error", "unknown_parameter", k);
  }
}

// Fields that would change the result if ignored: refused on both endpoints.
void refuse_unsupported(const Fields& f) {
  for (const char* k : {"tools", "functions"})
    if (const json* t = f.raw(k); t && !(t->is_array() && t->empty())) throw unsupported(k, std::string("'") + k + "'");
  // Without tools, "none" and "auto" both mean no tool call.
  if (const json* tc = f.raw("tool_choice"); tc && !(tc->is_string() && (*tc == "none" || *tc == "auto")))
    throw unsupported("tool_choice", "'tool_choice' other than \"none\" or \"auto\"");
  if (const json* p = f.raw("parallel_tool_calls"); p && !p->is_boolean())
    throw bad_field("parallel_tool_calls", "'parallel_tool_calls' must be a boolean");
  if (const json* rf = f.raw("response_format")) {
    if (!rf->is_object() || !rf->contains("type") || !(*rf)["type"].is_string())
      throw bad_field("response_format", "'response_format' must be an object with a 'type'");
    if ((*rf)["type"] != "text") throw unsupported("response_format", "response_format other than 'text'");
  }
  for (const char* k : {"guided_json", "guided_regex", "guided_choice", "guided_grammar"})
    if (f.raw(k)) throw unsupported(k, std::string("guided decoding ('") + k + "')");
}


uint64_t random_seed() {
  static thread_local std::mt19937_64 rng([] {
    std::random_device rd;
    return (static_cast<uint64_t>(rd()) << 32) ^ rd();
  }());
  return rng();
}

// Fields both endpoints share.
void parse_common(const Fields& f, GenSpec& g, const ProtocolLimits& lim, const GenerationDefaults& d) {
  if (auto m = f.string("model", 256)) g.model = *m;
  SamplingParams& sp = g.sampling;
  sp.temperature = static_cast<float>(d.temperature.value_or(1.0));  // OpenAI's default; 0 = greedy
  if (auto t = f.number("temperature", 0.0, 2.0)) sp.temperature = static_cast<float>(*t);
  if (d.top_p) sp.top_p = static_cast<float>(*d.top_p);
  if (auto p = f.number("top_p", 0.0, 1.0)) {
    if (*p <= 0) throw bad_field("top_p", "'top_p' must be in (0, 1]");
    sp.top_p = static_cast<float>(*p);
  }
  if (d.top_k) sp.top_k = *d.top_k;
  if (auto k = f.integer("top_k", -1, 1 << 20)) sp.top_k = *k < 0 ? 0 : *k;
  if (d.min_p) sp.min_p = static_cast<float>(*d.min_p);
  if (auto m = f.number("min_p", 0.0, 1.0)) sp.min_p = static_cast<float>(*m);
  if (auto p = f.number("presence_penalty", -2.0, 2.0)) sp.presence_penalty = static_cast<float>(*p);
  if (auto p = f.number("frequency_penalty", -2.0, 2.0)) sp.frequency_penalty = static_cast<float>(*p);
  if (d.repetition_penalty) sp.repetition_penalty = static_cast<float>(*d.repetition_penalty);
  if (auto r = f.number("repetition_penalty", 0.0, 10.0)) {
    if (*r <= 0) throw bad_field("repetition_penalty", "'repetition_penalty' must be in (0, 10]");
    sp.repetition_penalty = static_cast<float>(*r);
  }
  if (auto n = f.integer("n", 1, lim.max_n)) g.n = *n;
  if (auto b = f.integer("best_of", 1, lim.max_n)) {
    if (*b < g.n) throw bad_field("best_of", "'best_of' must be at least 'n'");
    if (*b != g.n) throw unsupported("best_of", "'best_of' greater than 'n'");
  }
  // Choice j of each prompt samples from its own stream: seed + j when a seed is given
  // (vLLM's n), a fresh random seed otherwise (N identical requests give N answers).
  const auto seed =
      f.integer("seed", std::numeric_limits<int64_t>::min(), std::numeric_limits<int64_t>::max());
  for (int64_t j = 0; j < g.n; ++j)
    g.seeds.push_back(seed ? static_cast<uint64_t>(*seed) + static_cast<uint64_t>(j) : random_seed());
  sp.seed = g.seeds[0];
  if (const json* lb = f.raw("logit_bias")) {
    if (!lb->is_object()) throw bad_field("logit_bias", "'logit_bias' must be an object");
    if (!lb->empty()) throw unsupported("logit_bias", "'logit_bias'");
  }
  if (auto u = f.string("user", 1 << 12)) (void)u;
  g.stop = f.string_or_list("stop", lim.max_stop, lim.max_stop_len);
  if (const json* st = f.raw("stop_token_ids"); st && !st->is_null())
    g.stop_token_ids = parse_token_ids(*st, "stop_token_ids", lim, lim.max_stop_token_ids, true);
  g.stream = f.boolean("stream").value_or(false);
  if (const json* so = f.raw("stream_options")) {
    if (!so->is_object()) throw bad_field("stream_options", "'stream_options' must be an object");
    if (!g.stream)
      throw bad_field("stream_options", "'stream_options' is only allowed when 'stream' is true");
    g.include_usage = Fields(*so).boolean("include_usage").value_or(false);
  }
  g.ignore_eos = f.boolean("ignore_eos").value_or(false);
  refuse_unsupported(f);
}

// prompts x n choices, at most lim.max_choices.
void check_choices(const GenSpec& g, const ProtocolLimits& lim) {
  const int64_t choices = static_cast<int64_t>(g.prompts.size()) * g.n;
  if (choices > lim.max_choices)
    throw bad_field("n", "the request asks for " + std::to_string(choices) +
                             " choices (prompts x n); at most " + std::to_string(lim.max_choices) +
                             " per request");
}

std::vector<int32_t> encode_text(const Tokenizer& tok, const std::string& text, bool special,
                                 const std::string& param) {
  try {
    return tok.encode(text, special);
  } catch (const Error& e) {
    throw bad_field(param, std::string("cannot tokenize '") + param + "': " + e.what());
  }
}

// Context checks shared by both endpoints; sets the default max_tokens.
void fit_context(GenSpec& g, std::optional<int64_t> max_tokens, int64_t default_max,
                 const ProtocolLimits& lim) {
  size_t longest = 0;
  for (const auto& p : g.prompts) {
    if (p.empty()) throw bad_field("prompt", "the prompt is empty");
    longest = std::max(longest, p.size());
  }
  const int64_t n = static_cast<int64_t>(longest);
  const int64_t need_gen = max_tokens ? *max_tokens : 1;
  if (n + std::min<int64_t>(need_gen, 1) > lim.max_model_len || n > lim.max_model_len)
    throw ApiError(400,
                   "this model's maximum context length is " + std::to_string(lim.max_model_len) +
                       " tokens, but the prompt has " + std::to_string(n) + " tokens" +
                       (need_gen > 0 ? " (and at least one must be generated)" : ""),
                   "invalid_request_error", "context_length_exceeded", g.chat ? "messages" : "prompt");
  if (max_tokens) {
    if (n + *max_tokens > lim.max_model_len)
      throw ApiError(400,
                     "this model's maximum context length is " + std::to_string(lim.max_model_len) +
                         " tokens; the prompt (" + std::to_string(n) + " tokens) plus max_tokens (" +
                         std::to_string(*max_tokens) + ") exceeds it",
                     "invalid_request_error", "context_length_exceeded", "max_tokens");
    g.max_tokens = *max_tokens;
  } else {
    g.max_tokens = std::min<int64_t>(default_max, lim.max_model_len - n);
  }
}

}  // namespace

std::vector<int32_t> parse_token_ids(const json& a, const std::string& param, const ProtocolLimits& lim,
                                     int64_t max, bool allow_empty) {
  if (!a.is_array()) throw bad_field(param, "'" + param + "' must be a list of token ids");
  if (a.empty() && !allow_empty) throw bad_field(param, "'" + param + "' must not be empty");
  if (static_cast<int64_t>(a.size()) > max) {
    if (param == "prompt")
      throw ApiError(400, "this model's maximum context length is " + std::to_string(lim.max_model_len) +
                              " tokens, but the prompt has " + std::to_string(a.size()),
                     "invalid_request_error", "context_length_exceeded", param);
    throw bad_field(param, "'" + param + "' holds at most " + std::to_string(max) + " token ids");
  }
  std::vector<int32_t> ids;
  ids.reserve(a.size());
  for (const json& v : a) {
    if (!v.is_number_integer() && !v.is_number_float())
      throw bad_field(param, "'" + param + "' must hold integers (token ids)");
    ids.push_back(static_cast<int32_t>(as_integer(v, param, 0, lim.vocab_size - 1)));
  }
  return ids;
}

// A prompt whose bytes cannot fit the context is refused before the tokenizer runs.
void check_prompt_bytes(size_t bytes, const ProtocolLimits& lim, const char* param) {
  if (lim.max_prompt_bytes > 0 && bytes > static_cast<size_t>(lim.max_prompt_bytes))
    throw ApiError(400,
                   "the prompt is " + std::to_string(bytes) + " bytes; no text that long fits this model's " +
                       std::to_string(lim.max_model_len) + "-token context (at most " +
                       std::to_string(lim.max_prompt_bytes) + " bytes are tokenized)",
                   "invalid_request_error", "context_length_exceeded", param);
}

void check_known_fields(const json& body, const std::vector<std::string>& known, const ProtocolLimits& lim) {
  if (lim.allow_unknown_fields) return;
  for (auto it = body.begin(); it != body.end(); ++it)
    if (std::find(known.begin(), known.end(), it.key()) == known.end())
      throw ApiError(400,
                     "unrecognized request argument '" + it.key() +
                         "' (the server refuses fields it does not implement; start it with "
                         "--allow-unknown-fields to ignore them)",
                     "invalid_request_error", "unknown_parameter", it.key());
}

int64_t prompt_byte_bound(const Tokenizer& tok, int64_t max_model_len) {
  size_t longest = 1;
  for (int32_t id = 0; id < tok.vocab_size(); ++id) {
    try {
      longest = std::max(longest, tok.id_to_token(id).size());
    } catch (const Error&) {  // a hole in the ids
    }
  }
  return 2 * max_model_len * static_cast<int64_t>(longest);
}

GenSpec parse_completion_request(const json& body, const Tokenizer& tok, const ProtocolLimits& lim,
                                 const GenerationDefaults& defaults) {
  check_fields(body, kCompletionFields, lim);
  Fields f(body);
  GenSpec g;
  parse_common(f, g, lim, defaults);
  if (auto s = f.string("suffix", 1 << 16); s && !s->empty()) throw unsupported("suffix", "'suffix'");
  g.echo = f.boolean("echo").value_or(false);
  if (auto lp = f.integer("logprobs", 0, lim.max_logprobs)) g.logprobs = static_cast<int>(*lp);
  const json* p = f.raw("prompt");
  if (!p) throw ApiError(400, "'prompt' is required", "invalid_request_error", "missing_required_parameter", "prompt");
  {  // every text prompt's bytes, before any is tokenized
    size_t bytes = 0;
    if (p->is_string()) bytes = p->get_ref<const std::string&>().size();
    else if (p->is_array())
      for (const json& e : *p)
        if (e.is_string()) bytes = std::max(bytes, e.get_ref<const std::string&>().size());
    check_prompt_bytes(bytes, lim, "prompt");
  }
  if (p->is_string()) {
    g.prompts.push_back(encode_text(tok, p->get<std::string>(), true, "prompt"));
  } else if (p->is_array()) {
    if (p->empty()) throw bad_field("prompt", "'prompt' must not be empty");
    const json& first = (*p)[0];
    if (first.is_number()) {
      g.prompts.push_back(parse_token_ids(*p, "prompt", lim, lim.max_model_len, false));
    } else {
      if (static_cast<int64_t>(p->size()) > lim.max_prompts)
        throw bad_field("prompt", "at most " + std::to_string(lim.max_prompts) + " prompts per request");
      for (const json& e : *p) {
        if (e.is_string()) g.prompts.push_back(encode_text(tok, e.get<std::string>(), true, "prompt"));
        else if (e.is_array()) g.prompts.push_back(parse_token_ids(e, "prompt", lim, lim.max_model_len, false));
        else throw bad_field("prompt", "'prompt' must be a string, a list of strings, a list of token ids, or a list of token-id lists");
      }
    }
  } else {
    throw bad_field("prompt", "'prompt' must be a string, a list of strings, a list of token ids, or a list of token-id lists");
  }
  auto mt = f.integer("max_tokens", 0, lim.max_model_len);
  if (mt && *mt == 0 && !g.echo)
    throw bad_field("max_tokens", "'max_tokens' may be 0 only with 'echo': true (prompt scoring)");
  check_choices(g, lim);
  fit_context(g, mt, defaults.max_new_tokens.value_or(16), lim);
  if (g.stream && static_cast<int64_t>(g.prompts.size()) * g.n > 1 && g.echo)
    throw unsupported("echo", "'echo' with several streamed choices");
  return g;
}

std::vector<ChatMessage> parse_messages(const json* msgs, const ProtocolLimits& lim) {
  if (!msgs) throw ApiError(400, "'messages' is required", "invalid_request_error", "missing_required_parameter", "messages");
  if (!msgs->is_array() || msgs->empty()) throw bad_field("messages", "'messages' must be a non-empty list");
  if (static_cast<int64_t>(msgs->size()) > lim.max_messages)
    throw bad_field("messages", "at most " + std::to_string(lim.max_messages) + " messages");
  std::vector<ChatMessage> conv;
  size_t content_bytes = 0;
  for (size_t i = 0; i < msgs->size(); ++i) {
    const json& m = (*msgs)[i];
    const std::string where = "messages[" + std::to_string(i) + "]";
    if (!m.is_object()) throw bad_field(where, where + " must be an object");
    auto role = Fields(m).string("role", 64);
    if (!role) throw bad_field(where + ".role", where + ".role is required");
    if (*role != "system" && *role != "user" && *role != "assistant" && *role != "developer" && *role != "tool")
      throw bad_field(where + ".role", where + ".role must be one of system, developer, user, assistant, tool");
    ChatMessage cm{*role == "developer" ? "system" : *role, ""};
    auto c = m.find("content");
    if (c == m.end() || c->is_null()) {
      if (*role != "assistant") throw bad_field(where + ".content", where + ".content is required");
    } else if (c->is_string()) {
      cm.content = c->get<std::string>();
    } else if (c->is_array()) {
      for (const json& part : *c) {
        if (!part.is_object() || !part.contains("type") || !part["type"].is_string())
          throw bad_field(where + ".content", "content parts must be objects with a 'type'");
        if (part["type"] != "text") throw unsupported(where + ".content", "content of type '" + part["type"].get<std::string>() + "'");
        if (!part.contains("text") || !part["text"].is_string())
          throw bad_field(where + ".content", "a text content part needs a string 'text'");
        cm.content += part["text"].get<std::string>();
      }
    } else {
      throw bad_field(where + ".content", where + ".content must be a string or a list of parts");
    }
    content_bytes += cm.content.size();
    check_prompt_bytes(content_bytes, lim, "messages");
    conv.push_back(std::move(cm));
  }
  return conv;
}

GenSpec parse_chat_request(const json& body, const Tokenizer& tok, const ChatTemplate& tmpl,
                           const ProtocolLimits& lim, const GenerationDefaults& defaults) {
  check_fields(body, kChatFields, lim);
  Fields f(body);
  GenSpec g;
  g.chat = true;
  parse_common(f, g, lim, defaults);
  if (auto lp = f.boolean("logprobs"); lp && *lp) g.logprobs = 0;
  if (auto top = f.integer("top_logprobs", 0, lim.max_logprobs)) {
    if (g.logprobs < 0) throw bad_field("top_logprobs", "'top_logprobs' needs 'logprobs': true");
    g.logprobs = static_cast<int>(*top);
  }
  std::vector<ChatMessage> conv = parse_messages(f.raw("messages"), lim);
  std::string text;
  try {
    text = tmpl.render(conv, true);
  } catch (const std::exception& e) {
    throw bad_field("messages", std::string("the chat template rejected the messages: ") + e.what());
  }
  g.prompts.push_back(encode_text(tok, text, tmpl.encode_with_special_tokens(), "messages"));
  auto mt = f.integer("max_completion_tokens", 1, lim.max_model_len);
  if (!mt) mt = f.integer("max_tokens", 1, lim.max_model_len);
  check_choices(g, lim);
  fit_context(g, mt, defaults.max_new_tokens.value_or(lim.max_model_len), lim);
  return g;
}

}  // namespace spear::server
