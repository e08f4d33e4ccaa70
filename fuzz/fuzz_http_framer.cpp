// libFuzzer target: spear::fuzz::http_framer_one (see fuzz_entry.h).
#include "fuzz_entry.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  spear::fuzz::http_framer_one(data, size);
  return 0;
}
