#pragma once
// The fuzz entry points, shared by the libFuzzer targets (fuzz/fuzz_*.cpp) and the
// corpus replay that runs in every ctest (tests/test_fuzz_smoke.cpp).
//
// Each feeds arbitrary bytes to one parser. spear::Error is how spear refuses bad
// input, so it is swallowed; anything else escaping (another exception type, a
// crash, a sanitizer report) is a finding. Broken invariants on accepted input
// throw std::logic_error for the same reason.
#include <unistd.h>

#include <cctype>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <memory>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "io/model_config.h"
#include "io/safetensors.h"
#include "model/spear_artifact.h"
#include "server/api_error.h"
#include "server/chat_template.h"
#include "server/generation_defaults.h"
#include "server/jinja.h"
#include "server/json_fields.h"
#include "server/protocol.h"
#include "server/request_framer.h"
#include "server/tokenize_api.h"
#include "tokenizer/tokenizer.h"

#ifndef SPEAR_SOURCE_DIR
#error "define SPEAR_SOURCE_DIR (the repository root): the request target reads models/stories260K-hf"
#endif

namespace spear::fuzz {

inline void check(bool ok, const char* what) {
  if (!ok) throw std::logic_error(std::string("fuzz invariant broken: ") + what);
}

inline void safetensors_one(const uint8_t* data, size_t size) {
  try {
    auto f = SafetensorsFile::parse(data, size, "fuzz-input");
    // Read every byte the parser vouched for, so ASan checks that each range lies
    // inside the input; and convert small float tensors.
    uint64_t sum = 0, covered = 0;
    for (const TensorView& t : f->tensors()) {
      check(f->find(t.name) == &t, "find() returns the listed tensor");
      check(t.data >= data && t.nbytes <= size && t.data - data <= static_cast<ptrdiff_t>(size - t.nbytes),
            "tensor data inside the input");
      check(t.numel() >= 0 && static_cast<uint64_t>(t.numel()) * dtype_size(t.dtype) == t.nbytes,
            "numel * dtype size == nbytes");
      for (size_t i = 0; i < t.nbytes; ++i) sum += t.data[i];
      covered += t.nbytes;
      if ((t.dtype == DType::F32 || t.dtype == DType::F16 || t.dtype == DType::BF16) &&
          t.numel() <= (int64_t{1} << 16)) {
        std::vector<float> v = to_f32(t);
        check(v.size() == static_cast<size_t>(t.numel()), "to_f32 size");
      }
    }
    check(covered <= size, "tensors fit in the input");
    volatile uint64_t sink = sum;
    (void)sink;
  } catch (const Error&) {
  }
}

inline void config_one(const uint8_t* data, size_t size) {
  try {
    ModelConfig c =
        ModelConfig::from_json_text(std::string_view(reinterpret_cast<const char*>(data), size));
    (void)c.num_parameters();
    (void)c.q_dim();
    (void)c.kv_dim();
    // An accepted config must survive its own serialization: a refusal here is a bug
    // too, so it is not swallowed.
    nlohmann::json j = c.to_json();
    ModelConfig d;
    try {
      d = ModelConfig::from_json(j);
    } catch (const Error& e) {
      throw std::logic_error(std::string("config from to_json() refused: ") + e.what());
    }
    check(d.vocab_size == c.vocab_size && d.hidden_size == c.hidden_size &&
              d.num_layers == c.num_layers && d.num_heads == c.num_heads &&
              d.num_kv_heads == c.num_kv_heads && d.head_dim == c.head_dim &&
              d.rope.type == c.rope.type,
          "config to_json/from_json round trip");
  } catch (const Error&) {
  }
}

inline void tokenizer_one(const uint8_t* data, size_t size) {
  try {
    Tokenizer tok =
        Tokenizer::from_json(std::string_view(reinterpret_cast<const char*>(data), size));
    // Covers ASCII, digits, a contraction, multi-byte UTF-8, newlines and a special token.
    static constexpr std::string_view kText =
        "Hello world! It's 2024\n  caf\xc3\xa9 \xe2\x80\x94 \xf0\x9f\x99\x82<|begin_of_text|><s> x";
    for (bool special : {true, false}) {
      std::vector<int32_t> ids = tok.encode(kText, special);
      for (int32_t id : ids) (void)tok.is_special(id);
      (void)tok.decode(ids, true);
      (void)tok.decode(ids, false);
    }
    (void)tok.vocab_size();
    (void)tok.bos_id();
  } catch (const Error&) {
  }
}

// --- the HTTP request bodies (POST /v1/completions, /v1/chat/completions, /tokenize,
// /detokenize) ---------------------------------------------------------------------
//
// The input is a request body. It goes through parse_body, as every POST does (with a
// small budget for its parsed size), and
// the resulting object through all four endpoints' validators: each refuses the
// fields it does not know, so for any body at most one or two get far, but the
// fuzzer is free to find the one. A refusal is an ApiError (a 400 to the client);
// an accepted GenSpec must honour the limits it was validated against.

struct RequestContext {
  Tokenizer tok;
  server::ChatTemplate jinja_tmpl, plain_tmpl;
  server::ProtocolLimits lim;
  server::GenerationDefaults defaults;
};

inline std::string read_text_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in.good()) throw std::runtime_error("fuzz: cannot read " + path);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

