#include "server/json_fields.h"

#include <cmath>

#include "server/api_error.h"

namespace spear::server {

namespace {

// A SAX pass that adds up what nlohmann's DOM will allocate for the body, on the
// high side (x86-64 libstdc++, malloc's 16-byte overhead, vector growth slack), and
// stops once it passes the cap. A few bytes of JSON can cost a hundred of memory
// ("[]," is an element, a heap vector and its growth slack), so the byte limit of a
// body does not bound its parsed size; this does.
class DomBudget : public nlohmann::json_sax<nlohmann::json> {
 public:
  explicit DomBudget(size_t cap) : cap_(cap) {}
  bool over() const { return over_; }
  size_t used() const { return used_; }

  bool null() override { return add(kValue); }
  bool boolean(bool) override { return add(kValue); }
  bool number_integer(number_integer_t) override { return add(kValue); }
  bool number_unsigned(number_unsigned_t) override { return add(kValue); }
  bool number_float(number_float_t, const string_t&) override { return add(kValue); }
  bool string(string_t& s) override { return add(kValue + str(s)); }
  bool binary(binary_t& b) override { return add(kValue + 48 + b.size()); }
  bool start_object(std::size_t) override { return add(kValue + 64); }  // the map
  bool key(string_t& k) override { return add(80 + str(k)); }          // a tree node (value inline)
  bool end_object() override { return true; }
  bool start_array(std::size_t) override { return add(kValue + 48); }   // the vector
  bool end_array() override { return true; }
  bool parse_error(std::size_t, const std::string&, const nlohmann::detail::exception&) override {
    return false;  // the DOM parse that follows reports it
  }

