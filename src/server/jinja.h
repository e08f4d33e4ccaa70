#pragma once
// A small Jinja2 interpreter, enough for the chat templates in Hugging Face
// tokenizer_config.json files (Llama-2, Llama-3, ChatML/Qwen, Zephyr, Mistral and
// similar). Rendering follows transformers' apply_chat_template environment:
// trim_blocks and lstrip_blocks are on.
//
// Supported:
//  * {{ expr }}, {% stmt %}, {# comment #}, whitespace control with '-' on either side
//  * statements: if / elif / else / endif, for x in ... [else] / endfor (also
//    `for k, v in d.items()`), set x = expr, set ns.attr = expr
//  * loop.index, loop.index0, loop.first, loop.last, loop.length, loop.revindex
//  * literals: 'str', "str", integers, true/false/none (and True/False/None), [lists],
//    {dicts}
//  * operators: + - * / // % ~, == != < > <= >=, in, not in, and, or, not,
//    `a if cond else b`, is [not] defined/none/string/number/mapping/iterable/
//    sequence/boolean/true/false
//  * subscripts x[i], x['k'], slices x[a:b], x[::-1]; attributes x.k
//  * filters: trim, length/count, upper, lower, string, tojson[(indent)], first, last,
//    join, default/d, capitalize, title, replace, reverse, list, int, items,
//    select/reject([test[, arg]]), selectattr/rejectattr(attr[, test[, arg]]),
//    map(attribute=..[, default=..]) or map(filter, args...); tests in select*/reject*
//    also take equalto/eq/==, ne/!= with an argument
//  * printing: lists and dicts print as Python's repr ({'k': 'v'}, [1, None]); tojson
//    writes as transformers' tojson (json.dumps, ensure_ascii=False: ", " and ": ",
//    keys in insertion order)
//  * methods: strip, lstrip, rstrip, upper, lower, startswith, endswith, split,
//    replace, title, capitalize, items, keys, values, get
//  * functions: raise_exception(msg) (rendering throws jinja::Raised with that message),
//    namespace(k=v, ...), range(n[, m]), strftime_now(format) (local time, as
//    transformers defines it; these names are `defined`)
// Not supported (templates using them fail at load and the plain template is used):
// macros, call blocks, include/import, filters and tests not listed, floats.
// Limits: the output is capped at 16 MiB and loops at 100k iterations (all loops of a render together), so a template
// cannot be made to run away by a request; an expression holds at most 2048 tokens
// and ~128 levels of brackets, and the template's tree (statements and expressions) nests at most 256 levels, values
// at most 64, so neither a template (from a model file) nor a request can exhaust the
// stack. `set x.attr = ...` needs a namespace() (as in Jinja2), which may not be put
// in a list or dict.
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace spear::server::jinja {

struct Value;
using List = std::vector<Value>;
using Dict = std::vector<std::pair<std::string, Value>>;  // insertion-ordered

// Lists and dicts are immutable once built, except a namespace() (the only target of
// `set ns.attr = ...`), and a namespace cannot be put in a list, dict or namespace. So
// no value holds itself (no reference cycle, no endless printing) and `depth` (1 + the
// deepest element; 0 for a scalar) is exact: values nest at most kMaxDepth levels, so
// printing, comparing and freeing them cannot exhaust the stack.
struct Value {
  enum class T { Undefined, None, Bool, Int, Str, List, Dict };
  static constexpr int kMaxDepth = 64;
  T t = T::Undefined;
  bool b = false;
  bool ns = false;  // a namespace()
  int depth = 0;
  int64_t i = 0;
  std::string s;
  std::shared_ptr<jinja::List> l;
  std::shared_ptr<jinja::Dict> d;

  static Value none() { Value v; v.t = T::None; return v; }
  static Value boolean(bool x) { Value v; v.t = T::Bool; v.b = x; return v; }
  static Value integer(int64_t x) { Value v; v.t = T::Int; v.i = x; return v; }
  static Value str(std::string x) { Value v; v.t = T::Str; v.s = std::move(x); return v; }
  // Throw std::runtime_error for an element that is a namespace or nests too deeply.
  static Value list(jinja::List x = {});
  static Value dict(jinja::Dict x = {});
  static Value namespace_() { Value v = dict(); v.ns = true; return v; }
  const Value* get(const std::string& key) const;  // dict lookup; nullptr if absent
  void set(const std::string& key, Value v);       // dict insert/replace (same checks)
  bool truthy() const;
  std::string to_string() const;  // as Jinja prints it
};

struct Node;

// What raise_exception(msg) throws: the template refusing its input (e.g. roles that do
// not alternate), as opposed to an error of spear's renderer or an unsupported feature.
struct Raised : std::runtime_error {
  using std::runtime_error::runtime_error;
};

class Template {
 public:
  // Parses; throws std::runtime_error("jinja: ...") on syntax it does not support.
  explicit Template(const std::string& source);
  ~Template();
  Template(Template&&) noexcept;
  Template& operator=(Template&&) noexcept;
  // Renders with the given top-level variables; throws std::runtime_error on an
  // evaluation error or raise_exception().
  std::string render(const std::map<std::string, Value>& vars) const;

 private:
  std::shared_ptr<Node> root_;
};

}  // namespace spear::server::jinja
