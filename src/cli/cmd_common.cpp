#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <sstream>

#include <filesystem>
#include "cli/commands.h"
#include "core/error.h"

namespace spear::cli {

std::string read_text_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  SPEAR_CHECK(in.good(), "cannot open " + path);
  std::stringstream ss;
  ss << in.rdbuf();
  SPEAR_CHECK(!in.bad(), "cannot read " + path);
  return ss.str();
}

namespace {
double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}
}  // namespace

Progress::Progress(std::string label) : label_(std::move(label)), tty_(isatty(STDERR_FILENO)) {}

void Progress::update(int64_t done, int64_t total, const std::string& extra) {
  double t = now_s();
  // A terminal gets a live line; a log gets a line every 10 s.
  if (done != total && last_ >= 0 && t - last_ < (tty_ ? 0.25 : 10.0)) return;
  last_ = t;
  std::fprintf(stderr, "%s%s: %lld/%lld %s%s", tty_ ? "\r" : "", label_.c_str(),
               static_cast<long long>(done), static_cast<long long>(total), extra.c_str(),
               tty_ ? "   " : "\n");
  open_line_ = tty_;
  std::fflush(stderr);
}

void Progress::finish() {
  if (open_line_) std::fprintf(stderr, "\n");
  open_line_ = false;
}

void add_autotune_flag(CLI::App* cmd, bool& autotune) {
  cmd->add_flag("--autotune", autotune,
                "--device cuda: time the W4 kernel configs of each shape on first use and save the table "
                "(~/.cache/spear/, or $SPEAR_W4A16_CACHE) so later runs start tuned");
}

}  // namespace spear::cli

namespace spear::cli {

void write_text_file(const std::string& path, const std::string& text) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream f(tmp, std::ios::binary);
    SPEAR_CHECK(f.good(), "cannot write " + tmp);
    f << text;
    f.flush();
    SPEAR_CHECK(f.good(), "cannot write " + tmp);
  }
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  SPEAR_CHECK(!ec, "cannot rename " + tmp + " to " + path + ": " + ec.message());
}

std::vector<std::string> split_list(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ','))
    if (!item.empty()) out.push_back(item);
  return out;
}

void add_device_option(CLI::App* cmd, std::string& device) {
  cmd->add_option("--device", device, "cpu, or cuda (the GPU engine: fp16 activations, W4 kernels)")
      ->check(CLI::IsMember({"cpu", "cuda"}))
      ->capture_default_str();
}

}  // namespace spear::cli
