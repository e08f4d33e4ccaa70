#include "tokenizer/tokenizer.h"

#include <algorithm>
#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "tokenizer/added_vocabulary.h"
#include "tokenizer/bpe.h"
#include "tokenizer/decoder.h"
#include "tokenizer/normalizer.h"
#include "tokenizer/post_processor.h"
#include "tokenizer/pre_tokenizer.h"
#include "tokenizer/utf8.h"

namespace spear {
namespace {

// Real files nest about 6 deep; the component factories recurse into
// Sequences, so a hostile file must not be able to exhaust the stack.
constexpr size_t kMaxJsonDepth = 64;

size_t json_depth(const nlohmann::json& root) {
  size_t max_depth = 0;
  std::vector<std::pair<const nlohmann::json*, size_t>> stack{{&root, 1}};
  while (!stack.empty()) {
    const auto [node, depth] = stack.back();
    stack.pop_back();
    max_depth = std::max(max_depth, depth);
    if (depth > kMaxJsonDepth) break;
    if (node->is_structured()) {
      for (const auto& child : *node) stack.emplace_back(&child, depth + 1);
    }
  }
  return max_depth;
}

}  // namespace

struct Tokenizer::Impl {
  std::unique_ptr<tok::Normalizer> normalizer;
  std::unique_ptr<tok::PreTokenizer> pre_tokenizer;
  std::unique_ptr<tok::BpeModel> model;
  std::unique_ptr<tok::PostProcessor> post_processor;
  std::unique_ptr<tok::Decoder> decoder;
  tok::AddedVocabulary added;
  int32_t bos_id = -1;

  // The string an id decodes from: added tokens first, as tokenizers does.
  const std::string* token_string(int32_t id) const {
    if (const tok::AddedToken* t = added.find(id)) return &t->content;
    return model->id_to_token(id);
  }
};

Tokenizer::Tokenizer() : impl_(std::make_unique<Impl>()) {}
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;
Tokenizer::~Tokenizer() = default;

Tokenizer Tokenizer::from_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  SPEAR_CHECK(in.good(), "tokenizer: cannot open " + path);
  std::ostringstream text;
  text << in.rdbuf();
  SPEAR_CHECK(!in.bad(), "tokenizer: cannot read " + path);
  try {
    return from_json(text.str());
  } catch (const Error& e) {
    throw Error(std::string(e.what()) + " (in " + path + ")");
  }
}

Tokenizer Tokenizer::from_json(std::string_view json_text) {
  using nlohmann::json;
  json root;
  try {
    root = json::parse(json_text.begin(), json_text.end());
  } catch (const json::exception& e) {
    throw Error(std::string("tokenizer.json is not valid JSON: ") + e.what());
  }
  SPEAR_CHECK(root.is_object(), "tokenizer.json: top level must be an object");
  SPEAR_CHECK(json_depth(root) <= kMaxJsonDepth, "tokenizer.json: nested too deeply");
  SPEAR_CHECK(root.contains("model"), "tokenizer.json: \"model\" is missing");
  auto section = [&root](const char* key) -> const json& {
    static const json null_json;
    auto it = root.find(key);
    return it == root.end() ? null_json : *it;
  };

  Tokenizer tok;
  Impl& impl = *tok.impl_;
  try {
    impl.normalizer = tok::make_normalizer(section("normalizer"));
    impl.pre_tokenizer = tok::make_pre_tokenizer(section("pre_tokenizer"));
    impl.model = tok::BpeModel::from_json(root["model"]);
    impl.post_processor = tok::make_post_processor(section("post_processor"));
    impl.decoder = tok::make_decoder(section("decoder"));
    impl.added = tok::AddedVocabulary(section("added_tokens"), impl.normalizer.get());
  } catch (const json::exception& e) {  // a field of the wrong JSON type
    throw Error(std::string("tokenizer.json: malformed field: ") + e.what());
  }
  if (impl.post_processor) {
    // The BOS is whatever the template puts before the sequence; probe with a marker id.
    constexpr int32_t kMarker = -12345;
    const std::vector<int32_t> probe = impl.post_processor->process({kMarker});
    if (!probe.empty() && probe.front() != kMarker) impl.bos_id = probe.front();
  }
  return tok;
}

std::vector<int32_t> Tokenizer::encode(std::string_view text, bool add_special) const {
  if (const size_t bad = tok::find_invalid_utf8(text); bad != tok::kAllValid) {
    throw Error("tokenizer: input text is not valid UTF-8 (byte " + std::to_string(bad) + ")");
  }
  const Impl& impl = *impl_;
  std::vector<int32_t> ids;
  ids.reserve(text.size() / 3 + 4);
  std::vector<tok::PreToken> words;
  for (auto& piece : impl.added.extract_and_normalize(text, impl.normalizer.get())) {
    if (piece.token_id >= 0) {
      ids.push_back(piece.token_id);
      continue;
    }
    words.clear();
    words.push_back({std::move(piece.text), piece.at_text_start});
    if (impl.pre_tokenizer) impl.pre_tokenizer->pre_tokenize(words);
    for (const tok::PreToken& w : words) impl.model->tokenize(w.text, ids);
  }
  if (add_special && impl.post_processor) ids = impl.post_processor->process(std::move(ids));
  return ids;
}

std::string Tokenizer::decode(const std::vector<int32_t>& ids, bool skip_special) const {
  const Impl& impl = *impl_;
  std::vector<std::string> tokens;
  tokens.reserve(ids.size());
  for (int32_t id : ids) {
    if (skip_special && is_special(id)) continue;
    const std::string* s = impl.token_string(id);
    // An id outside the vocabulary decodes to U+FFFD (tokenizers drops it
    // silently, which would hide a bug in the caller).
    tokens.emplace_back(s ? *s : std::string(tok::kReplacementChar));
  }
  if (!impl.decoder) {  // tokenizers joins raw tokens with spaces when there is no decoder
    std::string out;
    for (size_t i = 0; i < tokens.size(); ++i) out += (i ? " " : "") + tokens[i];
    return out;
  }
  impl.decoder->decode_chain(tokens);
  std::string out;
  for (const std::string& t : tokens) out += t;
  return out;
}

int32_t Tokenizer::vocab_size() const { return std::max(impl_->model->max_id(), impl_->added.max_id()) + 1; }

int32_t Tokenizer::bos_id() const { return impl_->bos_id; }

int32_t Tokenizer::token_to_id(std::string_view token) const {
  if (const int32_t id = impl_->added.find(token); id >= 0) return id;
  return impl_->model->token_to_id(token);
}

std::string Tokenizer::id_to_token(int32_t id) const {
  const std::string* s = impl_->token_string(id);
  SPEAR_CHECK(s != nullptr, "tokenizer: token id " + std::to_string(id) + " is not in the vocabulary");
  return *s;
}

bool Tokenizer::is_special(int32_t id) const {
  const tok::AddedToken* t = impl_->added.find(id);
  return t != nullptr && t->special;
}

}  // namespace spear
