#include "server/jinja.h"

#include <algorithm>
#include <cctype>
#include <cstdio>
#include <ctime>
#include <iomanip>
#include <locale>
#include <sstream>
#include <stdexcept>

#include <nlohmann/json.hpp>

namespace spear::server::jinja {

namespace {
[[noreturn]] void fail(const std::string& m) { throw std::runtime_error("jinja: " + m); }
constexpr size_t kMaxOutput = 16u << 20;
// Loop iterations per render, all loops together. Each costs a scope and a `loop` dict
// (~1 us; ~10 us under ASan): 1M let a model file's template of two nested
// range(999) loops take ~1 s of a worker per chat request, 10 s under the fuzzer
// (fuzz/README.md). 100k is ~100x what a real template needs at the message cap
// (1024 messages, a few passes over them and their content parts).
constexpr int64_t kMaxIterations = 100'000;
// Counts one level of parser recursion for as long as it lives. A bracket level of an
// expression passes four guards (ternary, or, not, unary), so 512 is ~128 brackets.
struct NestGuard {
  int& n;
  explicit NestGuard(int& c) : n(c) {
    if (++n > 512) {
      --n;
      fail("the template nests too deeply");
    }
  }
  ~NestGuard() { --n; }
  NestGuard(const NestGuard&) = delete;
  NestGuard& operator=(const NestGuard&) = delete;
};
// Parsing and evaluating recurse on the template's tree; these bound it (real chat
// templates nest a dozen levels, their longest expression has ~60 tokens).
constexpr size_t kMaxExprTokens = 2048;
// (parser recursion: brackets, not/-, nested blocks: 512 guard levels, in NestGuard)
constexpr int kMaxTreeDepth = 256;  // the parsed tree, left-deep chains (a+b+c..., a.b.c...) included
}  // namespace

// ---- values ---------------------------------------------------------------------

const Value* Value::get(const std::string& key) const {
  if (t != T::Dict) return nullptr;
  for (const auto& [k, v] : *d)
    if (k == key) return &v;
  return nullptr;
}

namespace {
void check_element(const Value& e) {
  if (e.ns) throw std::runtime_error("jinja: a namespace cannot be put in a list, dict or namespace");
  if (e.depth >= Value::kMaxDepth)
    throw std::runtime_error("jinja: values nested deeper than " + std::to_string(Value::kMaxDepth) + " levels");
}
}  // namespace

Value Value::list(jinja::List x) {
  Value v;
  v.t = T::List;
  for (const Value& e : x) {
    check_element(e);
    v.depth = std::max(v.depth, e.depth);
  }
  ++v.depth;
  v.l = std::make_shared<jinja::List>(std::move(x));
  return v;
}

Value Value::dict(jinja::Dict x) {
  Value v;
  v.t = T::Dict;
  for (const auto& kv : x) {
    check_element(kv.second);
    v.depth = std::max(v.depth, kv.second.depth);
  }
  ++v.depth;
  v.d = std::make_shared<jinja::Dict>(std::move(x));
  return v;
}

void Value::set(const std::string& key, Value v) {
  check_element(v);
  depth = std::max(depth, v.depth + 1);
  for (auto& [k, x] : *d)
    if (k == key) {
      x = std::move(v);
      return;
    }
  d->push_back({key, std::move(v)});
}

bool Value::truthy() const {
  switch (t) {
    case T::Undefined:
    case T::None: return false;
    case T::Bool: return b;
    case T::Int: return i != 0;
    case T::Str: return !s.empty();
    case T::List: return !l->empty();
    case T::Dict: return !d->empty();
  }
  return false;
}

namespace {

// A string as Python's json.dumps(ensure_ascii=False) writes it.
void py_json_str(const std::string& x, std::string& out) {
  out += '"';
  for (unsigned char c : x) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      case '\b': out += "\\b"; break;
      case '\f': out += "\\f"; break;
      default:
        if (c < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof buf, "\\u%04x", c);
          out += buf;
        } else {
          out += static_cast<char>(c);
        }
    }
  }
  out += '"';
}

// json.dumps(v, ensure_ascii=False, indent=indent) as transformers' tojson filter
// writes it: keys in insertion order, ", " / ": " separators without indent, "," and
// newlines with it.
void py_json(const Value& v, int64_t indent, int64_t level, std::string& out) {
  auto newline = [&](int64_t lv) {
    out += '\n';
    out.append(static_cast<size_t>(indent * lv), ' ');
  };
  switch (v.t) {
    case Value::T::Undefined:
    case Value::T::None: out += "null"; return;
    case Value::T::Bool: out += v.b ? "true" : "false"; return;
    case Value::T::Int: out += std::to_string(v.i); return;
    case Value::T::Str: py_json_str(v.s, out); return;
    case Value::T::List: {
      if (v.l->empty()) {
        out += "[]";
        return;
      }
      out += '[';
      for (size_t i = 0; i < v.l->size(); ++i) {
        if (i) out += indent >= 0 ? "," : ", ";
        if (indent >= 0) newline(level + 1);
        py_json((*v.l)[i], indent, level + 1, out);
      }
      if (indent >= 0) newline(level);
      out += ']';
      return;
    }
    case Value::T::Dict: {
      if (v.d->empty()) {
        out += "{}";
        return;
      }
      out += '{';
      for (size_t i = 0; i < v.d->size(); ++i) {
        if (i) out += indent >= 0 ? "," : ", ";
        if (indent >= 0) newline(level + 1);
        py_json_str((*v.d)[i].first, out);
        out += ": ";
        py_json((*v.d)[i].second, indent, level + 1, out);
      }
      if (indent >= 0) newline(level);
      out += '}';
      return;
    }
  }
}

// A string as Python's repr() writes it: single quotes unless the text holds a single
// quote and no double quote; backslash, the quote, \n \r \t and other ASCII control
// characters escaped (non-ASCII text is kept as is, as Python keeps printable text).
void py_repr_str(const std::string& x, std::string& out) {
  const bool dq = x.find('\'') != std::string::npos && x.find('"') == std::string::npos;
  const char q = dq ? '"' : '\'';
  out += q;
  for (unsigned char c : x) {
    if (c == '\\') out += "\\\\";
    else if (c == static_cast<unsigned char>(q)) (out += '\\') += q;
    else if (c == '\n') out += "\\n";
    else if (c == '\r') out += "\\r";
    else if (c == '\t') out += "\\t";
    else if (c < 0x20 || c == 0x7f) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\x%02x", c);
      out += buf;
    } else {
      out += static_cast<char>(c);
    }
  }
  out += q;
}

