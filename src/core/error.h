#pragma once
// One exception type for every user-facing failure (bad file, bad shape, bad
// request). The CLI and the server turn it into a single clear message; nothing
// in spear aborts on bad input.
#include <stdexcept>
#include <string>

namespace spear {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what) : std::runtime_error(what) {}
};

// SPEAR_CHECK(cond, msg): throw spear::Error(msg) when cond is false. msg may be any
// expression yielding std::string; it is evaluated only on failure.
#define SPEAR_CHECK(cond, msg)                 \
  do {                                         \
    if (!(cond)) throw ::spear::Error((msg));  \
  } while (0)

}  // namespace spear
