#include "server/api_error.h"

namespace spear::server {

nlohmann::json error_json(const std::string& message, const std::string& type,
                          const std::string& code, const std::string& param) {
  nlohmann::json e{{"message", message}, {"type", type}};
  e["param"] = param.empty() ? nlohmann::json(nullptr) : nlohmann::json(param);
  e["code"] = code.empty() ? nlohmann::json(nullptr) : nlohmann::json(code);
  return {{"error", e}};
}

nlohmann::json ApiError::to_json() const { return error_json(what(), type_, code_, param_); }

}  // namespace spear::server
