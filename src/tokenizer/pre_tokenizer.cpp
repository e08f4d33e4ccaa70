#include "tokenizer/pre_tokenizer.h"

#include <algorithm>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "tokenizer/byte_level.h"
#include "tokenizer/pattern.h"
#include "tokenizer/regex.h"

namespace spear::tok {
namespace {

using nlohmann::json;

// What happens to the matched delimiters when a piece is split
// (tokenizers' SplitDelimiterBehavior).
enum class Delimiter { Removed, Isolated, MergedWithPrevious, MergedWithNext, Contiguous };

Delimiter parse_delimiter(const std::string& name) {
  if (name == "Removed") return Delimiter::Removed;
  if (name == "Isolated") return Delimiter::Isolated;
  if (name == "MergedWithPrevious") return Delimiter::MergedWithPrevious;
  if (name == "MergedWithNext") return Delimiter::MergedWithNext;
  if (name == "Contiguous") return Delimiter::Contiguous;
  throw Error("tokenizer.json: unknown Split behavior \"" + name + "\"");
}

struct Segment {
  size_t begin, end;
  bool is_match;
};

// tokenizers' NormalizedString::split: the text cut into match / non-match
// segments, then regrouped according to the delimiter behavior.
void split_piece(const PreToken& piece, const Regex& pattern, Delimiter behavior, bool invert,
                 std::vector<PreToken>& out) {
  const std::string& text = piece.text;
  if (text.empty()) return;
  std::vector<Span> matches;
  pattern.find_all(text, matches);
  std::vector<Segment> segments;
  segments.reserve(matches.size() * 2 + 1);
  size_t prev = 0;
  for (const Span& m : matches) {
    if (prev != m.begin) segments.push_back({prev, m.begin, invert});
    segments.push_back({m.begin, m.end, !invert});
    prev = m.end;
  }
  if (prev != text.size()) segments.push_back({prev, text.size(), invert});

  std::vector<Segment> grouped;
  grouped.reserve(segments.size());
  switch (behavior) {
    case Delimiter::Removed:
      for (const Segment& s : segments) {
        if (!s.is_match) grouped.push_back(s);
      }
      break;
    case Delimiter::Isolated:
      grouped = segments;
      break;
    case Delimiter::MergedWithPrevious: {
      bool previous_match = false;
      for (const Segment& s : segments) {
        if (s.is_match && !previous_match && !grouped.empty()) {
          grouped.back().end = s.end;
        } else {
          grouped.push_back(s);
        }
        previous_match = s.is_match;
      }
      break;
    }
    case Delimiter::MergedWithNext: {
      bool next_match = false;  // walking backwards: whether the later segment matched
      for (auto it = segments.rbegin(); it != segments.rend(); ++it) {
        if (it->is_match && !next_match && !grouped.empty()) {
          grouped.back().begin = it->begin;
        } else {
          grouped.push_back(*it);
        }
        next_match = it->is_match;
      }
      std::reverse(grouped.begin(), grouped.end());
      break;
    }
    case Delimiter::Contiguous: {
      bool previous_match = false;
      for (const Segment& s : segments) {
        if (s.is_match == previous_match && !grouped.empty()) {
          grouped.back().end = s.end;
        } else {
          grouped.push_back(s);
        }
        previous_match = s.is_match;
      }
      break;
    }
  }
  for (const Segment& s : grouped) {
    if (s.end > s.begin) out.push_back({text.substr(s.begin, s.end - s.begin), piece.at_text_start && s.begin == 0});
  }
}

class SequencePreTokenizer final : public PreTokenizer {
 public:
  explicit SequencePreTokenizer(std::vector<std::unique_ptr<PreTokenizer>> steps) : steps_(std::move(steps)) {}
  void pre_tokenize(std::vector<PreToken>& pieces) const override {
    for (const auto& step : steps_) step->pre_tokenize(pieces);
  }

 private:
  std::vector<std::unique_ptr<PreTokenizer>> steps_;
};

class SplitPreTokenizer final : public PreTokenizer {
 public:
  SplitPreTokenizer(Regex pattern, Delimiter behavior, bool invert)
      : pattern_(std::move(pattern)), behavior_(behavior), invert_(invert) {}
  void pre_tokenize(std::vector<PreToken>& pieces) const override {
    std::vector<PreToken> out;
    out.reserve(pieces.size());
    for (const PreToken& p : pieces) split_piece(p, pattern_, behavior_, invert_, out);
    pieces = std::move(out);
  }