// How Jinja prints a list or dict: Python's repr of it.
void py_repr(const Value& v, std::string& out) {
  switch (v.t) {
    case Value::T::Str: py_repr_str(v.s, out); return;
    case Value::T::List:
      out += '[';
      for (size_t i = 0; i < v.l->size(); ++i) {
        if (i) out += ", ";
        py_repr((*v.l)[i], out);
      }
      out += ']';
      return;
    case Value::T::Dict:
      out += '{';
      for (size_t i = 0; i < v.d->size(); ++i) {
        if (i) out += ", ";
        py_repr_str((*v.d)[i].first, out);
        out += ": ";
        py_repr((*v.d)[i].second, out);
      }
      out += '}';
      return;
    case Value::T::Undefined: out += "Undefined"; return;
    default: out += v.to_string(); return;
  }
}

// A string's characters as Python sees them: UTF-8 code points (a byte that does not
// start a valid sequence counts as one character).
std::vector<std::string> code_points(const std::string& x) {
  std::vector<std::string> out;
  out.reserve(x.size());
  for (size_t i = 0; i < x.size();) {
    const unsigned char c = static_cast<unsigned char>(x[i]);
    size_t n = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 1;
    if (i + n > x.size()) n = 1;
    for (size_t k = 1; k < n; ++k)
      if ((static_cast<unsigned char>(x[i + k]) & 0xC0) != 0x80) n = 1;
    out.push_back(x.substr(i, n));
    i += n;
  }
  return out;
}

}  // namespace

std::string Value::to_string() const {
  switch (t) {
    case T::Undefined: return "";
    case T::None: return "None";
    case T::Bool: return b ? "True" : "False";
    case T::Int: return std::to_string(i);
    case T::Str: return s;
    case T::List:
    case T::Dict: {
      std::string out;
      py_repr(*this, out);
      return out;
    }
  }
  return "";
}

// ---- syntax tree ------------------------------------------------------------------

struct Node {
  enum class K {
    Block, Text, Output, If, For, Set,
    Lit, Var, Attr, Index, Slice, Call, Filter, Test, Unary, Binary, Ternary, ListLit, DictLit
  };
  K k;
  std::string s;
  Value lit;
  std::vector<std::shared_ptr<Node>> kids;
  std::vector<std::string> names;
  bool flag = false;  // If/For: has else; Test: negated; Set: attribute target
};
using NodeP = std::shared_ptr<Node>;

namespace {

NodeP mk(Node::K k, std::string s = {}) {
  auto n = std::make_shared<Node>();
  n->k = k;
  n->s = std::move(s);
  return n;
}

// ---- template lexing: text and tags, with whitespace control -----------------------

struct Seg {
  enum Kind { Text, Expr, Stmt } kind;
  std::string body;
};

size_t find_close(const std::string& src, size_t from, const char* close) {
  char quote = 0;
  for (size_t i = from; i + 1 < src.size(); ++i) {
    char c = src[i];
    if (quote) {
      if (c == '\\') ++i;
      else if (c == quote) quote = 0;
      continue;
    }
    if (c == '\'' || c == '"') quote = c;
    else if (c == close[0] && src[i + 1] == close[1]) return i;
  }
  return std::string::npos;
}

std::vector<Seg> segment(const std::string& src) {
  std::vector<Seg> out;
  size_t pos = 0;
  while (pos < src.size()) {
    size_t t = pos;
    while (true) {
      t = src.find('{', t);
      if (t == std::string::npos || t + 1 >= src.size()) {
        t = std::string::npos;
        break;
      }
      char n = src[t + 1];
      if (n == '{' || n == '%' || n == '#') break;
      ++t;
    }
    std::string text = src.substr(pos, t == std::string::npos ? std::string::npos : t - pos);
    if (t == std::string::npos) {
      if (!text.empty()) out.push_back({Seg::Text, text});
      break;
    }
    const char open = src[t + 1];
    const bool block = open == '%' || open == '#';
    const char* close = open == '{' ? "}}" : open == '%' ? "%}" : "#}";
    size_t body_start = t + 2;
    bool strip_left = body_start < src.size() && src[body_start] == '-';
    bool no_lstrip = body_start < src.size() && src[body_start] == '+';
    if (strip_left || no_lstrip) ++body_start;
    size_t c = open == '#' ? src.find("#}", body_start) : find_close(src, body_start, close);
    if (c == std::string::npos) fail(std::string("unclosed '{") + open + "'");
    bool strip_right = c > body_start && src[c - 1] == '-';
    std::string body = src.substr(body_start, c - body_start - (strip_right ? 1 : 0));
    if (strip_left) {
      while (!text.empty() && std::isspace(static_cast<unsigned char>(text.back()))) text.pop_back();
    } else if (block && !no_lstrip) {
      // lstrip_blocks: spaces and tabs between the start of a source line and a
      // block tag go (judged on the source, as Jinja's lexer does).
      size_t k = t;
      while (k > 0 && (src[k - 1] == ' ' || src[k - 1] == '\t')) --k;
      if (k == 0 || src[k - 1] == '\n') text.erase(text.size() - std::min(t - k, text.size()));
    }
    if (!text.empty()) out.push_back({Seg::Text, text});
    if (open == '{') out.push_back({Seg::Expr, body});
    else if (open == '%') out.push_back({Seg::Stmt, body});
    pos = c + 2;
    if (strip_right) {
      while (pos < src.size() && std::isspace(static_cast<unsigned char>(src[pos]))) ++pos;
    } else if (block) {
      // trim_blocks: the first newline after a block tag goes.
      if (pos < src.size() && src[pos] == '\n') ++pos;
      else if (pos + 1 < src.size() && src[pos] == '\r' && src[pos + 1] == '\n') pos += 2;
    }
  }
  return out;
}

// ---- expression lexing --------------------------------------------------------------

struct Tok {
  enum Kind { Name, Str, Int, Op, End } kind;
  std::string s;
  int64_t i = 0;
};

std::vector<Tok> lex_expr(const std::string& e) {
  std::vector<Tok> out;
  size_t i = 0;
  while (i < e.size()) {
    char c = e[i];
    if (std::isspace(static_cast<unsigned char>(c))) {
      ++i;
      continue;
    }
    if (std::isalpha(static_cast<unsigned char>(c)) || c == '_') {
      size_t j = i;
      while (j < e.size() && (std::isalnum(static_cast<unsigned char>(e[j])) || e[j] == '_')) ++j;
      out.push_back({Tok::Name, e.substr(i, j - i)});
      i = j;
      continue;
    }
    if (std::isdigit(static_cast<unsigned char>(c))) {
      int64_t v = 0;
      size_t j = i;
      while (j < e.size() && std::isdigit(static_cast<unsigned char>(e[j]))) {
        if (v > (int64_t{1} << 53)) fail("integer literal too large");
        v = v * 10 + (e[j++] - '0');
      }
      if (j < e.size() && e[j] == '.' && j + 1 < e.size() && std::isdigit(static_cast<unsigned char>(e[j + 1])))
        fail("floating-point literals are not supported");
      out.push_back({Tok::Int, "", v});
      i = j;
      continue;
    }
    if (c == '\'' || c == '"') {
      std::string s;
      size_t j = i + 1;
      while (j < e.size() && e[j] != c) {
        if (e[j] == '\\' && j + 1 < e.size()) {
          char n = e[++j];
          switch (n) {
            case 'n': s += '\n'; break;
            case 't': s += '\t'; break;
            case 'r': s += '\r'; break;
            case '\\': s += '\\'; break;
            case '\'': s += '\''; break;
            case '"': s += '"'; break;
            default: s += '\\'; s += n; break;
          }
          ++j;
        } else {
          s += e[j++];
        }
      }
      if (j >= e.size()) fail("unterminated string literal");
      out.push_back({Tok::Str, s});
      i = j + 1;
      continue;
    }
    static const char* two[] = {"==", "!=", "<=", ">=", "//"};
    bool matched = false;
    for (const char* op : two)
      if (e.compare(i, 2, op) == 0) {
        out.push_back({Tok::Op, op});
        i += 2;
        matched = true;
        break;
      }
    if (matched) continue;
    if (std::string("()[]{}.,:|+-*/%~<>=").find(c) != std::string::npos) {
      out.push_back({Tok::Op, std::string(1, c)});
      ++i;
      continue;
    }
    fail(std::string("unexpected character '") + c + "' in an expression");
  }
  if (out.size() > kMaxExprTokens)
    fail("an expression of more than " + std::to_string(kMaxExprTokens) + " tokens");
  out.push_back({Tok::End, ""});
  return out;
}

// ---- expression parsing --------------------------------------------------------------

class ExprParser {
 public:
  explicit ExprParser(const std::string& src) : t_(lex_expr(src)) {}
  NodeP parse_all() {
    NodeP n = expr();
    if (peek().kind != Tok::End) fail("unexpected '" + peek().s + "' in an expression");
    return n;
  }
  // Pieces for statements.
  const Tok& peek(size_t k = 0) const { return t_[std::min(p_ + k, t_.size() - 1)]; }
  bool is_name(const char* n, size_t k = 0) const { return peek(k).kind == Tok::Name && peek(k).s == n; }
  bool is_op(const char* o, size_t k = 0) const { return peek(k).kind == Tok::Op && peek(k).s == o; }
  std::string name() {
    if (peek().kind != Tok::Name) fail("expected a name");
    return t_[p_++].s;
  }
  void expect_op(const char* o) {
    if (!is_op(o)) fail(std::string("expected '") + o + "'");
    ++p_;
  }
  void expect_name(const char* n) {
    if (!is_name(n)) fail(std::string("expected '") + n + "'");
    ++p_;
  }
  bool at_end() const { return peek().kind == Tok::End; }
  NodeP expr() { return ternary(); }
  // Without the ternary: used where `if` is a keyword of the statement (for ... if).
  NodeP or_expr() {
    NestGuard g(nest_);
    NodeP l = and_expr();
    while (is_name("or")) {
      ++p_;
      l = bin("or", l, and_expr());
    }
    return l;
  }

