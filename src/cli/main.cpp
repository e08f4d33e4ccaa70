// spear: 4-bit LLM serving with Error Compensators. Command-line entry point.
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <exception>
#include <new>

#include "cli/commands.h"
#include "core/error.h"

int main(int argc, char** argv) {
  // OpenMP threads spin between parallel regions by default; on a small or shared
  // machine the spinning threads steal the cores doing the work (measured: 4x slower
  // windows under load). libgomp reads the policy only at start-up, so set it and
  // start again. An explicit OMP_WAIT_POLICY is respected.
  if (!std::getenv("OMP_WAIT_POLICY")) {
    setenv("OMP_WAIT_POLICY", "passive", 1);
    execv("/proc/self/exe", argv);  // returns only on failure: then carry on as we are
  }
  CLI::App app{"spear: serve 4-bit LLMs at close to 16-bit quality"};
  app.set_version_flag("--version", std::string("spear ") + SPEAR_VERSION);
  app.require_subcommand(1);
  spear::cli::register_info(app);
  spear::cli::register_tokenize(app);
  spear::cli::register_generate(app);
  spear::cli::register_ppl(app);
  spear::cli::register_dump(app);
  spear::cli::register_serve(app);
  spear::cli::register_bench_serve(app);
  spear::cli::register_quantize(app);
  spear::cli::register_diagnose(app);
  spear::cli::register_calibrate(app);
  spear::cli::register_eval(app);
  spear::cli::register_bench_latency(app);
  spear::cli::register_make_checkpoint(app);
  spear::cli::register_export(app);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  } catch (const spear::Error& e) {
    std::fprintf(stderr, "spear: error: %s\n", e.what());
    return 1;
  } catch (const std::bad_alloc&) {
    std::fprintf(stderr, "spear: error: out of memory\n");
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "spear: error: %s\n", e.what());
    return 1;
  }
  return 0;
}