 private:
  Regex pattern_;
  Delimiter behavior_;
  bool invert_;
};

// GPT-2's pattern, which ByteLevel applies when use_regex is set.
constexpr const char* kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

class ByteLevelPreTokenizer final : public PreTokenizer {
 public:
  ByteLevelPreTokenizer(bool add_prefix_space, bool use_regex) : add_prefix_space_(add_prefix_space) {
    if (use_regex) regex_ = std::make_unique<Regex>(kGpt2Pattern);
  }
  void pre_tokenize(std::vector<PreToken>& pieces) const override {
    std::vector<PreToken> split;
    split.reserve(pieces.size());
    for (PreToken& p : pieces) {
      if (add_prefix_space_ && p.text.rfind(' ', 0) != 0) p.text.insert(0, 1, ' ');
      if (regex_) {
        split_piece(p, *regex_, Delimiter::Isolated, false, split);
      } else {
        split.push_back(std::move(p));
      }
    }
    for (PreToken& p : split) p.text = byte_level_encode(p.text);
    pieces = std::move(split);
  }

 private:
  bool add_prefix_space_;
  std::unique_ptr<Regex> regex_;
};

enum class PrependScheme { Always, First, Never };

class MetaspacePreTokenizer final : public PreTokenizer {
 public:
  MetaspacePreTokenizer(std::string replacement, PrependScheme scheme, bool split)
      : replacement_(std::move(replacement)),
        space_(Regex::literal(" ")),
        delimiter_(Regex::literal(replacement_)),
        scheme_(scheme),
        split_(split) {}
  void pre_tokenize(std::vector<PreToken>& pieces) const override {
    std::vector<PreToken> out;
    out.reserve(pieces.size());
    for (PreToken& p : pieces) {
      p.text = replace_all(space_, p.text, replacement_);
      const bool needs_prefix = p.text.rfind(replacement_, 0) != 0;
      if (needs_prefix && (scheme_ == PrependScheme::Always || (scheme_ == PrependScheme::First && p.at_text_start))) {
        p.text.insert(0, replacement_);
      }
      if (split_) {
        split_piece(p, delimiter_, Delimiter::MergedWithNext, false, out);
      } else if (!p.text.empty()) {
        out.push_back(std::move(p));
      }
    }
    pieces = std::move(out);
  }

 private:
  std::string replacement_;
  Regex space_, delimiter_;
  PrependScheme scheme_;
  bool split_;
};

}  // namespace

std::unique_ptr<PreTokenizer> make_pre_tokenizer(const json& spec) {
  if (spec.is_null()) return nullptr;
  SPEAR_CHECK(spec.is_object() && spec.contains("type") && spec["type"].is_string(),
              "tokenizer.json: pre_tokenizer must be an object with a \"type\"");
  const std::string type = spec["type"].get<std::string>();
  if (type == "Sequence") {
    SPEAR_CHECK(spec.contains("pretokenizers") && spec["pretokenizers"].is_array(),
                "tokenizer.json: Sequence pre_tokenizer needs a \"pretokenizers\" array");
    std::vector<std::unique_ptr<PreTokenizer>> steps;
    for (const json& step : spec["pretokenizers"]) {
      if (auto p = make_pre_tokenizer(step)) steps.push_back(std::move(p));
    }
    return std::make_unique<SequencePreTokenizer>(std::move(steps));
  }
  if (type == "Split") {
    SPEAR_CHECK(spec.contains("pattern"), "tokenizer.json: Split pre_tokenizer needs a \"pattern\"");
    SPEAR_CHECK(spec.contains("behavior") && spec["behavior"].is_string(),
                "tokenizer.json: Split pre_tokenizer needs a \"behavior\"");
    return std::make_unique<SplitPreTokenizer>(make_pattern(spec["pattern"], "Split pre_tokenizer"),
                                               parse_delimiter(spec["behavior"].get<std::string>()),
                                               spec.value("invert", false));
  }
  if (type == "ByteLevel") {
    return std::make_unique<ByteLevelPreTokenizer>(spec.value("add_prefix_space", true), spec.value("use_regex", true));
  }
  if (type == "Metaspace") {
    const std::string replacement = spec.value("replacement", std::string("\xE2\x96\x81"));
    SPEAR_CHECK(!replacement.empty(), "tokenizer.json: Metaspace replacement must not be empty");
    PrependScheme scheme = spec.value("add_prefix_space", true) ? PrependScheme::Always : PrependScheme::Never;
    if (spec.contains("prepend_scheme") && spec["prepend_scheme"].is_string()) {
      const std::string s = spec["prepend_scheme"].get<std::string>();
      if (s == "always") scheme = PrependScheme::Always;
      else if (s == "first") scheme = PrependScheme::First;
      else if (s == "never") scheme = PrependScheme::Never;
      else throw Error("tokenizer.json: unknown Metaspace prepend_scheme \"" + s + "\"");
    }
    return std::make_unique<MetaspacePreTokenizer>(replacement, scheme, spec.value("split", true));
  }
  throw Error("tokenizer.json: unsupported pre_tokenizer type \"" + type +
              "\" (spear supports Sequence, Split, ByteLevel, Metaspace)");
}

}  // namespace spear::tok
