#include "tokenizer/pattern.h"

#include <nlohmann/json.hpp>

#include "core/error.h"

namespace spear::tok {

Regex make_pattern(const nlohmann::json& spec, const char* where) {
  SPEAR_CHECK(spec.is_object() && spec.size() == 1,
              std::string("tokenizer.json: ") + where + ".pattern must be {\"String\": ...} or {\"Regex\": ...}");
  const std::string kind = spec.begin().key();
  const nlohmann::json& value = spec.begin().value();
  SPEAR_CHECK(value.is_string(), std::string("tokenizer.json: ") + where + ".pattern value must be a string");
  if (kind == "String") return Regex::literal(value.get<std::string>());
  SPEAR_CHECK(kind == "Regex", std::string("tokenizer.json: ") + where + ".pattern has unknown kind \"" + kind + "\"");
  return Regex(value.get<std::string>());
}

std::string replace_all(const Regex& pattern, std::string_view text, std::string_view content) {
  std::vector<Span> matches;
  pattern.find_all(text, matches);
  if (matches.empty()) return std::string(text);
  // Real replacements grow text a few times at most; this stops a malformed
  // chain of replacements (e.g. of the empty pattern) from exploding memory.
  const size_t added = matches.size() * content.size();
  SPEAR_CHECK(added <= 64 * text.size() + (size_t(1) << 20),
              "tokenizer: replacing /" + pattern.pattern() + "/ would grow the text too much");
  std::string out;
  out.reserve(text.size() + matches.size() * content.size());
  size_t last = 0;
  for (const Span& m : matches) {
    out.append(text.substr(last, m.begin - last));
    out.append(content);
    last = m.end;
  }
  out.append(text.substr(last));
  return out;
}

}  // namespace spear::tok
