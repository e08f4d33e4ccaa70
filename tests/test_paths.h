#pragma once
// Where tests find their inputs: the repository (always) and ../shared (optional,
// for the larger model; tests needing it skip with a message when it is absent).
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <string>

namespace spear::test {

inline std::string source_dir() { return SPEAR_SOURCE_DIR; }
// The spear binary: $SPEAR_CLI (a binary carried elsewhere, e.g. to the GPU machine), else
// the one built next to the tests.
inline std::string cli_path() {
  if (const char* e = std::getenv("SPEAR_CLI"); e && *e) return e;
  return SPEAR_CLI_PATH;
}
inline std::string tiny_model_dir() { return source_dir() + "/models/stories260K-hf"; }
inline std::string data_dir() { return source_dir() + "/data"; }

// $SPEAR_SHARED_DIR, else ../shared next to the checkout; empty if neither exists.
inline std::string shared_dir() {
  if (const char* e = std::getenv("SPEAR_SHARED_DIR"); e && *e) return e;
  std::filesystem::path p = std::filesystem::path(source_dir()).parent_path() / "shared";
  return std::filesystem::exists(p / "models") ? p.string() : std::string();
}
inline std::string mixlm_dir() {
  std::string s = shared_dir();
  if (s.empty() || !std::filesystem::exists(s + "/models/mixlm-19m/config.json")) return {};
  return s + "/models/mixlm-19m";
}

// A fresh path under the system temp dir (created as a directory unless create is false),
// removed with everything in it at the end of the scope. tag names the test file.
struct TempDir {
  std::filesystem::path path;
  explicit TempDir(const std::string& tag, bool create = true) {
    static int counter = 0;
    path = std::filesystem::temp_directory_path() /
           ("spear_" + tag + "_" + std::to_string(::getpid()) + "_" + std::to_string(counter++));
    std::filesystem::remove_all(path);
    if (create) std::filesystem::create_directories(path);
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  std::string operator/(const std::string& name) const { return (path / name).string(); }
};

}  // namespace spear::test