 private:
  static NodeP bin(const std::string& op, NodeP a, NodeP b) {
    NodeP n = mk(Node::K::Binary, op);
    n->kids = {std::move(a), std::move(b)};
    return n;
  }
  NodeP ternary() {
    NestGuard g(nest_);
    NodeP v = or_expr();
    if (is_name("if")) {
      ++p_;
      NodeP cond = or_expr();
      NodeP n = mk(Node::K::Ternary);
      n->kids = {v, cond, nullptr};
      if (is_name("else")) {
        ++p_;
        n->kids[2] = ternary();
      }
      return n;
    }
    return v;
  }
  NodeP and_expr() {
    NodeP l = not_expr();
    while (is_name("and")) {
      ++p_;
      l = bin("and", l, not_expr());
    }
    return l;
  }
  NodeP not_expr() {
    NestGuard g(nest_);
    if (is_name("not")) {
      ++p_;
      NodeP n = mk(Node::K::Unary, "not");
      n->kids = {not_expr()};
      return n;
    }
    return compare();
  }
  NodeP compare() {
    NodeP l = concat();
    while (true) {
      if (peek().kind == Tok::Op && (peek().s == "==" || peek().s == "!=" || peek().s == "<" ||
                                     peek().s == ">" || peek().s == "<=" || peek().s == ">=")) {
        std::string op = t_[p_++].s;
        l = bin(op, l, concat());
      } else if (is_name("in")) {
        ++p_;
        l = bin("in", l, concat());
      } else if (is_name("not") && is_name("in", 1)) {
        p_ += 2;
        l = bin("not in", l, concat());
      } else if (is_name("is")) {
        ++p_;
        NodeP n = mk(Node::K::Test);
        if (is_name("not")) {
          ++p_;
          n->flag = true;
        }
        n->s = name();
        n->kids = {l};
        l = n;
      } else {
        return l;
      }
    }
  }
  NodeP concat() {
    NodeP l = additive();
    while (is_op("~")) {
      ++p_;
      l = bin("~", l, additive());
    }
    return l;
  }
  NodeP additive() {
    NodeP l = mult();
    while (is_op("+") || is_op("-")) {
      std::string op = t_[p_++].s;
      l = bin(op, l, mult());
    }
    return l;
  }
  NodeP mult() {
    NodeP l = unary();
    while (is_op("*") || is_op("/") || is_op("//") || is_op("%")) {
      std::string op = t_[p_++].s;
      l = bin(op, l, unary());
    }
    return l;
  }
  NodeP unary() {
    NestGuard g(nest_);
    if (is_op("-")) {
      ++p_;
      NodeP n = mk(Node::K::Unary, "-");
      n->kids = {unary()};
      return n;
    }
    return postfix(primary());
  }
  void call_args(NodeP& n) {
    // After '(' : positional and keyword arguments.
    while (!is_op(")")) {
      if (peek().kind == Tok::Name && is_op("=", 1)) {
        n->names.push_back(name());
        ++p_;
      } else {
        n->names.push_back("");
      }
      n->kids.push_back(expr());
      if (!is_op(",")) break;
      ++p_;
    }
    expect_op(")");
  }
  NodeP postfix(NodeP n) {
    while (true) {
      if (is_op(".")) {
        ++p_;
        NodeP a = mk(Node::K::Attr, name());
        a->kids = {n};
        n = a;
      } else if (is_op("[")) {
        ++p_;
        NodeP parts[3] = {nullptr, nullptr, nullptr};
        int idx = 0;
        bool slice = false;
        while (true) {
          if (is_op(":")) {
            slice = true;
            ++p_;
            if (++idx > 2) fail("bad slice");
            continue;
          }
          if (is_op("]")) break;
          parts[idx] = expr();
        }
        expect_op("]");
        NodeP x = mk(slice ? Node::K::Slice : Node::K::Index);
        if (!slice && !parts[0]) fail("empty subscript");
        x->kids = {n, parts[0], parts[1], parts[2]};
        n = x;
      } else if (is_op("(")) {
        ++p_;
        NodeP c = mk(Node::K::Call);
        c->kids = {n};
        c->names = {""};
        call_args(c);
        n = c;
      } else if (is_op("|")) {
        ++p_;
        NodeP f = mk(Node::K::Filter, name());
        f->kids = {n};
        f->names = {""};
        if (is_op("(")) {
          ++p_;
          call_args(f);
        }
        n = f;
      } else {
        return n;
      }
    }
  }
  NodeP primary() {
    const Tok& t = peek();
    if (t.kind == Tok::Str) {
      ++p_;
      NodeP n = mk(Node::K::Lit);
      n->lit = Value::str(t.s);
      // Adjacent string literals concatenate.
      while (peek().kind == Tok::Str) n->lit.s += t_[p_++].s;
      return n;
    }
    if (t.kind == Tok::Int) {
      ++p_;
      NodeP n = mk(Node::K::Lit);
      n->lit = Value::integer(t.i);
      return n;
    }
    if (t.kind == Tok::Name) {
      ++p_;
      NodeP n = mk(Node::K::Lit);
      if (t.s == "true" || t.s == "True") n->lit = Value::boolean(true);
      else if (t.s == "false" || t.s == "False") n->lit = Value::boolean(false);
      else if (t.s == "none" || t.s == "None") n->lit = Value::none();
      else return mk(Node::K::Var, t.s);
      return n;
    }
    if (is_op("(")) {
      ++p_;
      NodeP n = expr();
      expect_op(")");
      return n;
    }
    if (is_op("[")) {
      ++p_;
      NodeP n = mk(Node::K::ListLit);
      while (!is_op("]")) {
        n->kids.push_back(expr());
        if (!is_op(",")) break;
        ++p_;
      }
      expect_op("]");
      return n;
    }
    if (is_op("{")) {
      ++p_;
      NodeP n = mk(Node::K::DictLit);
      while (!is_op("}")) {
        n->kids.push_back(expr());
        expect_op(":");
        n->kids.push_back(expr());
        if (!is_op(",")) break;
        ++p_;
      }
      expect_op("}");
      return n;
    }
    fail(t.kind == Tok::End ? "unexpected end of expression" : "unexpected '" + t.s + "'");
  }