// A Llama-2 style template (alternation enforced with raise_exception, system folded
// into the first user turn) exercises more of the renderer than ChatML would.
inline constexpr const char* kRequestChatTemplate =
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}"
    "{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}";

inline const RequestContext& request_context() {
  static const RequestContext* ctx = [] {
    auto* c = new RequestContext{
        Tokenizer::from_json(read_text_file(std::string(SPEAR_SOURCE_DIR) +
                                            "/models/stories260K-hf/tokenizer.json")),
        server::ChatTemplate::from_jinja(kRequestChatTemplate, "<s>", "</s>"),
        server::ChatTemplate::plain(), server::ProtocolLimits{}, server::GenerationDefaults{}};
    // Small limits, so that the fuzzer reaches every bound with short inputs.
    c->lim.max_model_len = 64;
    c->lim.vocab_size = c->tok.vocab_size();
    c->lim.max_prompts = 8;
    c->lim.max_messages = 16;
    c->lim.max_stop = 4;
    c->lim.max_stop_len = 32;
    c->lim.max_n = 8;
    c->lim.max_choices = 16;
    c->lim.max_stop_token_ids = 8;
    c->lim.max_prompt_bytes = server::prompt_byte_bound(c->tok, c->lim.max_model_len);
    c->defaults = server::GenerationDefaults::from_json_text(
        R"({"temperature": 0.7, "top_p": 0.9, "top_k": 40, "repetition_penalty": 1.1})");
    return c;
  }();
  return *ctx;
}

inline void check_genspec(const server::GenSpec& g, const server::ProtocolLimits& lim) {
  check(!g.prompts.empty(), "a request has a prompt");
  check(g.n >= 1 && g.n <= lim.max_n, "1 <= n <= max_n");
  check(static_cast<int64_t>(g.prompts.size()) * g.n <= lim.max_choices, "prompts x n <= max_choices");
  check(static_cast<int64_t>(g.seeds.size()) == g.n, "one seed per choice");
  check(g.sampling.seed == g.seeds[0], "sampling.seed is the first choice's");
  check(g.max_tokens >= 0, "max_tokens >= 0");
  for (const auto& p : g.prompts) {
    check(!p.empty(), "no empty prompt");
    check(static_cast<int64_t>(p.size()) + g.max_tokens <= lim.max_model_len,
          "prompt + max_tokens fit the context");
    for (int32_t id : p) check(id >= 0 && id < lim.vocab_size, "prompt ids in the vocabulary");
  }
  for (int32_t id : g.stop_token_ids)
    check(id >= 0 && id < lim.vocab_size, "stop_token_ids in the vocabulary");
  check(static_cast<int64_t>(g.stop.size()) <= lim.max_stop, "at most max_stop stops");
  for (const auto& s : g.stop) check(static_cast<int64_t>(s.size()) <= lim.max_stop_len, "stop length");
  check(g.logprobs >= -1 && g.logprobs <= lim.max_logprobs, "logprobs in [-1, max_logprobs]");
  const SamplingParams& sp = g.sampling;
  check(sp.temperature >= 0 && sp.temperature <= 2, "temperature in [0, 2]");
  check(sp.top_p > 0 && sp.top_p <= 1, "top_p in (0, 1]");
  check(sp.min_p >= 0 && sp.min_p <= 1, "min_p in [0, 1]");
  check(sp.top_k >= 0, "top_k >= 0");
  check(sp.repetition_penalty > 0 && sp.repetition_penalty <= 10, "repetition_penalty in (0, 10]");
  check(sp.presence_penalty >= -2 && sp.presence_penalty <= 2, "presence_penalty in [-2, 2]");
  check(sp.frequency_penalty >= -2 && sp.frequency_penalty <= 2, "frequency_penalty in [-2, 2]");
  check(!g.include_usage || g.stream, "include_usage only when streaming");
}

