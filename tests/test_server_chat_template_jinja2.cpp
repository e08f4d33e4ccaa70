// Real chat templates (tests/data/chat_templates: Llama 3.1 and 3.2, Mistral, Qwen2.5, Phi-3,
// Gemma) rendered by spear's Jinja subset and by Python's jinja2 set up as transformers'
// apply_chat_template sets it up (tests/chat_template_jinja2.py): the texts must be
// identical, and a conversation one refuses (raise_exception) the other refuses with the
// same message. Skips with a message when python3 or python3-jinja2 is missing.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "server/chat_template.h"
#include "test_paths.h"

namespace fs = std::filesystem;
using json = nlohmann::json;
using spear::server::ChatMessage;
using spear::server::ChatTemplate;

namespace {

struct Case {
  std::vector<ChatMessage> messages;
  bool add_generation_prompt;
  std::string tmpl;  // empty: the template under test
};

std::vector<Case> cases() {
  const std::vector<std::vector<ChatMessage>> convs = {
      {{"user", "Hi"}},
      {{"system", "Be brief."}, {"user", "Hi"}, {"assistant", "Hello!"}, {"user", "Bye"}},
      {{"user", "What is 2+2?"}, {"assistant", "4"}},
      {{"user", "  padded both sides \n\n"}, {"assistant", "\n  answer with\ttabs  "}, {"user", "x"}},
      {{"system", "  sys with spaces  "}, {"user", "h\u00e9llo \u2014 \u4f60\u597d \U0001F600"}},
      {{"user", "{{ not a tag }} {% neither %} 'quotes' \"double\" \\backslash"}},
      {{"user", ""}, {"assistant", ""}, {"user", ""}},
      {{"user", "a"}, {"user", "b"}},                      // roles do not alternate
      {{"assistant", "first"}, {"user", "then"}},          // starts with the assistant
      {{"system", "S"}},                                   // system alone
      {{"user", "u1"}, {"assistant", "a1"}, {"user", "u2"}, {"assistant", "a2"}, {"user", "u3"},
       {"assistant", "a3"}, {"user", "u4"}},
  };
  std::vector<Case> out;
  for (const auto& c : convs)
    for (bool agp : {true, false}) out.push_back({c, agp, ""});
  return out;
}

std::string slurp(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// Python's renderings of every case, or a reason to skip in *skip.
json render_with_jinja2(const std::string& tmpl, const std::vector<Case>& cs, const std::string& bos,
                        const std::string& eos, std::string* skip) {
  // Ordered: each message is {"role", "content"} in that order, as clients send it.
  nlohmann::ordered_json req{{"template", tmpl}, {"cases", nlohmann::ordered_json::array()}};
  for (const Case& c : cs) {
    nlohmann::ordered_json msgs = nlohmann::ordered_json::array();
    for (const ChatMessage& m : c.messages) msgs.push_back({{"role", m.role}, {"content", m.content}});
    nlohmann::ordered_json jc{{"messages", msgs}, {"add_generation_prompt", c.add_generation_prompt}, {"bos_token", bos}, {"eos_token", eos}};
    if (!c.tmpl.empty()) jc["template"] = c.tmpl;
    req["cases"].push_back(jc);
  }
  const fs::path in = fs::temp_directory_path() / ("spear_jinja2_in_" + std::to_string(getpid()));
  std::ofstream(in, std::ios::binary) << req.dump();
  const std::string cmd = "python3 " + spear::test::source_dir() + "/tests/chat_template_jinja2.py < " +
                          in.string() + " 2>/dev/null";
  FILE* p = popen(cmd.c_str(), "r");
  std::string out;
  if (p) {
    std::array<char, 4096> buf;
    size_t n;
    while ((n = fread(buf.data(), 1, buf.size(), p)) > 0) out.append(buf.data(), n);
  }
  const int st = p ? pclose(p) : -1;
  fs::remove(in);
  const int rc = st != -1 && WIFEXITED(st) ? WEXITSTATUS(st) : -1;
  if (rc == 3 || rc == 127) {
    *skip = "python3 with jinja2 is needed (Debian: apt-get install python3-jinja2; scripts/install-deps.sh)";
    return {};
  }
  EXPECT_EQ(rc, 0) << "tests/chat_template_jinja2.py failed";
  return json::parse(out, nullptr, false);
}

struct Model {
  const char* file;
  const char* bos;
  const char* eos;
};

class ChatTemplateJinja2 : public ::testing::TestWithParam<Model> {};

}  // namespace

TEST_P(ChatTemplateJinja2, RendersLikeJinja2) {
  const Model m = GetParam();
  const std::string src = slurp(fs::path(spear::test::source_dir()) / "tests/data/chat_templates" / m.file);
  ASSERT_FALSE(src.empty()) << m.file;
  const std::vector<Case> cs = cases();
  std::string skip;
  const json want = render_with_jinja2(src, cs, m.bos, m.eos, &skip);
  if (!skip.empty()) GTEST_SKIP() << skip;
  ASSERT_TRUE(want.is_array() && want.size() == cs.size()) << want.dump();

  ChatTemplate t = ChatTemplate::from_jinja(src, m.bos, m.eos);  // throws if spear cannot parse it
  int rendered = 0, refused = 0;
  for (size_t i = 0; i < cs.size(); ++i) {
    SCOPED_TRACE(std::string(m.file) + " case " + std::to_string(i / 2) +
                 (cs[i].add_generation_prompt ? " (add_generation_prompt)" : ""));
    std::string got, err;
    try {
      got = t.render(cs[i].messages, cs[i].add_generation_prompt);
    } catch (const std::exception& e) {
      err = e.what();
    }
    if (want[i]["ok"].get<bool>()) {
      ++rendered;
      EXPECT_EQ(err, "");
      EXPECT_EQ(got, want[i]["text"].get<std::string>());
    } else {
      ++refused;
      const std::string msg = want[i]["error"].get<std::string>();
      EXPECT_NE(err, "") << "jinja2 refused (" << msg << "), spear rendered: " << got;
      EXPECT_NE(err.find(msg), std::string::npos) << "spear: " << err << "\njinja2: " << msg;
    }
  }
  EXPECT_GT(rendered, 0);  // every template renders some of the conversations
}

INSTANTIATE_TEST_SUITE_P(
    RealTemplates, ChatTemplateJinja2,
    ::testing::Values(Model{"llama-3.1-instruct.jinja", "<|begin_of_text|>", "<|eot_id|>"},
                      Model{"llama-3.2-instruct.jinja", "<|begin_of_text|>", "<|eot_id|>"},
                      Model{"mistral-7b-instruct-v0.2.jinja", "<s>", "</s>"},
                      Model{"qwen2.5-instruct.jinja", "", "<|im_end|>"},
                      Model{"phi-3-mini-instruct.jinja", "<s>", "<|endoftext|>"},
                      Model{"gemma-it.jinja", "<bos>", "<eos>"}),
    [](const ::testing::TestParamInfo<Model>& i) {
      std::string n = i.param.file;
      n = n.substr(0, n.find(".jinja"));
      for (char& c : n)
        if (!isalnum(static_cast<unsigned char>(c))) c = '_';
      return n;
    });

// The constructs real templates use, one at a time, on text that needs escaping:
// printing lists and dicts (Python's repr), tojson (transformers' json.dumps), the
// select/reject/map filters, loop variables, namespaces, string methods.
TEST(ChatTemplateJinja2Constructs, RenderLikeJinja2) {
  const std::vector<ChatMessage> conv = {
      {"system", "Line1\nHe said \"hi\" & 'bye' \\ <tag> \u00e9\u4f60 \x01 end"},
      {"user", "Hi there"},
      {"assistant", "it's"}};
  const std::vector<std::string> snippets = {
      "{{ messages | tojson }}",
      "{{ messages[0] | tojson(indent=2) }}",
      "{{ messages | tojson(indent=4) }}",
      "{{ {'a': [1, {'b': none}], 'c': 'x', 'd': true} | tojson }}|{{ {} | tojson }}|{{ [] | tojson }}",
      "{{ messages[1] }}|{{ messages[2] }}|{{ messages[0] }}",
      "{{ [1, 'a', none, true, \"it's\", [], {}] }}",
      "{{ messages | map(attribute='role') | join(',') }}",
      "{{ messages | map(attribute='missing', default='d') | join(',') }}",
      "{{ messages | selectattr('role', 'equalto', 'user') | list | length }}",
      "{{ messages | rejectattr('role', 'equalto', 'system') | map(attribute='content') | list }}",
      "{{ messages | selectattr('role', 'ne', 'user') | map(attribute='role') | join }}",
      "{{ messages[1:] | map(attribute='content') | map('upper') | join('|') }}",
      "{{ ['a', '', 'b'] | select | join('-') }}|{{ [1, 2, 3] | reject('equalto', 2) | list }}",
      "{% for m in messages %}{{ loop.index }}/{{ loop.length }}:{{ loop.revindex }}{{ ',' if not loop.last }}{% endfor %}",
      "{{ 'x' ~ 1 ~ none ~ true }}",
      "{{ messages[0].content.split('\\n') }}",
      "{{ (messages | last).role }}{{ (messages | first)['role'] }}",
      "{% set ns = namespace(found=false) %}{% for m in messages %}{% if m.role == 'user' %}{% set ns.found = "
      "true %}{% endif %}{% endfor %}{{ ns.found }}",
      "{% for k, v in messages[1] | items %}{{ k }}={{ v }};{% endfor %}",
      "{{ messages[1] == {'content': 'Hi there', 'role': 'user'} }}{{ messages[1] != messages[2] }}",
      "{{ messages[-1].content | length }}|{{ messages[-1].content[1:] }}|{{ messages[-1].content.title() }}",
      "{{ messages[0].content | length }}|{{ messages[0].content[-6:] }}|{{ messages[0].content[::-1] }}",
      "{{ messages[0].content | list | length }}|{{ messages[0].content | first }}{{ messages[0].content | last }}",
      "{% for c in messages[0].content[-8:] %}[{{ c }}]{% endfor %}{{ messages[0].content[-9] }}",
      "{{ strftime_now is defined }}{{ raise_exception is defined }}{{ strftime_now('%d %b %Y') }}",
      "{{ tools is none }}{{ tools is defined }}{{ documents is defined }}{{ foo is defined }}",
  };
  std::vector<Case> cs;
  for (const std::string& s : snippets) cs.push_back({conv, true, s});
  std::string skip;
  const json want = render_with_jinja2("", cs, "<s>", "</s>", &skip);
  if (!skip.empty()) GTEST_SKIP() << skip;
  ASSERT_TRUE(want.is_array() && want.size() == cs.size()) << want.dump();
  for (size_t i = 0; i < cs.size(); ++i) {
    SCOPED_TRACE(cs[i].tmpl);
    ASSERT_TRUE(want[i]["ok"].get<bool>()) << want[i].dump();
    std::string got;
    try {
      got = ChatTemplate::from_jinja(cs[i].tmpl, "<s>", "</s>").render(cs[i].messages, true);
    } catch (const std::exception& e) {
      got = std::string("spear error: ") + e.what();
    }
    EXPECT_EQ(got, want[i]["text"].get<std::string>());
  }
}