 private:
  // A value inside its parent: 16 bytes, doubled for a vector's growth slack.
  static constexpr size_t kValue = 32;
  // A heap std::string (the DOM holds strings by pointer), its buffer past 15 bytes.
  static size_t str(const std::string& s) { return 48 + (s.size() > 15 ? s.size() + 17 : 0); }
  bool add(size_t n) {
    used_ += n;
    if (used_ > cap_) over_ = true;
    return !over_;
  }
  size_t cap_, used_ = 0;
  bool over_ = false;
};

}  // namespace

nlohmann::json parse_body(std::string_view body, int max_depth, size_t max_json_bytes,
                          size_t max_string_bytes) {
  // nlohmann's lexer takes a NUL byte for the end of the input, so `{...}\0garbage`
  // would parse; JSON has no raw NUL anywhere (in strings it must be escaped).
  if (body.find('\0') != std::string_view::npos)
    throw ApiError(400, "the request body holds a NUL byte; it is not valid JSON",
                   "invalid_request_error", "invalid_json");
  // Depth pre-scan outside strings, before the recursive parser sees the text.
  int depth = 0;
  bool in_str = false, esc = false;
  size_t str_len = 0;  // bytes of the current string literal, escapes included (they only shrink)
  for (char c : body) {
    if (in_str) {
      if (max_string_bytes > 0 && ++str_len > max_string_bytes + 1)
        throw ApiError(400,
                       "a string in the request body is longer than " + std::to_string(max_string_bytes) +
                           " bytes, more than any field accepts (a prompt is bounded by the model's "
                           "context)",
                       "invalid_request_error", "context_length_exceeded");
      if (esc) esc = false;
      else if (c == '\\') esc = true;
      else if (c == '"') in_str = false;
      continue;
    }
    if (c == '"') {
      in_str = true;
      str_len = 0;
    }
    else if (c == '[' || c == '{') {
      if (++depth > max_depth)
        throw ApiError(400, "the request body nests deeper than " + std::to_string(max_depth) +
                                " levels", "invalid_request_error", "invalid_json");
    } else if (c == ']' || c == '}') --depth;
  }
  if (max_json_bytes > 0) {
    DomBudget budget(max_json_bytes);
    nlohmann::json::sax_parse(body, &budget, nlohmann::json::input_format_t::json, /*strict=*/true);
    if (budget.over())
      throw ApiError(413,
                     "the request body would take more than " + std::to_string(max_json_bytes) +
                         " bytes of memory once parsed (too many JSON values)",
                     "invalid_request_error", "payload_too_large");
  }
  nlohmann::json j = nlohmann::json::parse(body, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded())
    throw ApiError(400, "the request body is not valid JSON", "invalid_request_error",
                   "invalid_json");
  if (!j.is_object())
    throw ApiError(400, "the request body must be a JSON object", "invalid_request_error",
                   "invalid_json");
  return j;
}

bool Fields::has(const char* key) const {
  auto it = j_.find(key);
  return it != j_.end() && !it->is_null();
}

const nlohmann::json* Fields::raw(const char* key) const {
  auto it = j_.find(key);
  if (it == j_.end() || it->is_null()) return nullptr;
  return &*it;
}

std::optional<bool> Fields::boolean(const char* key) const {
  const nlohmann::json* v = raw(key);
  if (!v) return std::nullopt;
  if (!v->is_boolean()) throw bad_field(key, std::string("'") + key + "' must be a boolean");
  return v->get<bool>();
}

int64_t as_integer(const nlohmann::json& v, const std::string& param, int64_t lo, int64_t hi) {
  const std::string range = "[" + std::to_string(lo) + ", " + std::to_string(hi) + "]";
  if (v.is_number_integer()) {
    // Unsigned values above int64 max and negative ones both land here safely.
    if (v.is_number_unsigned()) {
      uint64_t u = v.get<uint64_t>();
      if (u > static_cast<uint64_t>(hi) || static_cast<int64_t>(u) < lo)
        throw bad_field(param, "'" + param + "' must be an integer in " + range);
      return static_cast<int64_t>(u);
    }
    int64_t x = v.get<int64_t>();
    if (x < lo || x > hi) throw bad_field(param, "'" + param + "' must be an integer in " + range);
    return x;
  }
  if (v.is_number_float()) {
    double d = v.get<double>();
    if (std::isfinite(d) && d == std::floor(d) && d >= static_cast<double>(lo) &&
        d <= static_cast<double>(hi))
      return static_cast<int64_t>(d);
  }
  throw bad_field(param, "'" + param + "' must be an integer in " + range);
}

std::optional<int64_t> Fields::integer(const char* key, int64_t lo, int64_t hi) const {
  const nlohmann::json* v = raw(key);
  if (!v) return std::nullopt;
  return as_integer(*v, key, lo, hi);
}

std::optional<double> Fields::number(const char* key, double lo, double hi) const {
  const nlohmann::json* v = raw(key);
  if (!v) return std::nullopt;
  if (!v->is_number())
    throw bad_field(key, std::string("'") + key + "' must be a number");
  double d = v->get<double>();
  if (!std::isfinite(d) || d < lo || d > hi)
    throw bad_field(key, std::string("'") + key + "' must be in [" + std::to_string(lo) + ", " +
                             std::to_string(hi) + "]");
  return d;
}

std::optional<std::string> Fields::string(const char* key, size_t max_len) const {
  const nlohmann::json* v = raw(key);
  if (!v) return std::nullopt;
  if (!v->is_string()) throw bad_field(key, std::string("'") + key + "' must be a string");
  const std::string& s = v->get_ref<const std::string&>();
  if (s.size() > max_len)
    throw bad_field(key, std::string("'") + key + "' is longer than " + std::to_string(max_len) +
                             " bytes");
  return s;
}

std::vector<std::string> Fields::string_or_list(const char* key, size_t max_n,
                                                size_t max_len) const {
  const nlohmann::json* v = raw(key);
  std::vector<std::string> out;
  if (!v) return out;
  auto one = [&](const nlohmann::json& e) {
    if (!e.is_string())
      throw bad_field(key, std::string("'") + key + "' must be a string or a list of strings");
    const std::string& s = e.get_ref<const std::string&>();
    if (s.empty()) throw bad_field(key, std::string("'") + key + "' must not contain empty strings");
    if (s.size() > max_len)
      throw bad_field(key, std::string("'") + key + "' entries must be at most " +
                               std::to_string(max_len) + " bytes");
    out.push_back(s);
  };
  if (v->is_array()) {
    if (v->size() > max_n)
      throw bad_field(key, std::string("'") + key + "' may hold at most " + std::to_string(max_n) +
                               " entries");
    for (const auto& e : *v) one(e);
  } else {
    one(*v);
  }
  return out;
}

}  // namespace spear::server
