#include "tokenizer/regex.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include "core/error.h"
#include "tokenizer/utf8.h"

namespace spear::tok {

struct Regex::Code {
  pcre2_code* code = nullptr;
  ~Code() { pcre2_code_free(code); }
};

namespace {

// Per-thread matching state, so one compiled Regex serves any number of threads
// without allocating per call. The JIT stack is larger than PCRE2's 32 KiB
// default because pre-tokenizer patterns run over whole documents.
struct MatchScratch {
  pcre2_match_data* data = pcre2_match_data_create(1, nullptr);  // group 0 is all we read
  pcre2_match_context* context = pcre2_match_context_create(nullptr);
  pcre2_jit_stack* jit_stack = pcre2_jit_stack_create(32 * 1024, 8 * 1024 * 1024, nullptr);
  MatchScratch() {
    if (context && jit_stack) pcre2_jit_stack_assign(context, nullptr, jit_stack);
  }
  ~MatchScratch() {
    pcre2_jit_stack_free(jit_stack);
    pcre2_match_context_free(context);
    pcre2_match_data_free(data);
  }
};

MatchScratch& scratch() {
  thread_local MatchScratch s;
  SPEAR_CHECK(s.data && s.context, "tokenizer: out of memory creating PCRE2 match data");
  return s;
}

std::string pcre2_message(int code) {
  PCRE2_UCHAR buf[256];
  const int n = pcre2_get_error_message(code, buf, sizeof buf);
  return n < 0 ? "PCRE2 error " + std::to_string(code) : std::string(reinterpret_cast<char*>(buf), size_t(n));
}

}  // namespace

Regex::Regex(const std::string& pattern) : pattern_(pattern) {
  SPEAR_CHECK(find_invalid_utf8(pattern) == kAllValid, "tokenizer: regex pattern is not valid UTF-8");
  int error = 0;
  PCRE2_SIZE offset = 0;
  // MULTILINE: in Oniguruma's default (Ruby) syntax ^ and $ are line anchors.
  pcre2_code* code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(),
                                   PCRE2_UTF | PCRE2_UCP | PCRE2_MULTILINE, &error, &offset, nullptr);
  SPEAR_CHECK(code != nullptr, "tokenizer: invalid regex '" + pattern + "' at offset " + std::to_string(offset) +
                                   ": " + pcre2_message(error));
  // JIT is an optimisation only: without it pcre2_match interprets the pattern.
  pcre2_jit_compile(code, PCRE2_JIT_COMPLETE);
  auto holder = std::make_shared<Code>();
  holder->code = code;
  code_ = std::move(holder);
}

Regex Regex::literal(std::string_view literal) { return Regex(regex_escape(literal)); }

bool Regex::find(std::string_view subject, size_t from, Span& match) const {
  MatchScratch& s = scratch();
  const int rc = pcre2_match(code_->code, reinterpret_cast<PCRE2_SPTR>(subject.data()), subject.size(), from,
                             PCRE2_NO_UTF_CHECK, s.data, s.context);
  if (rc == PCRE2_ERROR_NOMATCH) return false;
  SPEAR_CHECK(rc >= 0, "tokenizer: regex '" + pattern_ + "' failed: " + pcre2_message(rc));
  const PCRE2_SIZE* ovector = pcre2_get_ovector_pointer(s.data);
  match = {ovector[0], ovector[1]};
  return true;
}

void Regex::find_all(std::string_view subject, std::vector<Span>& out) const {
  size_t from = 0;
  Span m{};
  while (from <= subject.size() && find(subject, from, m)) {
    out.push_back(m);
    if (m.end > m.begin) {
      from = m.end;
    } else {
      if (m.end >= subject.size()) break;
      from = m.end + utf8_char_len(subject, m.end);
    }
  }
}

std::string regex_escape(std::string_view text) {
  std::string out;
  out.reserve(text.size() + 8);
  for (char c : text) {
    if (std::string_view("\\^$.|?*+()[]{}-/#&~ \t\n\r").find(c) != std::string_view::npos) {
      if (c == '\t') { out += "\\t"; continue; }
      if (c == '\n') { out += "\\n"; continue; }
      if (c == '\r') { out += "\\r"; continue; }
      out += '\\';
    }
    out += c;
  }
  return out;
}

}  // namespace spear::tok
