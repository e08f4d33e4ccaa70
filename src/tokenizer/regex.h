#pragma once
// PCRE2 regexes with the semantics HF tokenizers get from Oniguruma: UTF-8
// subjects, Unicode properties (\p{L}, \s, \w follow Unicode), leftmost-first
// alternation, ^ and $ anchoring at line breaks. JIT-compiled when the platform
// supports it.
#include <cstddef>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace spear::tok {

struct Span {
  size_t begin, end;  // byte offsets, [begin, end)
};

class Regex {
 public:
  // Throws spear::Error naming the pattern and PCRE2's reason when it does not compile.
  explicit Regex(const std::string& pattern);
  // A pattern that matches `literal` exactly (HF's String patterns).
  static Regex literal(std::string_view literal);

  // Appends every non-overlapping match, left to right. After an empty match the
  // search resumes one character further. subject must be valid UTF-8 (it is not
  // re-checked: PCRE2's own check would rescan the whole subject per match).
  void find_all(std::string_view subject, std::vector<Span>& out) const;
  // First match at or after `from`; false if none.
  bool find(std::string_view subject, size_t from, Span& match) const;

  const std::string& pattern() const { return pattern_; }

 private:
  struct Code;
  std::string pattern_;
  std::shared_ptr<const Code> code_;
};

// Escapes PCRE2 metacharacters so the text matches itself.
std::string regex_escape(std::string_view text);

}  // namespace spear::tok
