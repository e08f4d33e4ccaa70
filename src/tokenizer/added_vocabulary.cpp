#include "tokenizer/added_vocabulary.h"

#include <algorithm>
#include <climits>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "tokenizer/regex.h"
#include "tokenizer/utf8.h"

namespace spear::tok {
namespace {

using nlohmann::json;

// Unicode \w, as the regex crate that tokenizers' single_word check uses.
bool is_word_char_at(std::string_view text, size_t pos) {
  static const Regex word(R"(\A\w)");
  Span m{};
  return word.find(text.substr(pos, utf8_char_len(text, pos)), 0, m);
}

size_t last_char_start(std::string_view text, size_t end) {
  size_t i = end - 1;
  while (i > 0 && (static_cast<unsigned char>(text[i]) & 0xC0) == 0x80) --i;
  return i;
}

// Start of the whitespace run ending at `end`.
size_t whitespace_run_start(std::string_view text, size_t end) {
  while (end > 0) {
    const size_t prev = last_char_start(text, end);
    if (!is_unicode_whitespace(utf8_decode_at(text, prev))) break;
    end = prev;
  }
  return end;
}

// End of the whitespace run starting at `begin`.
size_t whitespace_run_end(std::string_view text, size_t begin) {
  while (begin < text.size() && is_unicode_whitespace(utf8_decode_at(text, begin))) {
    begin += utf8_char_len(text, begin);
  }
  return begin;
}

bool flag(const json& entry, const char* key, bool fallback) {
  auto it = entry.find(key);
  if (it == entry.end() || it->is_null()) return fallback;
  SPEAR_CHECK(it->is_boolean(), std::string("tokenizer.json: added_tokens \"") + key + "\" must be a boolean");
  return it->get<bool>();
}

}  // namespace

void AddedVocabulary::Matcher::add(std::string_view pattern, int32_t token_index) {
  if (pattern.empty()) return;
  int32_t node = 0;
  for (unsigned char c : pattern) {
    int32_t next = -1;
    for (const auto& [byte, child] : nodes[size_t(node)].children) {
      if (byte == c) next = child;
    }
    if (next < 0) {
      next = int32_t(nodes.size());
      nodes[size_t(node)].children.emplace_back(c, next);
      nodes.emplace_back();
    }
    node = next;
  }
  // Two tokens with the same (normalized) content: the first one listed wins.
  if (nodes[size_t(node)].token < 0) nodes[size_t(node)].token = token_index;
  starts[static_cast<unsigned char>(pattern[0])] = true;
}

int32_t AddedVocabulary::Matcher::longest_at(std::string_view text, size_t pos, size_t& length) const {
  int32_t node = 0, best = -1;
  for (size_t i = pos; i < text.size(); ++i) {
    int32_t next = -1;
    for (const auto& [byte, child] : nodes[size_t(node)].children) {
      if (byte == static_cast<unsigned char>(text[i])) next = child;
    }
    if (next < 0) break;
    node = next;
    if (nodes[size_t(node)].token >= 0) best = nodes[size_t(node)].token, length = i + 1 - pos;
  }
  return best;
}

AddedVocabulary::AddedVocabulary(const json& added_tokens, const Normalizer* normalizer) {
  if (added_tokens.is_null()) return;
  SPEAR_CHECK(added_tokens.is_array(), "tokenizer.json: \"added_tokens\" must be a list");
  for (const json& entry : added_tokens) {
    SPEAR_CHECK(entry.is_object() && entry.contains("id") && entry["id"].is_number_integer() &&
                    entry["id"].get<int64_t>() >= 0 && entry["id"].get<int64_t>() < INT32_MAX &&
                    entry.contains("content") && entry["content"].is_string(),
                "tokenizer.json: each added token needs an integer \"id\" and a string \"content\"");
    AddedToken t;
    t.id = entry["id"].get<int32_t>();
    t.content = entry["content"].get<std::string>();
    SPEAR_CHECK(find_invalid_utf8(t.content) == kAllValid, "tokenizer.json: an added token is not UTF-8");
    t.special = flag(entry, "special", false);
    t.single_word = flag(entry, "single_word", false);
    t.lstrip = flag(entry, "lstrip", false);
    t.rstrip = flag(entry, "rstrip", false);
    t.normalized = flag(entry, "normalized", !t.special);
    max_id_ = std::max(max_id_, t.id);
    by_id_[t.id] = tokens_.size();
    by_content_.emplace(t.content, t.id);
    tokens_.push_back(std::move(t));
  }
  for (size_t i = 0; i < tokens_.size(); ++i) {
    const AddedToken& t = tokens_[i];
    if (!t.normalized) {
      raw_matcher_.add(t.content, int32_t(i));
    } else {
      normalized_matcher_.add(normalizer ? normalizer->normalize(t.content) : t.content, int32_t(i));
    }
  }
}

const AddedToken* AddedVocabulary::find(int32_t id) const {
  auto it = by_id_.find(id);
  return it == by_id_.end() ? nullptr : &tokens_[it->second];
}

int32_t AddedVocabulary::find(std::string_view content) const {
  auto it = by_content_.find(std::string(content));
  return it == by_content_.end() ? -1 : it->second;
}

std::vector<AddedVocabulary::Match> AddedVocabulary::find_matches(std::string_view text,
                                                                  const Matcher& matcher) const {
  std::vector<Match> matches;
  if (matcher.empty()) return matches;
  size_t covered = 0;  // end of the last accepted match, rstrip included
  for (size_t pos = 0; pos < text.size();) {
    if (!matcher.starts[static_cast<unsigned char>(text[pos])]) {
      ++pos;
      continue;
    }
    size_t length = 0;
    const int32_t index = matcher.longest_at(text, pos, length);
    if (index < 0) {
      ++pos;
      continue;
    }
    const AddedToken& token = tokens_[size_t(index)];
    size_t begin = pos, end = pos + length;
    pos = end;  // matches never overlap, even a rejected one (as with aho-corasick's iterator)
    if (token.single_word) {
      const bool word_before = begin > 0 && is_word_char_at(text, last_char_start(text, begin));
      const bool word_after = end < text.size() && is_word_char_at(text, end);
      if (word_before || word_after) continue;
    }
    if (token.lstrip) begin = std::max(whitespace_run_start(text, begin), covered);
    if (token.rstrip) end = whitespace_run_end(text, end);
    matches.push_back({begin, end, index});
    covered = end;
    pos = end;  // the next match starts after the stripped spaces (tokenizers could overlap them)
  }
  return matches;
}

std::vector<AddedVocabulary::Piece> AddedVocabulary::extract_and_normalize(std::string_view text,
                                                                          const Normalizer* normalizer) const {
  std::vector<Piece> pieces;
  // Normalizes one stretch of raw text and cuts it on the normalized tokens.
  auto add_text = [&](std::string_view raw, bool at_text_start) {
    if (raw.empty()) return;  // empty stretches are dropped before normalization
    std::string normalized = normalizer ? normalizer->normalize(std::string(raw)) : std::string(raw);
    size_t last = 0;
    for (const Match& m : find_matches(normalized, normalized_matcher_)) {
      if (m.begin > last) pieces.push_back({normalized.substr(last, m.begin - last), -1, at_text_start && last == 0});
      pieces.push_back({normalized.substr(m.begin, m.end - m.begin), tokens_[size_t(m.token_index)].id, false});
      last = m.end;
    }
    if (last < normalized.size()) pieces.push_back({normalized.substr(last), -1, at_text_start && last == 0});
  };
  size_t last = 0;
  for (const Match& m : find_matches(text, raw_matcher_)) {
    add_text(text.substr(last, m.begin - last), last == 0);
    pieces.push_back({std::string(text.substr(m.begin, m.end - m.begin)), tokens_[size_t(m.token_index)].id, false});
    last = m.end;
  }
  add_text(text.substr(last), last == 0);
  return pieces;
}

}  // namespace spear::tok