  std::vector<Tok> t_;
  size_t p_ = 0;
  int nest_ = 0;
};

// ---- statement parsing ------------------------------------------------------------------

class StmtParser {
 public:
  explicit StmtParser(std::vector<Seg> segs) : s_(std::move(segs)) {}
  NodeP parse() {
    std::string end;
    NodeP b = block({}, &end);
    if (!end.empty()) fail("unexpected '{% " + end + " %}'");
    return b;
  }

 private:
  static std::string keyword(const std::string& body) {
    size_t i = 0;
    while (i < body.size() && std::isspace(static_cast<unsigned char>(body[i]))) ++i;
    size_t j = i;
    while (j < body.size() && (std::isalnum(static_cast<unsigned char>(body[j])) || body[j] == '_')) ++j;
    return body.substr(i, j - i);
  }
  static std::string rest(const std::string& body) {
    std::string k = keyword(body);
    return body.substr(body.find(k) + k.size());
  }

  NodeP block(const std::vector<std::string>& stops, std::string* stopped_at) {
    NestGuard g(nest_);
    NodeP b = mk(Node::K::Block);
    stopped_at->clear();
    while (i_ < s_.size()) {
      const Seg& seg = s_[i_];
      if (seg.kind == Seg::Text) {
        NodeP t = mk(Node::K::Text, seg.body);
        b->kids.push_back(t);
        ++i_;
        continue;
      }
      if (seg.kind == Seg::Expr) {
        NodeP o = mk(Node::K::Output);
        o->kids = {ExprParser(seg.body).parse_all()};
        b->kids.push_back(o);
        ++i_;
        continue;
      }
      std::string kw = keyword(seg.body);
      if (std::find(stops.begin(), stops.end(), kw) != stops.end()) {
        *stopped_at = kw;
        return b;
      }
      ++i_;
      if (kw == "if") b->kids.push_back(parse_if(rest(seg.body)));
      else if (kw == "for") b->kids.push_back(parse_for(rest(seg.body)));
      else if (kw == "set") b->kids.push_back(parse_set(rest(seg.body)));
      else if (kw == "generation" || kw == "endgeneration") continue;  // markers only
      else if (kw == "endif" || kw == "endfor" || kw == "else" || kw == "elif") {
        *stopped_at = kw;
        --i_;
        return b;
      } else fail("unsupported statement '{% " + kw + " %}'");
    }
    return b;
  }
  NodeP parse_if(const std::string& cond) {
    NodeP n = mk(Node::K::If);
    n->kids.push_back(ExprParser(cond).parse_all());
    std::string end;
    n->kids.push_back(block({"elif", "else", "endif"}, &end));
    while (true) {
      if (end.empty()) fail("missing '{% endif %}'");
      const std::string body = s_[i_++].body;
      if (end == "endif") return n;
      if (end == "elif") {
        n->kids.push_back(ExprParser(rest(body)).parse_all());
        n->kids.push_back(block({"elif", "else", "endif"}, &end));
      } else {  // else
        n->flag = true;
        n->kids.push_back(block({"endif"}, &end));
        if (end != "endif") fail("missing '{% endif %}'");
        ++i_;
        return n;
      }
    }
  }
  NodeP parse_for(const std::string& head) {
    ExprParser p(head);
    NodeP n = mk(Node::K::For);
    n->names.push_back(p.name());
    if (p.is_op(",")) {
      p.expect_op(",");
      n->names.push_back(p.name());
    }
    p.expect_name("in");
    n->kids.push_back(p.or_expr());
    if (!p.at_end()) fail("unsupported 'for' clause (loop filters and recursive loops)");
    std::string end;
    n->kids.push_back(block({"else", "endfor"}, &end));
    if (end.empty()) fail("missing '{% endfor %}'");
    ++i_;
    if (end == "else") {
      n->flag = true;
      n->kids.push_back(block({"endfor"}, &end));
      if (end != "endfor") fail("missing '{% endfor %}'");
      ++i_;
    }
    return n;
  }
  NodeP parse_set(const std::string& body) {
    ExprParser p(body);
    NodeP n = mk(Node::K::Set);
    n->names.push_back(p.name());
    if (p.is_op(".")) {
      p.expect_op(".");
      n->names.push_back(p.name());
      n->flag = true;
    }
    if (!p.is_op("=")) fail("block '{% set %}' is not supported");
    p.expect_op("=");
    n->kids.push_back(p.expr());
    if (!p.at_end()) fail("unexpected text after '{% set ... %}'");
    return n;
  }

  std::vector<Seg> s_;
  size_t i_ = 0;
  int nest_ = 0;
};

// ---- evaluation ------------------------------------------------------------------------

class Eval {
 public:
  explicit Eval(const std::map<std::string, Value>& vars) { scopes_.push_back(vars); }
  std::string out;

