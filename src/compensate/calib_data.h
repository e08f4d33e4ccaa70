#pragma once
// Calibration data: N consecutive windows of ctx tokens from a text file, encoded once
// with the model's tokenizer (BOS first, as the perplexity protocol), starting at a token
// offset so that a file can be split between calibration and evaluation.
// Defaults: 256 windows of 512 tokens (131,072 tokens) from the start of the file; on
// mixlm-19m the share of the perplexity gap recovered grew with every doubling of the
// calibration text from 32 to 256 windows (the ECs overfit fewer tokens; docs/RESULTS.md).
// Held dense, the full-precision targets take windows x ctx x vocab floats (4 GiB on
// mixlm; compensate/teacher_targets.h has the bounded alternatives). For
// mixlm-19m use WikiText-2 *validation* text (wiki.valid.tokens; PROVENANCE.md: no raw
// validation split exists), never the test file that perplexity is reported on.
#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "tokenizer/tokenizer.h"

namespace spear {

struct CalibOptions {
  std::string file;
  int64_t windows = 256;
  int64_t ctx = 512;
  int64_t offset = 0;  // tokens skipped at the start of the encoded file
};

struct CalibData {
  std::vector<int32_t> tokens;  // (windows, ctx)
  int64_t windows = 0, ctx = 0;
  // file, file_sha256, tokens_sha256, windows, ctx, offset: goes into .spear metadata.
  nlohmann::json meta;
  const int32_t* window(int64_t w) const { return tokens.data() + w * ctx; }
};

// Throws spear::Error when the file is missing or holds less than one window after the
// offset. Takes as many windows as fit, up to opt.windows (meta says how many).
CalibData load_calib(const Tokenizer& tok, const CalibOptions& opt);

}  // namespace spear
