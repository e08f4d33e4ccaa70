// spear: 4-bit LLM serving with Error Compensators. Command-line entry point.
#include <cstdio>
#include <exception>
#include <new>

#include "cli/commands.h"
#include "core/error.h"

int main(int argc, char** argv) {
  CLI::App app{"spear: serve 4-bit LLMs at close to 16-bit quality"};
  app.set_version_flag("--version", std::string("spear ") + SPEAR_VERSION);
  app.require_subcommand(1);
  spear::cli::register_info(app);
  spear::cli::register_tokenize(app);
  spear::cli::register_generate(app);
  spear::cli::register_ppl(app);
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
