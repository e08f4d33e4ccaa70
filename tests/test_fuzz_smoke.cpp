// A deterministic stand-in for the fuzzers, run by every ctest (g++ builds without
// libFuzzer): every seed in fuzz/corpus/<target>/ and a few thousand seeded
// mutations of them go through the same entry points as fuzz/fuzz_*.cpp, and only
// spear::Error may escape. Run the real fuzzers with fuzz/run.sh.
#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <random>
#include <string>
#include <vector>

#include "../fuzz/fuzz_entry.h"
#include "test_paths.h"

namespace fs = std::filesystem;

namespace {

using Bytes = std::vector<uint8_t>;
using Entry = void (*)(const uint8_t*, size_t);

// The files of fuzz/corpus/<target>/. Those named regress_* are inputs a fuzzer found
// a bug with (kept so that it stays fixed): replayed, but not required to be valid.
std::vector<Bytes> load_seeds(const std::string& target, bool with_regressions = true) {
  const fs::path dir = fs::path(spear::test::source_dir()) / "fuzz" / "corpus" / target;
  std::vector<fs::path> files;
  if (fs::is_directory(dir))
    for (const auto& e : fs::directory_iterator(dir))
      if (e.is_regular_file() && (with_regressions || e.path().filename().string().rfind("regress_", 0) != 0))
        files.push_back(e.path());
  std::sort(files.begin(), files.end());  // directory order is not stable
  std::vector<Bytes> seeds;
  for (const auto& p : files) {
    std::ifstream in(p, std::ios::binary);
    seeds.emplace_back(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  }
  return seeds;
}

// One to four edits of the kinds libFuzzer starts with. Uses raw mt19937 output
// (not std distributions, whose results differ between standard libraries) so
// every platform replays the same inputs.
Bytes mutate(const Bytes& seed, std::mt19937& rng) {
  Bytes b = seed;
  static constexpr uint8_t kInteresting[] = {'{', '}', '[', ']', '"', ',', ':', '-', '0',
                                             '9', '\\', 0x00, 0x7f, 0x80, 0xc3, 0xff};
  const int edits = 1 + static_cast<int>(rng() % 4);
  for (int k = 0; k < edits; ++k) {
    const size_t pos = b.empty() ? 0 : rng() % b.size();
    switch (rng() % 6) {
      case 0:  // bit flip
        if (!b.empty()) b[pos] ^= static_cast<uint8_t>(1u << (rng() % 8));
        break;
      case 1:  // truncate
        b.resize(b.empty() ? 0 : rng() % b.size());
        break;
      case 2:  // insert random bytes
        b.insert(b.begin() + static_cast<ptrdiff_t>(pos), 1 + rng() % 4,
                 static_cast<uint8_t>(rng()));
        break;
      case 3:  // overwrite with a syntax-relevant byte
        if (!b.empty()) b[pos] = kInteresting[rng() % sizeof(kInteresting)];
        break;
      case 4:  // erase a short run
        if (!b.empty())
          b.erase(b.begin() + static_cast<ptrdiff_t>(pos),
                  b.begin() + static_cast<ptrdiff_t>(std::min(b.size(), pos + 1 + rng() % 8)));
        break;
      case 5: {  // duplicate a short run in place
        if (b.empty()) break;
        size_t len = std::min(b.size() - pos, size_t{1} + rng() % 16);
        Bytes run(b.begin() + static_cast<ptrdiff_t>(pos),
                  b.begin() + static_cast<ptrdiff_t>(pos + len));
        b.insert(b.begin() + static_cast<ptrdiff_t>(pos), run.begin(), run.end());
        break;
      }
    }
  }
  return b;
}

// Keeps a failing input where it can be replayed: ./fuzz_<target> <file>.
std::string save_reproducer(const std::string& target, size_t n, const Bytes& b) {
  fs::path p = fs::temp_directory_path() /
               ("spear-fuzz-smoke-" + target + "-" + std::to_string(n) + ".bin");
  std::ofstream out(p, std::ios::binary);
  out.write(reinterpret_cast<const char*>(b.data()), static_cast<std::streamsize>(b.size()));
  return p.string();
}

void replay(const std::string& target, Entry entry, int mutations) {
  const std::vector<Bytes> seeds = load_seeds(target);
  ASSERT_FALSE(seeds.empty()) << "no seeds in fuzz/corpus/" << target;
  std::mt19937 rng(20240611u);
  int failures = 0;
  auto run_one = [&](const Bytes& b, size_t n) {
    try {
      entry(b.data(), b.size());
    } catch (const std::exception& e) {
      ADD_FAILURE() << target << " input #" << n << " let a non-spear::Error escape: " << e.what()
                    << "\n  reproducer: " << save_reproducer(target, n, b);
      ++failures;
    } catch (...) {
      ADD_FAILURE() << target << " input #" << n << " threw a non-std exception"
                    << "\n  reproducer: " << save_reproducer(target, n, b);
      ++failures;
    }
  };
  for (size_t i = 0; i < seeds.size(); ++i) run_one(seeds[i], i);
  for (int i = 0; i < mutations && failures < 5; ++i)
    run_one(mutate(seeds[rng() % seeds.size()], rng), seeds.size() + static_cast<size_t>(i));
}

}  // namespace

TEST(FuzzSmoke, Safetensors) { replay("safetensors", spear::fuzz::safetensors_one, 5000); }
TEST(FuzzSmoke, ModelConfig) { replay("config", spear::fuzz::config_one, 4000); }
TEST(FuzzSmoke, Tokenizer) { replay("tokenizer", spear::fuzz::tokenizer_one, 3000); }
TEST(FuzzSmoke, Request) { replay("request", spear::fuzz::request_one, 3000); }
TEST(FuzzSmoke, ChatTemplate) { replay("chat_template", spear::fuzz::chat_template_one, 2000); }
TEST(FuzzSmoke, SpearArtifact) { replay("spear", spear::fuzz::spear_one, 2000); }
TEST(FuzzSmoke, SafetensorsIndex) { replay("safetensors_index", spear::fuzz::safetensors_index_one, 2000); }
TEST(FuzzSmoke, HttpFramer) { replay("http_framer", spear::fuzz::http_framer_one, 4000); }

// Seeds are real, accepted inputs: a seed that is refused fuzzes nothing but the
// first error path.
TEST(FuzzSmoke, SeedsAreValid) {
  for (const Bytes& b : load_seeds("safetensors", false))
    EXPECT_NO_THROW(spear::SafetensorsFile::parse(b.data(), b.size(), "seed"));
  for (const Bytes& b : load_seeds("config", false))
    EXPECT_NO_THROW(spear::ModelConfig::from_json_text(
        std::string_view(reinterpret_cast<const char*>(b.data()), b.size())));
  for (const Bytes& b : load_seeds("tokenizer", false))
    EXPECT_NO_THROW(spear::Tokenizer::from_json(
        std::string_view(reinterpret_cast<const char*>(b.data()), b.size())));
}

std::string_view text_of(const Bytes& b) {
  return std::string_view(reinterpret_cast<const char*>(b.data()), b.size());
}

// Each request seed is accepted by one of the endpoints it was written for.
TEST(FuzzSmoke, RequestSeedsAreValid) {
  namespace sv = spear::server;
  const spear::fuzz::RequestContext& ctx = spear::fuzz::request_context();
  const std::vector<Bytes> seeds = load_seeds("request", false);
  ASSERT_GE(seeds.size(), 10u);
  for (const Bytes& b : seeds) {
    const nlohmann::json body = sv::parse_body(text_of(b));
    int accepted = 0;
    std::string model;
    auto attempt = [&](auto&& f) {
      try {
        f();
        ++accepted;
      } catch (const sv::ApiError&) {
      }
    };
    attempt([&] { sv::parse_completion_request(body, ctx.tok, ctx.lim, ctx.defaults); });
    for (const sv::ChatTemplate* t : {&ctx.jinja_tmpl, &ctx.plain_tmpl}) {
      attempt([&] { sv::parse_chat_request(body, ctx.tok, *t, ctx.lim, ctx.defaults); });
      attempt([&] { sv::tokenize_response(body, ctx.tok, *t, ctx.lim, &model); });
    }
    attempt([&] { sv::detokenize_response(body, ctx.tok, ctx.lim, &model); });
    EXPECT_GE(accepted, 1) << body.dump();
  }
}

// Every template seed loads (from_jinja renders the sample conversations).
TEST(FuzzSmoke, ChatTemplateSeedsAreValid) {
  for (const Bytes& b : load_seeds("chat_template", false)) {
    const std::string_view in = text_of(b);
    EXPECT_NO_THROW(spear::server::ChatTemplate::from_jinja(std::string(in.substr(0, in.find('\0'))),
                                                            "<s>", "</s>"));
  }
}

// The .spear seeds are complete artifacts, SHA-256 included.
TEST(FuzzSmoke, SpearSeedsAreValid) {
  const std::vector<Bytes> seeds = load_seeds("spear", false);
  ASSERT_GE(seeds.size(), 2u);
  int with_ec = 0;
  for (const Bytes& b : seeds) {
    auto f = spear::SafetensorsFile::parse(b.data(), b.size(), "seed");
    spear::SpearArtifact a;
    ASSERT_NO_THROW(a = spear::read_spear(f, "seed", /*verify_hash=*/true));
    with_ec += a.ec_count() > 0;
  }
  EXPECT_GE(with_ec, 1);
}

// The index seeds parse, and the one over the fixture's real shards opens.
TEST(FuzzSmoke, SafetensorsIndexSeedsAreValid) {
  spear::fuzz::IndexFixture fx;
  int opened = 0;
  for (const Bytes& b : load_seeds("safetensors_index", false)) {
    ASSERT_NO_THROW(spear::parse_safetensors_index(text_of(b), "seed"));
    std::ofstream(fx.index_path(), std::ios::binary | std::ios::trunc) << text_of(b);
    try {
      spear::TensorStore s = spear::TensorStore::open(fx.index_path());
      opened += s.has("a.x");
    } catch (const spear::Error&) {
    }
  }
  EXPECT_GE(opened, 1);
}

// Every framer seed frames at least one request and no error, whole or in pieces.
TEST(FuzzSmoke, HttpFramerSeedsAreValid) {
  spear::server::FramingLimits lim;
  for (const Bytes& b : load_seeds("http_framer", false)) {
    ASSERT_FALSE(b.empty());
    const std::string_view stream = text_of(b).substr(1);
    for (size_t piece : {stream.size() + 1, size_t{1}, size_t{7}}) {
      const spear::fuzz::FramedOutcome o = spear::fuzz::frame_stream(stream, piece, lim);
      EXPECT_GE(o.requests.size(), 1u);
      EXPECT_EQ(o.error_status, 0) << o.error_code;
    }
  }
}