  void exec(const Node& n) {
    switch (n.k) {
      case Node::K::Block:
        for (const auto& k : n.kids) exec(*k);
        return;
      case Node::K::Text:
        emit(n.s);
        return;
      case Node::K::Output:
        emit(eval(*n.kids[0]).to_string());
        return;
      case Node::K::If: {
        size_t pairs = (n.kids.size() - (n.flag ? 1 : 0)) / 2;
        for (size_t i = 0; i < pairs; ++i)
          if (eval(*n.kids[2 * i]).truthy()) {
            exec(*n.kids[2 * i + 1]);
            return;
          }
        if (n.flag) exec(*n.kids.back());
        return;
      }
      case Node::K::For: {
        Value it = eval(*n.kids[0]);
        List items;
        if (it.t == Value::T::List) items = *it.l;
        else if (it.t == Value::T::Dict)
          for (const auto& kv : *it.d) items.push_back(Value::str(kv.first));
        else if (it.t == Value::T::Str)
          for (std::string& c : code_points(it.s)) items.push_back(Value::str(std::move(c)));
        else if (it.t != Value::T::Undefined && it.t != Value::T::None) fail("cannot iterate over this value");
        if (items.empty()) {
          if (n.flag) exec(*n.kids[2]);
          return;
        }
        const int64_t len = static_cast<int64_t>(items.size());
        for (int64_t i = 0; i < len; ++i) {
          if (++iterations_ > kMaxIterations) fail("too many loop iterations");
          std::map<std::string, Value> scope;
          if (n.names.size() == 2) {
            const Value& pair = items[i];
            if (pair.t != Value::T::List || pair.l->size() != 2) fail("cannot unpack a loop item into two names");
            scope[n.names[0]] = (*pair.l)[0];
            scope[n.names[1]] = (*pair.l)[1];
          } else {
            scope[n.names[0]] = items[i];
          }
          Value loop = Value::dict();
          loop.set("index", Value::integer(i + 1));
          loop.set("index0", Value::integer(i));
          loop.set("revindex", Value::integer(len - i));
          loop.set("revindex0", Value::integer(len - i - 1));
          loop.set("first", Value::boolean(i == 0));
          loop.set("last", Value::boolean(i + 1 == len));
          loop.set("length", Value::integer(len));
          if (i > 0) loop.set("previtem", items[i - 1]);
          if (i + 1 < len) loop.set("nextitem", items[i + 1]);
          scope["loop"] = loop;
          scopes_.push_back(std::move(scope));
          exec(*n.kids[1]);
          scopes_.pop_back();
        }
        return;
      }
      case Node::K::Set: {
        Value v = eval(*n.kids[0]);
        if (n.flag) {
          Value* ns = lookup_mut(n.names[0]);
          if (!ns || ns->t != Value::T::Dict || !ns->ns) fail("'" + n.names[0] + "' is not a namespace");
          ns->set(n.names[1], std::move(v));
        } else {
          scopes_.back()[n.names[0]] = std::move(v);
        }
        return;
      }
      default:
        fail("internal: not a statement");
    }
  }

 private:
  void emit(const std::string& s) {
    if (out.size() + s.size() > kMaxOutput) fail("the rendered text is too long");
    out += s;
  }
  Value* lookup_mut(const std::string& name) {
    for (auto it = scopes_.rbegin(); it != scopes_.rend(); ++it) {
      auto f = it->find(name);
      if (f != it->end()) return &f->second;
    }
    return nullptr;
  }
  static bool is_global_function(const std::string& name) {
    return name == "raise_exception" || name == "namespace" || name == "range" || name == "strftime_now";
  }
  static bool equal(const Value& a, const Value& b) {
    auto num = [](const Value& v) { return v.t == Value::T::Int || v.t == Value::T::Bool; };
    if (num(a) && num(b)) return (a.t == Value::T::Int ? a.i : a.b) == (b.t == Value::T::Int ? b.i : b.b);
    if (a.t != b.t) return false;
    switch (a.t) {
      case Value::T::Undefined:
      case Value::T::None: return true;
      case Value::T::Str: return a.s == b.s;
      case Value::T::List:
        if (a.l->size() != b.l->size()) return false;
        for (size_t i = 0; i < a.l->size(); ++i)
          if (!equal((*a.l)[i], (*b.l)[i])) return false;
        return true;
      case Value::T::Dict: {  // as Python: the same keys with equal values, in any order
        if (a.d->size() != b.d->size()) return false;
        for (const auto& [k, x] : *a.d) {
          const Value* y = b.get(k);
          if (!y || !equal(x, *y)) return false;
        }
        return true;
      }
      default: return false;
    }
  }
  static int64_t as_int(const Value& v, const char* what) {
    if (v.t == Value::T::Int) return v.i;
    if (v.t == Value::T::Bool) return v.b;
    fail(std::string(what) + " needs a number");
  }
  static Value index(const Value& obj, const Value& key) {
    if (obj.t == Value::T::Dict) {
      if (key.t != Value::T::Str) return Value();
      const Value* v = obj.get(key.s);
      return v ? *v : Value();
    }
    if (obj.t == Value::T::List || obj.t == Value::T::Str) {
      if (key.t != Value::T::Int) return Value();
      const std::vector<std::string> cps = obj.t == Value::T::Str ? code_points(obj.s) : std::vector<std::string>{};
      int64_t n = obj.t == Value::T::List ? static_cast<int64_t>(obj.l->size()) : static_cast<int64_t>(cps.size());
      int64_t i = key.i < 0 ? key.i + n : key.i;
      if (i < 0 || i >= n) return Value();
      return obj.t == Value::T::List ? (*obj.l)[i] : Value::str(cps[i]);
    }
    return Value();
  }
  static std::string strip(const std::string& s, bool left, bool right, const std::string& chars = " \t\n\r\f\v") {
    size_t a = 0, b = s.size();
    if (left) while (a < b && chars.find(s[a]) != std::string::npos) ++a;
    if (right) while (b > a && chars.find(s[b - 1]) != std::string::npos) --b;
    return s.substr(a, b - a);
  }
  static std::string replace_all(std::string s, const std::string& from, const std::string& to) {
    if (from.empty()) return s;
    size_t p = 0;
    while ((p = s.find(from, p)) != std::string::npos) {
      s.replace(p, from.size(), to);
      p += to.size();
    }
    return s;
  }
  static std::string title(std::string s, bool only_first) {
    bool start = true;
    for (char& c : s) {
      if (std::isalpha(static_cast<unsigned char>(c))) {
        c = start ? std::toupper(static_cast<unsigned char>(c)) : (only_first ? std::tolower(static_cast<unsigned char>(c)) : std::tolower(static_cast<unsigned char>(c)));
        start = false;
      } else if (!only_first) {
        start = true;
      }
    }
    return s;
  }
  static Value items_of(const Value& d) {
    List out;
    if (d.t == Value::T::Dict)
      for (const auto& [k, v] : *d.d) out.push_back(Value::list({Value::str(k), v}));
    return Value::list(std::move(out));
  }
  std::vector<Value> args(const Node& n, size_t from) {
    std::vector<Value> a;
    for (size_t i = from; i < n.kids.size(); ++i) a.push_back(eval(*n.kids[i]));
    return a;
  }

