#include "server/chat_template.h"

#include <filesystem>
#include <fstream>
#include <sstream>
#include <stdexcept>

#include <nlohmann/json.hpp>

#include "server/jinja.h"

namespace spear::server {

ChatTemplate ChatTemplate::plain() {
  ChatTemplate t;
  t.desc_ = "plain (role: content)";
  return t;
}

ChatTemplate ChatTemplate::from_jinja(const std::string& source, std::string bos_token,
                                      std::string eos_token) {
  ChatTemplate t;
  t.tmpl_ = std::make_shared<jinja::Template>(source);
  t.bos_ = std::move(bos_token);
  t.eos_ = std::move(eos_token);
  t.desc_ = "jinja (tokenizer_config.json)";
  // Fail now rather than on the first request: render sample conversations. A template
  // may refuse a shape it does not take (raise_exception: Gemma refuses the system role,
  // Mistral v0.1 anything but user/assistant), but it must render at least one, and any
  // other error (an unsupported feature) fails the load.
  const std::vector<std::vector<ChatMessage>> probes = {
      {{"system", "You are a helpful assistant."}, {"user", "Hello"}, {"assistant", "Hi."}, {"user", "How are you?"}},
      {{"user", "Hello"}, {"assistant", "Hi."}, {"user", "How are you?"}},
      {{"user", "Hello"}}};
  std::string refused;
  bool rendered = false;
  for (const auto& conv : probes) {
    try {
      t.render(conv, true);
      t.render(conv, false);
      rendered = true;
    } catch (const jinja::Raised& e) {
      refused = e.what();
    }
  }
  if (!rendered) throw std::runtime_error("the chat template refuses every sample conversation: " + refused);
  return t;
}

std::string ChatTemplate::render(const std::vector<ChatMessage>& messages,
                                 bool add_generation_prompt) const {
  if (!tmpl_) {
    std::string out;
    for (const ChatMessage& m : messages) out += m.role + ": " + m.content + "\n";
    if (add_generation_prompt) out += "assistant:";
    return out;
  }
  jinja::List msgs;
  for (const ChatMessage& m : messages)
    msgs.push_back(jinja::Value::dict({{"role", jinja::Value::str(m.role)},
                                       {"content", jinja::Value::str(m.content)}}));
  std::map<std::string, jinja::Value> vars{
      {"messages", jinja::Value::list(std::move(msgs))},
      {"add_generation_prompt", jinja::Value::boolean(add_generation_prompt)},
      {"bos_token", jinja::Value::str(bos_)},
      {"eos_token", jinja::Value::str(eos_)},
      {"tools", jinja::Value::none()},
      {"documents", jinja::Value::none()},  // transformers defines both, as None
  };
  return tmpl_->render(vars);
}

namespace {
// "bos_token": "<s>" or {"content": "<s>", ...}
std::string token_field(const nlohmann::json& cfg, const char* key) {
  auto it = cfg.find(key);
  if (it == cfg.end()) return "";
  if (it->is_string()) return it->get<std::string>();
  if (it->is_object() && it->contains("content") && (*it)["content"].is_string())
    return (*it)["content"].get<std::string>();
  return "";
}
}  // namespace

namespace {
// The chat_template of a tokenizer_config.json: a string, or the entry named "default"
// of a list of {"name", "template"}. Empty if none.
std::string template_source(const nlohmann::json& cfg) {
  auto it = cfg.find("chat_template");
  if (it != cfg.end() && it->is_string()) return it->get<std::string>();
  if (it != cfg.end() && it->is_array())
    for (const auto& e : *it)
      if (e.is_object() && e.value("name", "") == "default" && e.contains("template") && e["template"].is_string())
        return e["template"].get<std::string>();
  return "";
}

std::string read_text(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in.good()) throw std::runtime_error("cannot open " + path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}
}  // namespace

ChatTemplate ChatTemplate::from_tokenizer_config(const std::string& json_text, std::string* note) {
  auto fallback = [&](const std::string& why) {
    if (note) *note = why;
    return plain();
  };
  if (json_text.empty()) return fallback("no tokenizer_config.json");
  nlohmann::json cfg = nlohmann::json::parse(json_text, nullptr, false);
  if (cfg.is_discarded() || !cfg.is_object()) return fallback("tokenizer_config.json is not valid JSON");
  const std::string src = template_source(cfg);
  if (src.empty()) return fallback("tokenizer_config.json has no chat_template");
  try {
    ChatTemplate t = from_jinja(src, token_field(cfg, "bos_token"), token_field(cfg, "eos_token"));
    if (note) note->clear();
    return t;
  } catch (const std::exception& e) {
    return fallback(std::string("its chat_template is not supported (") + e.what() + ")");
  }
}

ChatTemplate ChatTemplate::from_model_dir(const std::string& model_dir, std::string* note) {
  namespace fs = std::filesystem;
  fs::path p = fs::path(model_dir) / "tokenizer_config.json";
  std::string text;
  if (fs::exists(p)) {
    try {
      text = read_text(p.string());
    } catch (const std::exception&) {
    }
  }
  return from_tokenizer_config(text, note);
}

ChatTemplate ChatTemplate::from_file(const std::string& path, const std::string& model_tokenizer_config) {
  const std::string text = read_text(path);
  nlohmann::json model_cfg = nlohmann::json::parse(model_tokenizer_config, nullptr, false);
  if (model_cfg.is_discarded() || !model_cfg.is_object()) model_cfg = nlohmann::json::object();
  std::string bos = token_field(model_cfg, "bos_token"), eos = token_field(model_cfg, "eos_token");
  std::string src = text;
  const nlohmann::json cfg = nlohmann::json::parse(text, nullptr, false);
  if (!cfg.is_discarded() && cfg.is_object()) {  // a tokenizer_config.json
    src = template_source(cfg);
    if (src.empty()) throw std::runtime_error(path + " is a JSON object without a chat_template");
    if (!token_field(cfg, "bos_token").empty()) bos = token_field(cfg, "bos_token");
    if (!token_field(cfg, "eos_token").empty()) eos = token_field(cfg, "eos_token");
  }
  ChatTemplate t;
  try {
    t = from_jinja(src, bos, eos);
  } catch (const std::exception& e) {
    throw std::runtime_error("the chat template in " + path + " is not usable: " + e.what());
  }
  t.desc_ = "jinja (" + path + ")";
  return t;
}

}  // namespace spear::server