inline void request_one(const uint8_t* data, size_t size) {
  const RequestContext& ctx = request_context();
  nlohmann::json body;
  try {
    // A 16 KiB budget for the parsed form, so that the fuzzer reaches the 413 too, and
    // strings bounded as the server bounds them.
    body = server::parse_body(std::string_view(reinterpret_cast<const char*>(data), size), 64, 16 << 10,
                              static_cast<size_t>(ctx.lim.max_prompt_bytes));
  } catch (const server::ApiError& e) {
    check(e.status() == 400 || e.status() == 413, "a body that does not parse is a 400 (413: too big parsed)");
    return;
  }
  check(body.is_object(), "parse_body returns an object");
  // Both policies for unknown fields: the lenient one lets the fuzzer past the field
  // check with any extra key.
  for (bool lenient : {false, true}) {
    server::ProtocolLimits lim = ctx.lim;
    lim.allow_unknown_fields = lenient;
    auto refused = [](const server::ApiError& e) {
      check(e.status() >= 400 && e.status() < 500, "a refusal is a 4xx");
      (void)e.to_json().dump();  // what the client gets
    };
    try {
      check_genspec(server::parse_completion_request(body, ctx.tok, lim, ctx.defaults), lim);
    } catch (const server::ApiError& e) {
      refused(e);
    }
    for (const server::ChatTemplate* t : {&ctx.jinja_tmpl, &ctx.plain_tmpl}) {
      try {
        server::GenSpec g = server::parse_chat_request(body, ctx.tok, *t, lim, ctx.defaults);
        check(g.chat, "a chat GenSpec is marked chat");
        check(g.prompts.size() == 1, "a chat has one prompt");
        check_genspec(g, lim);
      } catch (const server::ApiError& e) {
        refused(e);
      }
      try {
        std::string model;
        nlohmann::json r = server::tokenize_response(body, ctx.tok, *t, lim, &model);
        check(r.is_object() && r.contains("tokens") && r["tokens"].is_array(), "/tokenize answers tokens");
        (void)r.dump();
      } catch (const server::ApiError& e) {
        refused(e);
      }
    }
    try {
      std::string model;
      (void)server::detokenize_response(body, ctx.tok, lim, &model).dump();
    } catch (const server::ApiError& e) {
      refused(e);
    }
  }
}

// --- the Jinja chat-template renderer ----------------------------------------------
//
// Templates come from model files (tokenizer_config.json, a .spear artifact's copy,
// --chat-template FILE). The input is the template text, optionally followed by a
// NUL byte and a JSON list of messages (a request's "messages"; a fixed conversation
// when absent or refused). Loading runs ChatTemplate::from_jinja as the server does
// (parse, then the sample conversations); then the messages are rendered with and
// without the generation prompt. A refusal is std::runtime_error ("jinja: ..." from
// the parser or renderer, jinja::Raised from raise_exception, spear's ApiError for
// bad messages); any other exception escaping is a finding.

inline void chat_template_one(const uint8_t* data, size_t size) {
  const std::string_view in(reinterpret_cast<const char*>(data), size);
  const size_t nul = in.find('\0');
  const std::string source(in.substr(0, nul));
  std::vector<server::ChatMessage> msgs = {
      {"system", "Be brief."}, {"user", "Hi"}, {"assistant", "Hello."}, {"user", "Bye"}};
  if (nul != std::string_view::npos) {
    server::ProtocolLimits lim;
    lim.max_messages = 64;
    lim.max_prompt_bytes = 1 << 16;
    nlohmann::json j = nlohmann::json::parse(in.substr(nul + 1), nullptr, /*allow_exceptions=*/false);
    try {
      if (!j.is_discarded()) msgs = server::parse_messages(&j, lim);
    } catch (const server::ApiError&) {
    }
  }
  server::ChatTemplate t;
  try {
    t = server::ChatTemplate::from_jinja(source, "<s>", "</s>");
  } catch (const std::runtime_error&) {
    return;
  }
  check(t.is_jinja(), "from_jinja gives a Jinja template");
  for (bool gen : {true, false}) {
    try {
      const std::string out = t.render(msgs, gen);
      check(out.size() <= (size_t{16} << 20) + (size_t{1} << 20), "output within the 16 MiB cap");
    } catch (const std::runtime_error&) {
    }
  }
}