  Value method(const Value& obj, const std::string& m, const std::vector<Value>& a) {
    auto arg_str = [&](size_t i) -> std::string {
      if (i >= a.size() || a[i].t != Value::T::Str) fail("'" + m + "' needs a string argument");
      return a[i].s;
    };
    if (obj.t == Value::T::Str) {
      const std::string& s = obj.s;
      if (m == "strip") return Value::str(a.empty() ? strip(s, true, true) : strip(s, true, true, arg_str(0)));
      if (m == "lstrip") return Value::str(a.empty() ? strip(s, true, false) : strip(s, true, false, arg_str(0)));
      if (m == "rstrip") return Value::str(a.empty() ? strip(s, false, true) : strip(s, false, true, arg_str(0)));
      if (m == "upper" || m == "lower") {
        std::string r = s;
        for (char& c : r) c = m == "upper" ? std::toupper(static_cast<unsigned char>(c)) : std::tolower(static_cast<unsigned char>(c));
        return Value::str(r);
      }
      if (m == "startswith") return Value::boolean(s.rfind(arg_str(0), 0) == 0);
      if (m == "endswith") {
        std::string x = arg_str(0);
        return Value::boolean(s.size() >= x.size() && s.compare(s.size() - x.size(), x.size(), x) == 0);
      }
      if (m == "replace") return Value::str(replace_all(s, arg_str(0), arg_str(1)));
      if (m == "title") return Value::str(title(s, false));
      if (m == "capitalize") return Value::str(title(s, true));
      if (m == "split") {
        List parts;
        if (a.empty()) {
          size_t i = 0;
          while (i < s.size()) {
            while (i < s.size() && std::isspace(static_cast<unsigned char>(s[i]))) ++i;
            size_t j = i;
            while (j < s.size() && !std::isspace(static_cast<unsigned char>(s[j]))) ++j;
            if (j > i) parts.push_back(Value::str(s.substr(i, j - i)));
            i = j;
          }
        } else {
          std::string sep = arg_str(0);
          if (sep.empty()) fail("empty separator");
          size_t p = 0, q;
          while ((q = s.find(sep, p)) != std::string::npos) {
            parts.push_back(Value::str(s.substr(p, q - p)));
            p = q + sep.size();
          }
          parts.push_back(Value::str(s.substr(p)));
        }
        return Value::list(std::move(parts));
      }
    }
    if (obj.t == Value::T::Dict) {
      if (m == "items") return items_of(obj);
      if (m == "keys" || m == "values") {
        List out;
        for (const auto& [k, v] : *obj.d) out.push_back(m == "keys" ? Value::str(k) : v);
        return Value::list(std::move(out));
      }
      if (m == "get") {
        const Value* v = obj.get(arg_str(0));
        return v ? *v : (a.size() > 1 ? a[1] : Value::none());
      }
    }
    fail("unsupported method '" + m + "'");
  }

  // The items a select/reject/selectattr/rejectattr/map filter walks (a dict: its keys).
  static List iterated(const Value& v) {
    if (v.t == Value::T::List) return *v.l;
    List r;
    if (v.t == Value::T::Dict)
      for (const auto& kv : *v.d) r.push_back(Value::str(kv.first));
    if (v.t == Value::T::Str)
      for (std::string& c : code_points(v.s)) r.push_back(Value::str(std::move(c)));
    return r;
  }

  Value filter(const std::string& f, const Value& v, const std::vector<Value>& a,
               const std::vector<std::string>& names) {
    auto kw = [&](const std::string& k) -> const Value* {
      for (size_t i = 0; i < a.size(); ++i)
        if (names[i] == k) return &a[i];
      return nullptr;
    };
    auto positional = [&] {
      std::vector<Value> p;
      for (size_t i = 0; i < a.size(); ++i)
        if (names[i].empty()) p.push_back(a[i]);
      return p;
    };
    if (f == "tojson") {
      int64_t indent = -1;
      for (size_t i = 0; i < a.size(); ++i) {
        if (names[i].empty() || names[i] == "indent") {
          if (a[i].t == Value::T::None) continue;
          indent = as_int(a[i], "tojson indent");
          if (indent < 0 || indent > 64) fail("tojson: indent out of range");
        } else {
          fail("tojson: unsupported argument '" + names[i] + "'");
        }
      }
      std::string out;
      py_json(v, indent, 0, out);
      return Value::str(std::move(out));
    }
    if (f == "selectattr" || f == "rejectattr" || f == "select" || f == "reject") {
      // select(test, arg) / selectattr(attr, test, arg): Jinja's test on each item (its
      // truth without a test); reject* keep the items the test fails.
      const bool attr = f == "selectattr" || f == "rejectattr";
      const bool keep = f == "selectattr" || f == "select";
      const std::vector<Value> p = positional();
      if (p.size() != a.size()) fail("'" + f + "' takes positional arguments only");
      if (attr && (p.empty() || p[0].t != Value::T::Str)) fail("'" + f + "' needs an attribute name");
      const size_t ti = attr ? 1 : 0;
      if (p.size() > ti && p[ti].t != Value::T::Str) fail("'" + f + "' needs a test name");
      if (p.size() > ti + 2) fail("'" + f + "': too many arguments");
      List out;
      for (const Value& item : iterated(v)) {
        Value x = item;
        if (attr) {
          const Value* y = item.t == Value::T::Dict ? item.get(p[0].s) : nullptr;
          x = y ? *y : Value();
        }
        const bool r = p.size() > ti ? test(p[ti].s, x, p.size() > ti + 1 ? &p[ti + 1] : nullptr) : x.truthy();
        if (r == keep) out.push_back(item);
      }
      return Value::list(std::move(out));
    }
    if (f == "map") {
      List out;
      if (const Value* at = kw("attribute")) {
        if (at->t != Value::T::Str) fail("map: attribute must be a string");
        const Value* dflt = kw("default");
        for (const Value& item : iterated(v)) {
          const Value* y = item.t == Value::T::Dict ? item.get(at->s) : nullptr;
          out.push_back(y ? *y : dflt ? *dflt : Value());
        }
        return Value::list(std::move(out));
      }
      const std::vector<Value> p = positional();
      if (p.empty() || p[0].t != Value::T::Str || p.size() != a.size()) fail("map needs a filter name or attribute=");
      const std::vector<Value> rest(p.begin() + 1, p.end());
      const std::vector<std::string> rest_names(rest.size());
      for (const Value& item : iterated(v)) out.push_back(filter(p[0].s, item, rest, rest_names));
      return Value::list(std::move(out));
    }
    if (f == "trim") return Value::str(strip(v.to_string(), true, true));
    if (f == "length" || f == "count") {
      if (v.t == Value::T::List) return Value::integer(static_cast<int64_t>(v.l->size()));
      if (v.t == Value::T::Dict) return Value::integer(static_cast<int64_t>(v.d->size()));
      if (v.t == Value::T::Str) return Value::integer(static_cast<int64_t>(code_points(v.s).size()));
      return Value::integer(0);
    }
    if (f == "upper" || f == "lower" || f == "title" || f == "capitalize")
      return method(Value::str(v.to_string()), f, {});
    if (f == "string") return Value::str(v.to_string());
    if (f == "safe") return v;
    if (f == "first" || f == "last") {
      if (v.t == Value::T::List) return v.l->empty() ? Value() : (f == "first" ? v.l->front() : v.l->back());
      if (v.t == Value::T::Str) {
        const std::vector<std::string> cps = code_points(v.s);
        return cps.empty() ? Value() : Value::str(f == "first" ? cps.front() : cps.back());
      }
      return Value();
    }
    if (f == "join") {
      std::string sep = a.empty() ? "" : a[0].to_string(), r;
      if (v.t == Value::T::List)
        for (size_t i = 0; i < v.l->size(); ++i) r += (i ? sep : "") + (*v.l)[i].to_string();
      return Value::str(r);
    }
    if (f == "default" || f == "d") {
      bool use = v.t == Value::T::Undefined || (a.size() > 1 && a[1].truthy() && !v.truthy());
      return use ? (a.empty() ? Value::str("") : a[0]) : v;
    }
    if (f == "replace") {
      if (a.size() < 2) fail("'replace' needs two arguments");
      return Value::str(replace_all(v.to_string(), a[0].to_string(), a[1].to_string()));
    }
    if (f == "reverse") {
      if (v.t == Value::T::List) {
        List r(v.l->rbegin(), v.l->rend());
        return Value::list(std::move(r));
      }
      const std::vector<std::string> cps = code_points(v.to_string());
      std::string r;
      for (auto it = cps.rbegin(); it != cps.rend(); ++it) r += *it;
      return Value::str(std::move(r));
    }
    if (f == "list") {
      if (v.t == Value::T::List) return v;
      List r;
      if (v.t == Value::T::Str) for (std::string& c : code_points(v.s)) r.push_back(Value::str(std::move(c)));
      if (v.t == Value::T::Dict) for (const auto& kv : *v.d) r.push_back(Value::str(kv.first));
      return Value::list(std::move(r));
    }
    if (f == "int") {
      if (v.t == Value::T::Int) return v;
      if (v.t == Value::T::Bool) return Value::integer(v.b);
      if (v.t == Value::T::Str) {
        try {
          return Value::integer(std::stoll(v.s));
        } catch (...) {
          return Value::integer(0);
        }
      }
      return Value::integer(0);
    }
    if (f == "items") return items_of(v);
    fail("unsupported filter '" + f + "'");
  }

