#include "compensate/calib_data.h"

#include <fstream>
#include <sstream>

#include "core/error.h"
#include "io/sha256.h"

namespace spear {

CalibData load_calib(const Tokenizer& tok, const CalibOptions& opt) {
  SPEAR_CHECK(!opt.file.empty(), "calibration: no --calib file given");
  SPEAR_CHECK(opt.windows > 0, "calibration: --calib-windows must be positive");
  SPEAR_CHECK(opt.ctx >= 2, "calibration: --calib-ctx must be at least 2");
  SPEAR_CHECK(opt.offset >= 0, "calibration: --calib-offset must be >= 0");
  std::ifstream in(opt.file, std::ios::binary);
  SPEAR_CHECK(in.good(), "calibration: cannot open " + opt.file);
  std::stringstream ss;
  ss << in.rdbuf();
  const std::string text = ss.str();
  std::vector<int32_t> ids = tok.encode(text, true);
  const int64_t avail = static_cast<int64_t>(ids.size()) - opt.offset;
  const int64_t n = std::min(opt.windows, avail > 0 ? avail / opt.ctx : 0);
  SPEAR_CHECK(n > 0, "calibration: " + opt.file + " has " + std::to_string(ids.size()) +
                         " tokens; after an offset of " + std::to_string(opt.offset) +
                         " that is less than one window of " + std::to_string(opt.ctx));
  CalibData d;
  d.windows = n;
  d.ctx = opt.ctx;
  d.tokens.assign(ids.begin() + opt.offset, ids.begin() + opt.offset + n * opt.ctx);
  d.meta = {{"file", opt.file},
            {"file_sha256", sha256_hex(text.data(), text.size())},
            {"tokens_sha256", sha256_hex(d.tokens.data(), d.tokens.size() * sizeof(int32_t))},
            {"windows", n},
            {"ctx", opt.ctx},
            {"offset", opt.offset},
            {"tokens_in_file", static_cast<int64_t>(ids.size())}};
  return d;
}

}  // namespace spear
