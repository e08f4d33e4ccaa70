// The official `openai` Node SDK as a client of the server (tests/node). The SDK is
// installed from npm into a scratch directory at test time; without npm or the
// registry the test is skipped with a message saying so.
#include <gtest/gtest.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>

#include "test_server_fixture.h"

using namespace spear;
using namespace spear::test;

namespace {
int run(const std::string& cmd, std::string* out) {
  FILE* p = popen((cmd + " 2>&1").c_str(), "r");
  if (!p) return -1;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, p)) > 0) out->append(buf, n);
  int st = pclose(p);
  return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}
}  // namespace

TEST(ServerOpenAINode, OfficialSdkTalksToTheServer) {
  std::string out;
  if (run("command -v node && command -v npm", &out) != 0)
    GTEST_SKIP() << "node/npm not installed; skipping the openai SDK test";
  namespace fs = std::filesystem;
  // Installed once per machine and reused (npm skips work when it is current).
  fs::path dir = fs::temp_directory_path() / "spear-openai-node-test";
  fs::create_directories(dir);
  fs::copy_file(source_dir() + "/tests/node/package.json", dir / "package.json", fs::copy_options::overwrite_existing);
  fs::copy_file(source_dir() + "/tests/node/openai_client.mjs", dir / "openai_client.mjs", fs::copy_options::overwrite_existing);
  out.clear();
  if (!fs::exists(dir / "node_modules/openai/package.json") &&
      run("cd '" + dir.string() + "' && timeout 180 npm install --no-audit --no-fund --loglevel=error", &out) != 0)
    GTEST_SKIP() << "could not install the openai SDK from npm (offline or no registry?):\n" << out;
  ASSERT_TRUE(fs::exists(dir / "node_modules/openai/package.json")) << out;

  TestServer s;
  out.clear();
  const std::string base = "http://127.0.0.1:" + std::to_string(s.url.port) + "/v1";
  int rc = run("cd '" + dir.string() + "' && timeout 120 node openai_client.mjs " + base + " tiny", &out);
  EXPECT_EQ(rc, 0) << out;
  EXPECT_NE(out.find("\"completion\""), std::string::npos) << out;
  // n, seeds, penalties and the tokenizer endpoints (issue 14) were exercised.
  EXPECT_NE(out.find("\"n\":["), std::string::npos) << out;
  EXPECT_NE(out.find("\"tokenize\":["), std::string::npos) << out;
  // ...and the seedless, best_of, penalty-effect and empty-prompt checks ran to the end.
  EXPECT_NE(out.find("\"unseeded\":["), std::string::npos) << out;
  EXPECT_NE(out.find("\"repetition_penalty\":"), std::string::npos) << out;
  EXPECT_NE(out.find("\"tokenize_empty\":["), std::string::npos) << out;
  EXPECT_TRUE(s.wait_idle());
}