  // A Jinja test; arg: its argument (equalto/eq/==, ne/!=), nullptr if none.
  bool test(const std::string& t, const Value& v, const Value* arg) {
    if (t == "equalto" || t == "eq" || t == "==" || t == "ne" || t == "!=") {
      if (!arg) fail("test '" + t + "' needs an argument");
      return equal(v, *arg) != (t == "ne" || t == "!=");
    }
    if (t == "defined") return v.t != Value::T::Undefined;
    if (t == "undefined") return v.t == Value::T::Undefined;
    if (t == "none") return v.t == Value::T::None;
    if (t == "string") return v.t == Value::T::Str;
    if (t == "number" || t == "integer") return v.t == Value::T::Int;
    if (t == "boolean") return v.t == Value::T::Bool;
    if (t == "true") return v.t == Value::T::Bool && v.b;
    if (t == "false") return v.t == Value::T::Bool && !v.b;
    if (t == "mapping") return v.t == Value::T::Dict;
    if (t == "sequence" || t == "iterable") return v.t == Value::T::List || v.t == Value::T::Str || v.t == Value::T::Dict;
    fail("unsupported test '" + t + "'");
  }

  Value eval(const Node& n) {
    switch (n.k) {
      case Node::K::Lit: return n.lit;
      case Node::K::Var: {
        for (auto it = scopes_.rbegin(); it != scopes_.rend(); ++it) {
          auto f = it->find(n.s);
          if (f != it->end()) return f->second;
        }
        return Value();
      }
      case Node::K::Attr: {
        Value o = eval(*n.kids[0]);
        if (o.t == Value::T::Dict) {
          const Value* v = o.get(n.s);
          if (v) return *v;
        }
        return Value();
      }
      case Node::K::Index: return index(eval(*n.kids[0]), eval(*n.kids[1]));
      case Node::K::Slice: {
        Value o = eval(*n.kids[0]);
        const std::vector<std::string> cps = o.t == Value::T::Str ? code_points(o.s) : std::vector<std::string>{};
        const int64_t len = o.t == Value::T::List ? static_cast<int64_t>(o.l->size())
                            : o.t == Value::T::Str ? static_cast<int64_t>(cps.size()) : -1;
        if (len < 0) fail("cannot slice this value");
        int64_t step = n.kids[3] ? as_int(eval(*n.kids[3]), "slice") : 1;
        if (step == 0) fail("slice step cannot be zero");
        auto bound = [&](const NodeP& e, int64_t dflt) {
          if (!e) return dflt;
          int64_t x = as_int(eval(*e), "slice");
          if (x < 0) x += len;
          return std::clamp<int64_t>(x, step > 0 ? 0 : -1, step > 0 ? len : len - 1);
        };
        int64_t a = bound(n.kids[1], step > 0 ? 0 : len - 1), b = bound(n.kids[2], step > 0 ? len : -1);
        List r;
        std::string rs;
        for (int64_t i = a; step > 0 ? i < b : i > b; i += step) {
          if (o.t == Value::T::List) r.push_back((*o.l)[i]);
          else rs += cps[i];
        }
        return o.t == Value::T::List ? Value::list(std::move(r)) : Value::str(rs);
      }
      case Node::K::Call: {
        const Node& callee = *n.kids[0];
        if (callee.k == Node::K::Attr) return method(eval(*callee.kids[0]), callee.s, args(n, 1));
        if (callee.k == Node::K::Var) {
          if (callee.s == "raise_exception") {
            std::vector<Value> a = args(n, 1);
            throw Raised(a.empty() ? "template error" : a[0].to_string());
          }
          if (callee.s == "strftime_now") {
            // transformers' global: datetime.now().strftime(format), local time, C locale.
            std::vector<Value> a = args(n, 1);
            if (a.size() != 1 || a[0].t != Value::T::Str) fail("strftime_now needs one format string");
            if (a[0].s.size() > 256) fail("strftime_now: format too long");
            const std::time_t now = std::time(nullptr);
            std::tm tm{};
            localtime_r(&now, &tm);
            std::ostringstream os;
            os.imbue(std::locale::classic());
            os << std::put_time(&tm, a[0].s.c_str());
            return Value::str(os.str());
          }
          if (callee.s == "namespace") {
            Value ns = Value::namespace_();
            for (size_t i = 1; i < n.kids.size(); ++i)
              if (!n.names[i].empty()) ns.set(n.names[i], eval(*n.kids[i]));
            return ns;
          }
          if (callee.s == "range") {
            std::vector<Value> a = args(n, 1);
            if (a.empty() || a.size() > 2) fail("range() takes one or two arguments");
            int64_t lo = a.size() == 2 ? as_int(a[0], "range") : 0, hi = as_int(a.back(), "range");
            if (hi - lo > kMaxIterations) fail("range too large");
            List r;
            for (int64_t i = lo; i < hi; ++i) r.push_back(Value::integer(i));
            return Value::list(std::move(r));
          }
        }
        fail("unsupported function call");
      }
      case Node::K::Filter: {
        std::vector<std::string> names(n.names.begin() + 1, n.names.end());
        return filter(n.s, eval(*n.kids[0]), args(n, 1), names);
      }
      case Node::K::Test: {
        // The global functions are defined (templates test `strftime_now is defined`).
        const Node& x = *n.kids[0];
        if (x.k == Node::K::Var && (n.s == "defined" || n.s == "undefined") && is_global_function(x.s) &&
            !lookup_mut(x.s))
          return Value::boolean((n.s == "defined") != n.flag);
        return Value::boolean(test(n.s, eval(x), nullptr) != n.flag);
      }
      case Node::K::Unary: {
        Value v = eval(*n.kids[0]);
        if (n.s == "not") return Value::boolean(!v.truthy());
        return Value::integer(-as_int(v, "'-'"));
      }
      case Node::K::Ternary: {
        if (eval(*n.kids[1]).truthy()) return eval(*n.kids[0]);
        return n.kids[2] ? eval(*n.kids[2]) : Value();
      }
      case Node::K::ListLit: {
        List r;
        for (const auto& k : n.kids) r.push_back(eval(*k));
        return Value::list(std::move(r));
      }
      case Node::K::DictLit: {
        Value d = Value::dict();
        for (size_t i = 0; i + 1 < n.kids.size(); i += 2) d.set(eval(*n.kids[i]).to_string(), eval(*n.kids[i + 1]));
        return d;
      }
      case Node::K::Binary: return binary(n);
      default: fail("internal: not an expression");
    }
  }

