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
  // Fail now rather than on the first request: a conversation every chat template
  // must handle.
  t.render({{"system", "You are a helpful assistant."}, {"user", "Hello"},
            {"assistant", "Hi."}, {"user", "How are you?"}},
           true);
  t.render({{"user", "Hello"}}, true);
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

ChatTemplate ChatTemplate::from_model_dir(const std::string& model_dir, std::string* note) {
  namespace fs = std::filesystem;
  auto fallback = [&](const std::string& why) {
    if (note) *note = why;
    return plain();
  };
  fs::path p = fs::path(model_dir) / "tokenizer_config.json";
  if (!fs::exists(p)) return fallback("no tokenizer_config.json");
  std::ifstream in(p);
  std::stringstream ss;
  ss << in.rdbuf();
  nlohmann::json cfg = nlohmann::json::parse(ss.str(), nullptr, false);
  if (cfg.is_discarded() || !cfg.is_object()) return fallback("tokenizer_config.json is not valid JSON");
  auto it = cfg.find("chat_template");
  std::string src;
  if (it != cfg.end() && it->is_string()) {
    src = it->get<std::string>();
  } else if (it != cfg.end() && it->is_array()) {
    for (const auto& e : *it)
      if (e.is_object() && e.value("name", "") == "default" && e.contains("template") &&
          e["template"].is_string())
        src = e["template"].get<std::string>();
  }
  if (src.empty()) return fallback("tokenizer_config.json has no chat_template");
  try {
    ChatTemplate t = from_jinja(src, token_field(cfg, "bos_token"), token_field(cfg, "eos_token"));
    if (note) note->clear();
    return t;
  } catch (const std::exception& e) {
    return fallback(std::string("its chat_template is not supported (") + e.what() + ")");
  }
}

}  // namespace spear::server
