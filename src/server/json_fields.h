#pragma once
// Typed, range-checked access to the fields of a JSON request body. Every getter
// throws ApiError (400, naming the field) on a wrong type or an out-of-range
// value, so a handler reads a request in a few lines and cannot forget a check.
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

namespace spear::server {

// Parses a request body. Rejects invalid JSON (anything after the value but
// whitespace, a NUL byte anywhere), a non-object top level, and nesting
// deeper than max_depth (nlohmann's parser recurses; a body of 100k '[' must not
// exhaust the stack). With max_json_bytes > 0, a body whose parsed form would take
// more memory than that (estimated on the high side by a SAX pass before the DOM is
// built: "[[],[],...]" costs ~40x its bytes) is refused with 413; the server passes
// its body limit (+64 KiB), so a request's JSON never takes much more memory than the
// documented limit.
// With max_string_bytes > 0, a string literal longer than that is refused (400,
// context_length_exceeded) in the same pre-scan, before a parser copies it: the server
// passes the longest text any field takes (the prompt byte bound), so an 8 MB prompt
// for a 2k-token model is not held three times (body, lexer, DOM) to be refused after.
nlohmann::json parse_body(std::string_view body, int max_depth = 64, size_t max_json_bytes = 0,
                          size_t max_string_bytes = 0);

class Fields {
 public:
  explicit Fields(const nlohmann::json& obj) : j_(obj) {}
  bool has(const char* key) const;  // present and not null

  std::optional<bool> boolean(const char* key) const;
  // An integer in [lo, hi]; a float with an integral value (e.g. 16.0) is accepted.
  std::optional<int64_t> integer(const char* key, int64_t lo, int64_t hi) const;
  std::optional<double> number(const char* key, double lo, double hi) const;
  std::optional<std::string> string(const char* key, size_t max_len = 1 << 20) const;
  // A string or an array of up to max_n strings (OpenAI's `stop`).
  std::vector<std::string> string_or_list(const char* key, size_t max_n, size_t max_len) const;
  const nlohmann::json* raw(const char* key) const;

 private:
  const nlohmann::json& j_;
};

// The integer value of a JSON number that must be integral and in [lo, hi].
int64_t as_integer(const nlohmann::json& v, const std::string& param, int64_t lo, int64_t hi);

}  // namespace spear::server