  Value binary(const Node& n) {
    const std::string& op = n.s;
    if (op == "and") {
      Value a = eval(*n.kids[0]);
      return a.truthy() ? eval(*n.kids[1]) : a;
    }
    if (op == "or") {
      Value a = eval(*n.kids[0]);
      return a.truthy() ? a : eval(*n.kids[1]);
    }
    Value a = eval(*n.kids[0]), b = eval(*n.kids[1]);
    if (op == "==") return Value::boolean(equal(a, b));
    if (op == "!=") return Value::boolean(!equal(a, b));
    if (op == "~") return Value::str(a.to_string() + b.to_string());
    if (op == "in" || op == "not in") {
      bool r = false;
      if (b.t == Value::T::Str) r = b.s.find(a.to_string()) != std::string::npos;
      else if (b.t == Value::T::List) r = std::any_of(b.l->begin(), b.l->end(), [&](const Value& x) { return equal(a, x); });
      else if (b.t == Value::T::Dict) r = a.t == Value::T::Str && b.get(a.s) != nullptr;
      return Value::boolean(op == "in" ? r : !r);
    }
    if (op == "+") {
      if (a.t == Value::T::Str && b.t == Value::T::Str) {
        if (a.s.size() + b.s.size() > kMaxOutput) fail("string too long");
        return Value::str(a.s + b.s);
      }
      if (a.t == Value::T::List && b.t == Value::T::List) {
        List r = *a.l;
        r.insert(r.end(), b.l->begin(), b.l->end());
        return Value::list(std::move(r));
      }
      if (a.t == Value::T::Str || b.t == Value::T::Str) fail("cannot add a string and a non-string");
      return Value::integer(as_int(a, "'+'") + as_int(b, "'+'"));
    }
    if (op == "<" || op == ">" || op == "<=" || op == ">=") {
      int c;
      if (a.t == Value::T::Str && b.t == Value::T::Str) c = a.s.compare(b.s);
      else {
        int64_t x = as_int(a, "comparison"), y = as_int(b, "comparison");
        c = x < y ? -1 : x > y ? 1 : 0;
      }
      return Value::boolean(op == "<" ? c < 0 : op == ">" ? c > 0 : op == "<=" ? c <= 0 : c >= 0);
    }
    if (op == "*" && a.t == Value::T::Str) {
      int64_t k = as_int(b, "'*'");
      if (k < 0 || static_cast<size_t>(k) * a.s.size() > kMaxOutput) fail("string repetition too large");
      std::string r;
      for (int64_t i = 0; i < k; ++i) r += a.s;
      return Value::str(r);
    }
    int64_t x = as_int(a, "arithmetic"), y = as_int(b, "arithmetic");
    if (op == "-") return Value::integer(x - y);
    if (op == "*") return Value::integer(x * y);
    if (y == 0) fail("division by zero");
    if (op == "/" || op == "//") return Value::integer(x / y);
    if (op == "%") return Value::integer(((x % y) + y) % y);
    fail("unsupported operator '" + op + "'");
  }

  std::vector<std::map<std::string, Value>> scopes_;
  int64_t iterations_ = 0;
};

}  // namespace

namespace {
// The depth of a parsed tree, without recursing (left-deep chains such as a+b+c+...
// are built in loops, so the parser's recursion bound does not bound them).
int tree_depth(const Node& root) {
  int deepest = 0;
  std::vector<std::pair<const Node*, int>> todo{{&root, 1}};
  while (!todo.empty()) {
    auto [n, d] = todo.back();
    todo.pop_back();
    deepest = std::max(deepest, d);
    for (const auto& k : n->kids)
      if (k) todo.push_back({k.get(), d + 1});
  }
  return deepest;
}
}  // namespace

Template::Template(const std::string& source) {
  root_ = StmtParser(segment(source)).parse();
  if (tree_depth(*root_) > kMaxTreeDepth)
    fail("the template nests deeper than " + std::to_string(kMaxTreeDepth) + " levels");
}
Template::~Template() = default;
Template::Template(Template&&) noexcept = default;
Template& Template::operator=(Template&&) noexcept = default;

std::string Template::render(const std::map<std::string, Value>& vars) const {
  Eval e(vars);
  e.exec(*root_);
  return std::move(e.out);
}

}  // namespace spear::server::jinja
