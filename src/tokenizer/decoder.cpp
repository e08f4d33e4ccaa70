#include "tokenizer/decoder.h"

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "tokenizer/byte_level.h"
#include "tokenizer/pattern.h"
#include "tokenizer/utf8.h"

namespace spear::tok {
namespace {

using nlohmann::json;

class SequenceDecoder final : public Decoder {
 public:
  explicit SequenceDecoder(std::vector<std::unique_ptr<Decoder>> steps) : steps_(std::move(steps)) {}
  void decode_chain(std::vector<std::string>& tokens) const override {
    for (const auto& step : steps_) step->decode_chain(tokens);
  }

 private:
  std::vector<std::unique_ptr<Decoder>> steps_;
};

// Maps each token's characters back to bytes (a token with a character outside
// the byte map, e.g. an added token, keeps its own UTF-8 bytes) and repairs the
// joined bytes lossily into one string.
class ByteLevelDecoder final : public Decoder {
 public:
  void decode_chain(std::vector<std::string>& tokens) const override {
    std::string bytes;
    for (const std::string& token : tokens) {
      const size_t start = bytes.size();
      bool mapped = true;
      for (size_t i = 0; i < token.size() && mapped; i += utf8_char_len(token, i)) {
        const int b = byte_level_char_to_byte(utf8_decode_at(token, i));
        if (b < 0) mapped = false;
        else bytes += char(b);
      }
      if (!mapped) bytes.replace(start, std::string::npos, token);
    }
    tokens.assign(1, utf8_lossy(bytes));
  }
};

class ReplaceDecoder final : public Decoder {
 public:
  ReplaceDecoder(Regex pattern, std::string content) : pattern_(std::move(pattern)), content_(std::move(content)) {}
  void decode_chain(std::vector<std::string>& tokens) const override {
    for (std::string& t : tokens) t = replace_all(pattern_, t, content_);
  }

 private:
  Regex pattern_;
  std::string content_;
};

// Runs of "<0xXX>" tokens become the UTF-8 text they spell; a run that is not
// valid UTF-8 becomes one U+FFFD per byte (tokenizers' rule, unlike lossy repair).
class ByteFallbackDecoder final : public Decoder {
 public:
  void decode_chain(std::vector<std::string>& tokens) const override {
    std::vector<std::string> out;
    out.reserve(tokens.size());
    std::string run;
    auto flush = [&] {
      if (run.empty()) return;
      if (find_invalid_utf8(run) == kAllValid) {
        out.push_back(run);
      } else {
        for (size_t i = 0; i < run.size(); ++i) out.emplace_back(kReplacementChar);
      }
      run.clear();
    };
    for (std::string& t : tokens) {
      int byte = -1;
      if (t.size() == 6 && t.compare(0, 3, "<0x") == 0 && t[5] == '>') byte = parse_hex_byte(t[3], t[4]);
      if (byte >= 0) {
        run += char(byte);
      } else {
        flush();
        out.push_back(std::move(t));
      }
    }
    flush();
    tokens = std::move(out);
  }

 private:
  static int hex_digit(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
  }
  static int parse_hex_byte(char hi, char lo) {
    const int h = hex_digit(hi), l = hex_digit(lo);
    return h < 0 || l < 0 ? -1 : h * 16 + l;
  }
};

class FuseDecoder final : public Decoder {
 public:
  void decode_chain(std::vector<std::string>& tokens) const override {
    std::string joined;
    for (const std::string& t : tokens) joined += t;
    tokens.assign(1, std::move(joined));
  }
};

// Removes up to `start` leading and `stop` trailing copies of one character from
// every token.
class StripDecoder final : public Decoder {
 public:
  StripDecoder(std::string content, size_t start, size_t stop)
      : content_(std::move(content)), start_(start), stop_(stop) {}
  void decode_chain(std::vector<std::string>& tokens) const override {
    for (std::string& t : tokens) {
      size_t begin = 0, end = t.size();
      for (size_t n = 0; n < start_ && t.compare(begin, content_.size(), content_) == 0 && begin < end; ++n) {
        begin += content_.size();
      }
      for (size_t n = 0; n < stop_ && end >= begin + content_.size() &&
                         t.compare(end - content_.size(), content_.size(), content_) == 0;
           ++n) {
        end -= content_.size();
      }
      t = t.substr(begin, end - begin);
    }
  }