// --- the .spear artifact reader ----------------------------------------------------
//
// The input is a whole .spear file. It goes through SafetensorsFile::parse and then
// every check read_spear makes (metadata keys, format, version, the "spear" JSON
// document and its module table, config, every tensor's name, dtype, shape and
// values, EC shapes) except the SHA-256 comparison, which a fuzzer cannot get past.
// An accepted artifact's embedded tokenizer_config.json and generation_config.json
// are then read as `spear serve` reads them.

inline void spear_one(const uint8_t* data, size_t size) {
  try {
    auto f = SafetensorsFile::parse(data, size, "fuzz-input");
    SpearArtifact a = read_spear(f, "fuzz-input", /*verify_hash=*/false);
    check(a.quant_model_bytes() > 0, "an accepted artifact has bytes");
    check(a.ec_bytes() >= 0 && a.ec_count() >= 0, "EC totals are non-negative");
    for (int64_t l = 0; l < a.config().num_layers; ++l)
      for (Module m : kAllModules) check(a.at(l, m).quant.has_value(), "every module quantized");
    std::string note;
    (void)server::GenerationDefaults::from_json_text(a.generation_config_json, &note);
    (void)server::ChatTemplate::from_tokenizer_config(a.tokenizer_config_json, &note);
  } catch (const Error&) {
  }
}

// --- model.safetensors.index.json ------------------------------------------------------
//
// The input is the text of an index. parse_safetensors_index checks it (JSON, the
// weight_map, each shard name lexically); an accepted index is then written into a
// fixture directory and opened with TensorStore::open, which resolves each shard on
// disk: the fixture holds two real shards (one in a subdirectory), a shard that is
// not a safetensors file, a directory named like a shard, a symlink to a shard inside
// and one to a file outside the directory.

class IndexFixture {
 public:
  IndexFixture() {
    namespace fs = std::filesystem;
    static int counter = 0;
    root_ = fs::temp_directory_path() /
            ("spear_fuzz_index_" + std::to_string(::getpid()) + "_" + std::to_string(counter++));
    fs::remove_all(root_);
    dir_ = root_ / "model";
    fs::create_directories(dir_ / "sub");
    fs::create_directories(dir_ / "dir.safetensors");
    const float f32[2] = {1.0f, -2.0f};
    const uint16_t half[3] = {0x3c00, 0xc000, 0x0000};
    write_safetensors((dir_ / "a.safetensors").string(),
                      {{"a.x", DType::F32, {2}, f32}, {"a.y", DType::F16, {1, 2}, half}}, {});
    write_safetensors((dir_ / "sub" / "b.safetensors").string(), {{"b.z", DType::BF16, {3}, half}},
                      {{"format", "pt"}});
    write_safetensors((root_ / "outside.safetensors").string(), {{"o.w", DType::F32, {2}, f32}}, {});
    std::ofstream((dir_ / "bad.safetensors").string()) << "not a safetensors file";
    fs::create_symlink("a.safetensors", dir_ / "link-in.safetensors");
    fs::create_symlink("../outside.safetensors", dir_ / "link-out.safetensors");
    index_ = (dir_ / "model.safetensors.index.json").string();
  }
  ~IndexFixture() {
    std::error_code ec;
    std::filesystem::remove_all(root_, ec);
  }
  IndexFixture(const IndexFixture&) = delete;
  IndexFixture& operator=(const IndexFixture&) = delete;
  const std::string& index_path() const { return index_; }

 private:
  std::filesystem::path root_, dir_;
  std::string index_;
};

inline void safetensors_index_one(const uint8_t* data, size_t size) {
  static IndexFixture fixture;  // removed at exit
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  SafetensorsIndex idx;
  try {
    idx = parse_safetensors_index(text, "fuzz-input");
  } catch (const Error&) {
    return;
  }
  size_t listed = 0;
  for (const auto& [shard, names] : idx) {
    check(!shard.empty() && shard[0] != '/', "shards are relative");
    check(!names.empty(), "each shard holds a tensor");
    for (const auto& part : std::filesystem::path(shard)) check(part != "..", "no '..' in a shard");
    listed += names.size();
  }
  check(listed > 0, "an accepted index lists a tensor");
  {
    std::ofstream out(fixture.index_path(), std::ios::binary | std::ios::trunc);
    out.write(text.data(), static_cast<std::streamsize>(text.size()));
  }
  try {
    TensorStore s = TensorStore::open(fixture.index_path());
    for (const auto& [shard, names] : idx)
      for (const auto& n : names) check(s.has(n) && s.get(n).name == n, "every listed tensor is found");
    check(s.names().size() >= listed, "the store holds what the index lists");
  } catch (const Error&) {
  }
}

