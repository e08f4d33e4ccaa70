#include "tokenizer/post_processor.h"

#include <sstream>
#include <string>

#include <nlohmann/json.hpp>

#include "core/error.h"

namespace spear::tok {
namespace {

using nlohmann::json;

class SequencePostProcessor final : public PostProcessor {
 public:
  explicit SequencePostProcessor(std::vector<std::unique_ptr<PostProcessor>> steps) : steps_(std::move(steps)) {}
  std::vector<int32_t> process(std::vector<int32_t> ids) const override {
    for (const auto& step : steps_) ids = step->process(std::move(ids));
    return ids;
  }

 private:
  std::vector<std::unique_ptr<PostProcessor>> steps_;
};

class IdentityPostProcessor final : public PostProcessor {
 public:
  std::vector<int32_t> process(std::vector<int32_t> ids) const override { return ids; }
};

// The single-sequence template flattened to: ids before, the sequence, ids after.
class TemplatePostProcessor final : public PostProcessor {
 public:
  TemplatePostProcessor(std::vector<int32_t> before, std::vector<int32_t> after)
      : before_(std::move(before)), after_(std::move(after)) {}
  std::vector<int32_t> process(std::vector<int32_t> ids) const override {
    std::vector<int32_t> out;
    out.reserve(before_.size() + ids.size() + after_.size());
    out.insert(out.end(), before_.begin(), before_.end());
    out.insert(out.end(), ids.begin(), ids.end());
    out.insert(out.end(), after_.begin(), after_.end());
    return out;
  }

 private:
  std::vector<int32_t> before_, after_;
};

// A template piece: the input sequence or a named special token. Accepts the
// object form tokenizers writes ({"Sequence": {"id": "A"}} / {"SpecialToken":
// {"id": "<s>"}}) and the string form ("$A", "$0", "<s>", each optionally ":type").
struct TemplatePiece {
  bool is_sequence;
  std::string name;  // "A"/"B" for sequences, the special token's key otherwise
};

TemplatePiece parse_template_piece(const json& piece) {
  if (piece.is_string()) {
    std::string s = piece.get<std::string>();
    if (const size_t colon = s.rfind(':'); colon != std::string::npos && colon > 0) s.resize(colon);
    if (s == "$" || s == "$A" || s == "$a" || s == "$0") return {true, "A"};
    if (s == "$B" || s == "$b" || s == "$1") return {true, "B"};
    return {false, s};
  }
  SPEAR_CHECK(piece.is_object() && piece.size() == 1, "tokenizer.json: malformed TemplateProcessing piece");
  const std::string kind = piece.begin().key();
  const json& body = piece.begin().value();
  SPEAR_CHECK(body.is_object() && body.contains("id") && body["id"].is_string(),
              "tokenizer.json: TemplateProcessing piece \"" + kind + "\" needs a string \"id\"");
  if (kind == "Sequence") return {true, body["id"].get<std::string>()};
  SPEAR_CHECK(kind == "SpecialToken", "tokenizer.json: unknown TemplateProcessing piece \"" + kind + "\"");
  return {false, body["id"].get<std::string>()};
}

std::unique_ptr<PostProcessor> make_template(const json& spec) {
  SPEAR_CHECK(spec.contains("single"), "tokenizer.json: TemplateProcessing needs \"single\"");
  std::vector<TemplatePiece> pieces;
  const json& single = spec["single"];
  if (single.is_string()) {  // "[CLS] $A [SEP]"
    std::istringstream words(single.get<std::string>());
    for (std::string w; words >> w;) pieces.push_back(parse_template_piece(json(w)));
  } else {
    SPEAR_CHECK(single.is_array(), "tokenizer.json: TemplateProcessing \"single\" must be a list");
    for (const json& p : single) pieces.push_back(parse_template_piece(p));
  }
  const json empty = json::object();
  const json& specials = spec.contains("special_tokens") ? spec["special_tokens"] : empty;
  SPEAR_CHECK(specials.is_object(), "tokenizer.json: TemplateProcessing \"special_tokens\" must be an object");

  std::vector<int32_t> before, after;
  bool seen_sequence = false;
  for (const TemplatePiece& p : pieces) {
    if (p.is_sequence) {
      SPEAR_CHECK(p.name == "A", "tokenizer.json: the single-sequence template may only use sequence A");
      SPEAR_CHECK(!seen_sequence, "tokenizer.json: the single-sequence template uses $A twice");
      seen_sequence = true;
      continue;
    }
    SPEAR_CHECK(specials.contains(p.name) && specials[p.name].contains("ids") && specials[p.name]["ids"].is_array(),
                "tokenizer.json: TemplateProcessing uses special token \"" + p.name +
                    "\" that special_tokens does not define");
    for (const json& id : specials[p.name]["ids"]) {
      SPEAR_CHECK(id.is_number_integer() && id.get<int64_t>() >= 0 && id.get<int64_t>() <= INT32_MAX,
                  "tokenizer.json: special token \"" + p.name + "\" has an invalid id");
      (seen_sequence ? after : before).push_back(id.get<int32_t>());
    }
  }
  SPEAR_CHECK(seen_sequence, "tokenizer.json: the single-sequence template lacks $A");
  return std::make_unique<TemplatePostProcessor>(std::move(before), std::move(after));
}

// RobertaProcessing/BertProcessing store "cls": ["<s>", 0] and "sep": ["</s>", 2].
int32_t special_pair_id(const json& spec, const char* key, const std::string& type) {
  SPEAR_CHECK(spec.contains(key) && spec[key].is_array() && spec[key].size() == 2 &&
                  spec[key][1].is_number_integer() && spec[key][1].get<int64_t>() >= 0,
              "tokenizer.json: " + type + " needs \"" + key + "\": [token, id]");
  return spec[key][1].get<int32_t>();
}

}  // namespace

std::unique_ptr<PostProcessor> make_post_processor(const json& spec) {
  if (spec.is_null()) return nullptr;
  SPEAR_CHECK(spec.is_object() && spec.contains("type") && spec["type"].is_string(),
              "tokenizer.json: post_processor must be an object with a \"type\"");
  const std::string type = spec["type"].get<std::string>();
  if (type == "TemplateProcessing") return make_template(spec);
  if (type == "ByteLevel") return std::make_unique<IdentityPostProcessor>();
  if (type == "RobertaProcessing" || type == "BertProcessing") {
    return std::make_unique<TemplatePostProcessor>(std::vector<int32_t>{special_pair_id(spec, "cls", type)},
                                                   std::vector<int32_t>{special_pair_id(spec, "sep", type)});
  }
  if (type == "Sequence") {
    SPEAR_CHECK(spec.contains("processors") && spec["processors"].is_array(),
                "tokenizer.json: Sequence post_processor needs a \"processors\" array");
    std::vector<std::unique_ptr<PostProcessor>> steps;
    for (const json& step : spec["processors"]) {
      if (auto p = make_post_processor(step)) steps.push_back(std::move(p));
    }
    return std::make_unique<SequencePostProcessor>(std::move(steps));
  }
  throw Error("tokenizer.json: unsupported post_processor type \"" + type +
              "\" (spear supports TemplateProcessing, RobertaProcessing, BertProcessing, ByteLevel, Sequence)");
}

}  // namespace spear::tok
