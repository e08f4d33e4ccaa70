#include "server/generation_defaults.h"

#include <cstdio>

#include <nlohmann/json.hpp>

namespace spear::server {

GenerationDefaults GenerationDefaults::from_json_text(const std::string& text, std::string* note) {
  GenerationDefaults d;
  if (note) note->clear();
  if (text.empty()) return d;
  const nlohmann::json j = nlohmann::json::parse(text, nullptr, false);
  if (j.is_discarded() || !j.is_object()) {
    if (note) *note = "generation_config.json is not a JSON object; no defaults taken from it";
    return d;
  }
  std::string skipped;
  auto skip = [&](const char* k) { skipped += (skipped.empty() ? "" : ", ") + std::string(k); };
  auto number = [&](const char* k, double lo, double hi, bool lo_open) -> std::optional<double> {
    auto it = j.find(k);
    if (it == j.end() || it->is_null()) return std::nullopt;
    const double v = it->is_number() ? it->get<double>() : -1e300;
    if (!(v <= hi && (lo_open ? v > lo : v >= lo))) {
      skip(k);
      return std::nullopt;
    }
    return v;
  };
  auto integer = [&](const char* k, int64_t lo, int64_t hi) -> std::optional<int64_t> {
    auto it = j.find(k);
    if (it == j.end() || it->is_null()) return std::nullopt;
    if (!it->is_number_integer() || it->get<int64_t>() < lo || it->get<int64_t>() > hi) {
      skip(k);
      return std::nullopt;
    }
    return it->get<int64_t>();
  };
  d.temperature = number("temperature", 0.0, 2.0, false);
  d.top_p = number("top_p", 0.0, 1.0, true);
  d.min_p = number("min_p", 0.0, 1.0, false);
  d.repetition_penalty = number("repetition_penalty", 0.0, 10.0, true);
  d.top_k = integer("top_k", 0, 1 << 20);
  d.max_new_tokens = integer("max_new_tokens", 1, int64_t{1} << 40);
  if (note && !skipped.empty())
    *note = "generation_config.json: ignored out-of-range or mistyped " + skipped;
  return d;
}

bool GenerationDefaults::empty() const {
  return !temperature && !top_p && !min_p && !repetition_penalty && !top_k && !max_new_tokens;
}

std::string GenerationDefaults::describe() const {
  std::string s;
  auto add = [&](const char* k, const std::string& v) { s += (s.empty() ? "" : " ") + std::string(k) + "=" + v; };
  auto num = [](double v) {
    char b[32];
    std::snprintf(b, sizeof b, "%g", v);
    return std::string(b);
  };
  if (temperature) add("temperature", num(*temperature));
  if (top_p) add("top_p", num(*top_p));
  if (top_k) add("top_k", std::to_string(*top_k));
  if (min_p) add("min_p", num(*min_p));
  if (repetition_penalty) add("repetition_penalty", num(*repetition_penalty));
  if (max_new_tokens) add("max_new_tokens", std::to_string(*max_new_tokens));
  return s.empty() ? "none" : s;
}

}  // namespace spear::server