// --- the HTTP request framer (server/request_framer.h) --------------------------------
//
// The input is the byte stream of one connection. It is framed twice, once fed whole
// and once in small pieces (sizes from the input's first byte), with small limits so
// that every bound is reachable; both must cut the same requests and fail the same
// way. Each framed request must be plain framing: a head ending in "Content-Length:
// N\r\n\r\n" followed by exactly N body bytes, N within the body limit.

struct FramedOutcome {
  std::vector<std::string> requests;
  int error_status = 0;
  std::string error_code;
  bool operator==(const FramedOutcome&) const = default;
};

inline FramedOutcome frame_stream(std::string_view stream, size_t piece,
                                  const server::FramingLimits& lim) {
  FramedOutcome out;
  server::RequestFramer fr(lim);
  std::string buf;
  size_t pos = 0;
  for (int guard = 0; guard < 1 << 20; ++guard) {
    server::RequestFramer::State st = fr.feed(buf);
    if (st == server::RequestFramer::State::Error) {
      check(fr.status() >= 400 && fr.status() < 600, "an error status is 4xx or 5xx");
      out.error_status = fr.status();
      out.error_code = fr.code();
      return out;
    }
    if (st == server::RequestFramer::State::Complete) {
      std::string r = fr.take_request();
      const size_t head_end = r.find("\r\n\r\n");
      check(head_end != std::string::npos, "a framed request has a head");
      const std::string head = r.substr(0, head_end + 2);
      const std::string cl = "Content-Length: ";
      const size_t at = head.rfind(cl);
      check(at != std::string::npos, "a framed request ends its head with Content-Length");
      const size_t n = std::stoull(head.substr(at + cl.size()));
      check(r.size() - head_end - 4 == n, "exactly Content-Length body bytes");
      check(n <= lim.max_body_bytes, "the body within the limit");
      // Every header line handed on is "token: value" without control characters, and
      // none but the last frames the body (cpp-httplib must not see a second framing).
      size_t ls = head.find("\r\n") + 2;
      while (ls < at) {
        const size_t le = head.find("\r\n", ls);
        const std::string line = head.substr(ls, le - ls);
        const size_t colon = line.find(':');
        check(colon != std::string::npos && colon > 0, "a header line has a name");
        std::string name = line.substr(0, colon);
        for (char& ch : name) {
          const unsigned char u = static_cast<unsigned char>(ch);
          check(u > 0x20 && u < 0x7f && ch != '(' && ch != ')' && ch != ',' && ch != '/' && ch != ':' &&
                    ch != ';' && ch != '<' && ch != '=' && ch != '>' && ch != '?' && ch != '@' &&
                    ch != '[' && ch != '\\' && ch != ']' && ch != '{' && ch != '}' && ch != '"',
                "a header name is a token");
          ch = static_cast<char>(std::tolower(u));
        }
        for (unsigned char u : line) check(u >= 0x20 || u == '\t', "no control character in a header");
        check(name != "transfer-encoding" && name != "content-encoding" && name != "content-length" &&
                  name != "expect",
              "no framing header is handed on");
        ls = le + 2;
      }
      out.requests.push_back(std::move(r));
      fr.reset();
      continue;  // a pipelined request may already be in buf
    }
    if (pos >= stream.size()) return out;  // NeedMore and nothing left: the peer stopped
    const size_t take = std::min(piece, stream.size() - pos);
    buf.append(stream.substr(pos, take));
    pos += take;
  }
  throw std::logic_error("fuzz invariant broken: the framer loops without consuming");
}

inline void http_framer_one(const uint8_t* data, size_t size) {
  if (size == 0) return;
  server::FramingLimits lim;
  lim.max_line_bytes = 200;
  lim.max_head_bytes = 600;
  lim.max_headers = 12;
  lim.max_body_bytes = 2000;
  const std::string_view stream(reinterpret_cast<const char*>(data) + 1, size - 1);
  const size_t piece = 1 + data[0] % 17;
  const FramedOutcome whole = frame_stream(stream, stream.size() + 1, lim);
  const FramedOutcome pieces = frame_stream(stream, piece, lim);
  check(whole == pieces, "the same requests and errors however the bytes arrive");
}

}  // namespace spear::fuzz
