#pragma once
// Added tokens (tokenizer.json "added_tokens"): the text is first cut on them,
// as tokenizers' AddedVocabulary::extract_and_normalize does. Tokens with
// normalized=false are matched in the raw text; the pieces between are
// normalized; tokens with normalized=true are then matched (in their normalized
// form) inside those pieces. Matching is leftmost-longest; single_word, lstrip
// and rstrip are honoured.
#include <cstdint>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "tokenizer/normalizer.h"

namespace spear::tok {

struct AddedToken {
  int32_t id;
  std::string content;
  bool single_word = false, lstrip = false, rstrip = false, normalized = false, special = false;
};

class AddedVocabulary {
 public:
  struct Piece {
    std::string text;  // normalized text to pre-tokenize, or the matched token's text
    int32_t token_id;  // >= 0 when the piece is an added token
    bool at_text_start;
  };

  AddedVocabulary() = default;
  // Throws spear::Error for malformed entries. normalizer may be null.
  AddedVocabulary(const nlohmann::json& added_tokens, const Normalizer* normalizer);

  std::vector<Piece> extract_and_normalize(std::string_view text, const Normalizer* normalizer) const;

  const AddedToken* find(int32_t id) const;
  int32_t find(std::string_view content) const;  // -1 if absent
  int32_t max_id() const { return max_id_; }

 private:
  // A byte trie over the token contents, for leftmost-longest matching.
  struct Matcher {
    struct Node {
      std::vector<std::pair<unsigned char, int32_t>> children;
      int32_t token = -1;  // index into tokens_ of the token ending here
    };
    std::vector<Node> nodes{Node{}};
    bool starts[256] = {};  // bytes some token starts with: cheap skip of other positions
    void add(std::string_view pattern, int32_t token_index);
    // Longest token starting at text[pos]: its index and length, or -1.
    int32_t longest_at(std::string_view text, size_t pos, size_t& length) const;
    bool empty() const { return nodes.size() == 1; }
  };
  struct Match {
    size_t begin, end;
    int32_t token_index;
  };
  std::vector<Match> find_matches(std::string_view text, const Matcher& matcher) const;

  std::vector<AddedToken> tokens_;
  std::unordered_map<int32_t, size_t> by_id_;
  std::unordered_map<std::string, int32_t> by_content_;
  Matcher raw_matcher_, normalized_matcher_;
  int32_t max_id_ = -1;
};

}  // namespace spear::tok
