#include "tokenizer/normalizer.h"

#include <vector>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "tokenizer/pattern.h"
#include "tokenizer/utf8.h"

namespace spear::tok {
namespace {

using nlohmann::json;

class SequenceNormalizer final : public Normalizer {
 public:
  explicit SequenceNormalizer(std::vector<std::unique_ptr<Normalizer>> steps) : steps_(std::move(steps)) {}
  std::string normalize(std::string text) const override {
    // Real normalizers grow text a few times at most; a malformed chain of
    // replacements (each tripling it, say) must fail instead of exhausting memory.
    const size_t limit = 16 * text.size() + (size_t(1) << 20);
    for (const auto& step : steps_) {
      text = step->normalize(std::move(text));
      SPEAR_CHECK(text.size() <= limit, "tokenizer: the normalizers grow the text implausibly (malformed normalizer?)");
    }
    return text;
  }

 private:
  std::vector<std::unique_ptr<Normalizer>> steps_;
};

class PrependNormalizer final : public Normalizer {
 public:
  explicit PrependNormalizer(std::string prefix) : prefix_(std::move(prefix)) {}
  // tokenizers prepends only to non-empty text.
  std::string normalize(std::string text) const override { return text.empty() ? text : prefix_ + text; }

 private:
  std::string prefix_;
};

class ReplaceNormalizer final : public Normalizer {
 public:
  ReplaceNormalizer(Regex pattern, std::string content) : pattern_(std::move(pattern)), content_(std::move(content)) {}
  std::string normalize(std::string text) const override { return replace_all(pattern_, text, content_); }

 private:
  Regex pattern_;
  std::string content_;
};

class StripNormalizer final : public Normalizer {
 public:
  StripNormalizer(bool left, bool right) : left_(left), right_(right) {}
  std::string normalize(std::string text) const override {
    size_t begin = 0, end = text.size();
    if (left_) {
      while (begin < end && is_unicode_whitespace(utf8_decode_at(text, begin))) begin += utf8_char_len(text, begin);
    }
    if (right_) {
      while (end > begin) {
        size_t last = end - 1;
        while (last > begin && (static_cast<unsigned char>(text[last]) & 0xC0) == 0x80) --last;
        if (!is_unicode_whitespace(utf8_decode_at(text, last))) break;
        end = last;
      }
    }
    return text.substr(begin, end - begin);
  }

 private:
  bool left_, right_;
};

std::string required_string(const json& spec, const char* key, const std::string& type) {
  auto it = spec.find(key);
  SPEAR_CHECK(it != spec.end() && it->is_string(),
              "tokenizer.json: normalizer " + type + " needs a string \"" + key + "\"");
  return it->get<std::string>();
}

}  // namespace

std::unique_ptr<Normalizer> make_normalizer(const json& spec) {
  if (spec.is_null()) return nullptr;
  SPEAR_CHECK(spec.is_object() && spec.contains("type") && spec["type"].is_string(),
              "tokenizer.json: normalizer must be an object with a \"type\"");
  const std::string type = spec["type"].get<std::string>();
  if (type == "Sequence") {
    SPEAR_CHECK(spec.contains("normalizers") && spec["normalizers"].is_array(),
                "tokenizer.json: Sequence normalizer needs a \"normalizers\" array");
    std::vector<std::unique_ptr<Normalizer>> steps;
    for (const json& step : spec["normalizers"]) {
      if (auto n = make_normalizer(step)) steps.push_back(std::move(n));
    }
    return std::make_unique<SequenceNormalizer>(std::move(steps));
  }
  if (type == "Prepend") return std::make_unique<PrependNormalizer>(required_string(spec, "prepend", type));
  if (type == "Replace") {
    SPEAR_CHECK(spec.contains("pattern"), "tokenizer.json: Replace normalizer needs a \"pattern\"");
    return std::make_unique<ReplaceNormalizer>(make_pattern(spec["pattern"], "Replace normalizer"),
                                               required_string(spec, "content", type));
  }
  if (type == "Strip") {
    return std::make_unique<StripNormalizer>(spec.value("strip_left", true), spec.value("strip_right", true));
  }
  throw Error("tokenizer.json: unsupported normalizer type \"" + type +
              "\" (spear supports Sequence, Prepend, Replace, Strip)");
}

}  // namespace spear::tok
