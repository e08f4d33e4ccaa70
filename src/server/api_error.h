#pragma once
// OpenAI-style errors: {"error": {"message", "type", "param", "code"}} with an HTTP
// status. Request validation throws ApiError; the HTTP layer turns it into the
// response, so no bad request ever reaches the engine.
#include <stdexcept>
#include <string>

#include <nlohmann/json.hpp>

namespace spear::server {

class ApiError : public std::runtime_error {
 public:
  ApiError(int status, std::string message, std::string type = "invalid_request_error",
           std::string code = "", std::string param = "")
      : std::runtime_error(message), status_(status), type_(std::move(type)),
        code_(std::move(code)), param_(std::move(param)) {}
  int status() const { return status_; }
  const std::string& type() const { return type_; }
  const std::string& code() const { return code_; }
  const std::string& param() const { return param_; }
  nlohmann::json to_json() const;

 private:
  int status_;
  std::string type_, code_, param_;
};

// Shorthand for the common 400: a bad field.
inline ApiError bad_field(const std::string& param, const std::string& message) {
  return ApiError(400, message, "invalid_request_error", "invalid_value", param);
}

nlohmann::json error_json(const std::string& message, const std::string& type,
                          const std::string& code, const std::string& param = "");

}  // namespace spear::server