 private:
  std::string content_;
  size_t start_, stop_;
};

// Replacement characters become spaces, except in the first token where they are
// dropped (undoing the prepended one) unless the prepend scheme is "never".
class MetaspaceDecoder final : public Decoder {
 public:
  MetaspaceDecoder(std::string replacement, bool drop_in_first)
      : replacement_(Regex::literal(replacement)), drop_in_first_(drop_in_first) {}
  void decode_chain(std::vector<std::string>& tokens) const override {
    for (size_t i = 0; i < tokens.size(); ++i) {
      tokens[i] = replace_all(replacement_, tokens[i], i == 0 && drop_in_first_ ? "" : " ");
    }
  }

 private:
  Regex replacement_;
  bool drop_in_first_;
};

}  // namespace

std::unique_ptr<Decoder> make_decoder(const json& spec) {
  if (spec.is_null()) return nullptr;
  SPEAR_CHECK(spec.is_object() && spec.contains("type") && spec["type"].is_string(),
              "tokenizer.json: decoder must be an object with a \"type\"");
  const std::string type = spec["type"].get<std::string>();
  if (type == "Sequence") {
    SPEAR_CHECK(spec.contains("decoders") && spec["decoders"].is_array(),
                "tokenizer.json: Sequence decoder needs a \"decoders\" array");
    std::vector<std::unique_ptr<Decoder>> steps;
    for (const json& step : spec["decoders"]) {
      if (auto d = make_decoder(step)) steps.push_back(std::move(d));
    }
    return std::make_unique<SequenceDecoder>(std::move(steps));
  }
  if (type == "ByteLevel") return std::make_unique<ByteLevelDecoder>();
  if (type == "Replace") {
    SPEAR_CHECK(spec.contains("pattern") && spec.contains("content") && spec["content"].is_string(),
                "tokenizer.json: Replace decoder needs \"pattern\" and \"content\"");
    return std::make_unique<ReplaceDecoder>(make_pattern(spec["pattern"], "Replace decoder"),
                                            spec["content"].get<std::string>());
  }
  if (type == "ByteFallback") return std::make_unique<ByteFallbackDecoder>();
  if (type == "Fuse") return std::make_unique<FuseDecoder>();
  if (type == "Strip") {
    const std::string content = spec.value("content", std::string(" "));
    SPEAR_CHECK(!content.empty() && find_invalid_utf8(content) == kAllValid &&
                    utf8_char_len(content, 0) == content.size(),
                "tokenizer.json: Strip decoder content must be one character");
    const int64_t start = spec.value("start", int64_t(0)), stop = spec.value("stop", int64_t(0));
    SPEAR_CHECK(start >= 0 && stop >= 0, "tokenizer.json: Strip decoder start/stop must be >= 0");
    return std::make_unique<StripDecoder>(content, size_t(start), size_t(stop));
  }
  if (type == "Metaspace") {
    const std::string replacement = spec.value("replacement", std::string("\xE2\x96\x81"));
    SPEAR_CHECK(!replacement.empty(), "tokenizer.json: Metaspace replacement must not be empty");
    bool drop_in_first = spec.value("add_prefix_space", true);
    if (spec.contains("prepend_scheme") && spec["prepend_scheme"].is_string()) {
      drop_in_first = spec["prepend_scheme"].get<std::string>() != "never";
    }
    return std::make_unique<MetaspaceDecoder>(replacement, drop_in_first);
  }
  throw Error("tokenizer.json: unsupported decoder type \"" + type +
              "\" (spear supports Sequence, ByteLevel, Replace, ByteFallback, Fuse, Strip, Metaspace)");
}

}  // namespace spear::tok
