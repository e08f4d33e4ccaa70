#pragma once
// Each subcommand of the `spear` CLI registers itself on the app; the callback
// runs the command and throws spear::Error on failure (main() prints it once).
#include <CLI/CLI.hpp>

#include <functional>
#include <string>
#include <vector>

#include "core/error.h"

namespace spear {
struct CalibOptions;
struct TargetOptions;
}

namespace spear::cli {

void register_info(CLI::App& app);
void register_tokenize(CLI::App& app);
void register_generate(CLI::App& app);
void register_ppl(CLI::App& app);
void register_dump(CLI::App& app);
void register_serve(CLI::App& app);
void register_bench_serve(CLI::App& app);
void register_quantize(CLI::App& app);
void register_diagnose(CLI::App& app);
void register_calibrate(CLI::App& app);
void register_eval(CLI::App& app);
void register_bench_latency(CLI::App& app);
void register_make_checkpoint(CLI::App& app);
void register_export(CLI::App& app);
// --device cpu|cuda (cuda needs a build with nvcc and a GPU; the command says so otherwise).
void add_device_option(CLI::App* cmd, std::string& device);
// --autotune: with --device cuda, time the W4 kernel configs of each shape on first use and
// save the table for later runs (W4A16Dispatcher's cache file).
void add_autotune_flag(CLI::App* cmd, bool& autotune);
// --calib, --calib-windows, --calib-ctx, --calib-offset (compensate/calib_data.h).
void add_calib_options(CLI::App* cmd, CalibOptions& c);
// --targets dense|topk|recompute and --target-top-k K (compensate/teacher_targets.h). The
// returned function parses the flags into t (errors prefixed "`where`: --targets: ..."); call
// it first in the command's callback.
std::function<void()> add_target_options(CLI::App* cmd, TargetOptions& t, const std::string& where);

// Reads a whole text file; throws spear::Error naming it when it cannot.
std::string read_text_file(const std::string& path);
// Writes a text file atomically (a temporary name, then rename): a failed write leaves
// what was there. Throws spear::Error naming the path.
void write_text_file(const std::string& path, const std::string& text);
// "a,b,,c" -> {"a", "b", "c"}.
std::vector<std::string> split_list(const std::string& s);

// Turns a flag's string into the enum the library takes (parse: one of the parse_*
// functions, which name the accepted values) once, at the edge; its error gets `where`
// ("quantize: --method") in front so the user sees which flag was wrong.
template <class Parse>
auto parse_flag(const std::string& where, const std::string& value, Parse parse) {
  try {
    return parse(value);
  } catch (const Error& e) {
    throw Error(where + ": " + e.what());
  }
}

// Progress on stderr for long runs, at most a few lines per second.
class Progress {
 public:
  explicit Progress(std::string label);
  void update(int64_t done, int64_t total, const std::string& extra = "");
  void finish();

 private:
  std::string label_;
  double last_ = -1;
  bool tty_;
  bool open_line_ = false;
};

}  // namespace spear::cli
