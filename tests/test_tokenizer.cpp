// Tokenizer: exact agreement with transformers on the reference cases, whole-file
// token counts of the perplexity protocol, streaming decode, and clean errors on
// malformed tokenizer.json files.
#include <gtest/gtest.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>
#include <thread>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "test_paths.h"
#include "tokenizer/tokenizer.h"

namespace {

using nlohmann::json;
using spear::StreamDecoder;
using spear::Tokenizer;

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  EXPECT_TRUE(in.good()) << "cannot open " << path;
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

std::string tiny_dir() { return spear::test::tiny_model_dir(); }

// Loaded once per process: the model directories are read-only inputs.
const Tokenizer& tiny_tokenizer() {
  static const Tokenizer tok = Tokenizer::from_file(tiny_dir() + "/tokenizer.json");
  return tok;
}

const Tokenizer& mixlm_tokenizer() {
  static const Tokenizer tok = Tokenizer::from_file(spear::test::mixlm_dir() + "/tokenizer.json");
  return tok;
}

std::string stream_decode(const Tokenizer& tok, const std::vector<int32_t>& ids, bool skip_special = true) {
  StreamDecoder stream(tok, skip_special);
  std::string out;
  for (int32_t id : ids) out += stream.push(id);
  out += stream.finish();
  return out;
}

// Every reference case: encode == ids, decode == decoded, streaming == decoded.
void check_reference_cases(const Tokenizer& tok, const std::string& reference_path) {
  const json ref = json::parse(read_file(reference_path));
  ASSERT_TRUE(ref.contains("tokenizer"));
  ASSERT_FALSE(ref["tokenizer"].empty());
  for (const json& c : ref["tokenizer"]) {
    const std::string text = c["text"].get<std::string>();
    const auto ids = c["ids"].get<std::vector<int32_t>>();
    const std::string decoded = c["decoded"].get<std::string>();
    EXPECT_EQ(tok.encode(text), ids) << "encode: " << text;
    EXPECT_EQ(tok.decode(ids), decoded) << "decode: " << text;
    EXPECT_EQ(stream_decode(tok, ids), decoded) << "stream: " << text;
  }
}

// Encodes a whole file as the perplexity protocol does (BOS first) and reports the time.
size_t timed_file_token_count(const Tokenizer& tok, const std::string& path, const char* label) {
  const std::string text = read_file(path);
  const auto t0 = std::chrono::steady_clock::now();
  const size_t n = tok.encode(text).size();
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("[ timing   ] %s: %zu bytes -> %zu tokens in %.3f s\n", label, text.size(), n, s);
  return n;
}

// ---- reference agreement -------------------------------------------------------

TEST(Tokenizer, TinyReferenceCases) {
  check_reference_cases(tiny_tokenizer(), tiny_dir() + "/reference.json");
}

TEST(Tokenizer, MixlmReferenceCases) {
  if (spear::test::mixlm_dir().empty()) GTEST_SKIP() << "mixlm-19m not found (set SPEAR_SHARED_DIR)";
  check_reference_cases(mixlm_tokenizer(), spear::test::mixlm_dir() + "/reference.json");
}

TEST(Tokenizer, TinyWholeFileTokenCount) {
  const std::string path = spear::test::data_dir() + "/tinystories/tinystories_val.txt";
  EXPECT_EQ(timed_file_token_count(tiny_tokenizer(), path, "stories260K tinystories_val"), 393019u);
}

TEST(Tokenizer, MixlmWholeFileTokenCounts) {
  if (spear::test::mixlm_dir().empty()) GTEST_SKIP() << "mixlm-19m not found (set SPEAR_SHARED_DIR)";
  const std::string shared = spear::test::shared_dir();
  const std::string wiki = shared + "/data/wikitext-2-raw/wiki.test.raw";
  if (!std::filesystem::exists(wiki)) GTEST_SKIP() << wiki << " not found";
  EXPECT_EQ(timed_file_token_count(mixlm_tokenizer(), wiki, "mixlm wiki.test.raw"), 401331u);
  const std::string stories = spear::test::data_dir() + "/tinystories/tinystories_val.txt";
  EXPECT_EQ(timed_file_token_count(mixlm_tokenizer(), stories, "mixlm tinystories_val"), 216575u);
}

// ---- vocabulary queries --------------------------------------------------------

TEST(Tokenizer, VocabularyQueries) {
  const Tokenizer& tok = tiny_tokenizer();
  EXPECT_EQ(tok.vocab_size(), 512);
  EXPECT_EQ(tok.bos_id(), 1);
  EXPECT_EQ(tok.token_to_id("<s>"), 1);
  EXPECT_EQ(tok.token_to_id("<0x0A>"), 13);
  EXPECT_EQ(tok.token_to_id("no such token"), -1);
  EXPECT_EQ(tok.id_to_token(1), "<s>");
  EXPECT_EQ(tok.id_to_token(13), "<0x0A>");
  EXPECT_THROW(tok.id_to_token(512), spear::Error);
  EXPECT_THROW(tok.id_to_token(-1), spear::Error);
  EXPECT_TRUE(tok.is_special(0));
  EXPECT_TRUE(tok.is_special(2));
  EXPECT_FALSE(tok.is_special(13));
}

TEST(Tokenizer, MixlmVocabularyQueries) {
  if (spear::test::mixlm_dir().empty()) GTEST_SKIP() << "mixlm-19m not found (set SPEAR_SHARED_DIR)";
  const Tokenizer& tok = mixlm_tokenizer();
  EXPECT_EQ(tok.vocab_size(), 8192);
  EXPECT_EQ(tok.bos_id(), 0);
  EXPECT_EQ(tok.token_to_id("<|end_of_text|>"), 1);
  EXPECT_TRUE(tok.is_special(1));
}

// ---- special tokens --------------------------------------------------------------

TEST(Tokenizer, SpecialTokensInTextAreSingleTokens) {
  const Tokenizer& tok = tiny_tokenizer();
  // As tokenizers: the text around a special token is normalized piece by piece,
  // so "Hello" after "<s>" gets its own prepended "▁".
  std::vector<int32_t> expected = {1, 1};
  for (int32_t id : tok.encode("Hello", false)) expected.push_back(id);
  expected.push_back(2);
  EXPECT_EQ(tok.encode("<s>Hello</s>"), expected);
  EXPECT_EQ(tok.encode("Hello", false), std::vector<int32_t>({346, 306, 414}));
  EXPECT_EQ(tok.decode(expected), "Hello");
  EXPECT_EQ(tok.decode(expected, false), "<s><s> Hello</s>");
}

TEST(Tokenizer, MixlmSpecialTokensInText) {
  if (spear::test::mixlm_dir().empty()) GTEST_SKIP() << "mixlm-19m not found (set SPEAR_SHARED_DIR)";
  const Tokenizer& tok = mixlm_tokenizer();
  const auto ids = tok.encode("Hello<|end_of_text|> world", false);
  std::vector<int32_t> expected = tok.encode("Hello", false);
  expected.push_back(1);
  for (int32_t id : tok.encode(" world", false)) expected.push_back(id);
  EXPECT_EQ(ids, expected);
  EXPECT_EQ(tok.decode(ids), "Hello world");
  EXPECT_EQ(tok.decode(ids, false), "Hello<|end_of_text|> world");
}

TEST(Tokenizer, NoSpecialsWithoutPostProcessing) {
  EXPECT_EQ(tiny_tokenizer().encode("", false), std::vector<int32_t>{});
  EXPECT_EQ(tiny_tokenizer().encode("a", false), std::vector<int32_t>({261}));
}

// A tiny byte-level tokenizer with one added token of each flavour.
json toy_byte_level_json() {
  json vocab = json::object();
  // Byte-level characters for the printable ASCII bytes are the bytes themselves.
  for (int c = 0x21; c <= 0x7E; ++c) vocab[std::string(1, char(c))] = c;
  vocab["\xC4\xA0"] = 0x20;  // "Ġ" stands for the space byte
  vocab["<eos>"] = 200;
  vocab["<tool>"] = 201;
  vocab["cat"] = 202;
  vocab["ca"] = 203;
  vocab["<sep>"] = 204;
  return json{
      {"version", "1.0"},
      {"added_tokens",
       {{{"id", 200}, {"content", "<eos>"}, {"special", true}, {"normalized", false}},
        {{"id", 201}, {"content", "<tool>"}, {"special", true}, {"normalized", false}, {"lstrip", true},
         {"rstrip", true}},
        {{"id", 202}, {"content", "cat"}, {"special", false}, {"normalized", true}, {"single_word", true}},
        {{"id", 204}, {"content", "<sep>"}, {"special", false}, {"normalized", false}}}},
      {"normalizer", nullptr},
      {"pre_tokenizer", {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", true}}},
      {"post_processor", nullptr},
      {"decoder", {{"type", "ByteLevel"}}},
      {"model",
       {{"type", "BPE"}, {"vocab", vocab}, {"merges", json::array({"c a"})}, {"unk_token", nullptr}}}};
}

TEST(Tokenizer, AddedTokenFlags) {
  const Tokenizer tok = Tokenizer::from_json(toy_byte_level_json().dump());
  const int32_t sp = 0x20;
  EXPECT_EQ(tok.bos_id(), -1);
  // post_processor null: nothing added even with add_special.
  EXPECT_EQ(tok.encode("a<eos>b"), std::vector<int32_t>({'a', 200, 'b'}));
  // lstrip/rstrip swallow the surrounding spaces.
  EXPECT_EQ(tok.encode("a  <tool>  b"), std::vector<int32_t>({'a', 201, 'b'}));
  // single_word: only matched when not inside a word; elsewhere BPE applies ("ca"+"t").
  EXPECT_EQ(tok.encode("a cat b"), std::vector<int32_t>({'a', sp, 202, sp, 'b'}));
  EXPECT_EQ(tok.encode("cats"), std::vector<int32_t>({203, 't', 's'}));
  EXPECT_EQ(tok.encode("<sep>"), std::vector<int32_t>({204}));
  // Non-special added tokens are kept by decode(skip_special=true).
  EXPECT_EQ(tok.decode({'a', 200, 204, 202}), "a<sep>cat");
  EXPECT_EQ(tok.decode({'a', 200, 204, 202}, false), "a<eos><sep>cat");
  EXPECT_EQ(tok.vocab_size(), 205);
}

// ---- model variants ------------------------------------------------------------

TEST(Tokenizer, MergesAsStringsEqualMergesAsPairs) {
  json j = json::parse(read_file(tiny_dir() + "/tokenizer.json"));
  for (json& m : j["model"]["merges"]) m = m[0].get<std::string>() + " " + m[1].get<std::string>();
  const Tokenizer legacy = Tokenizer::from_json(j.dump());
  for (const char* text : {"Once upon a time, there was a little dog named Max.", "don't you'll I'M we've"}) {
    EXPECT_EQ(legacy.encode(text), tiny_tokenizer().encode(text)) << text;
  }
}

TEST(Tokenizer, MetaspacePreTokenizerMatchesPrependReplace) {
  // Metaspace without splitting does what the tiny model's normalizers do, except
  // that it prepends "▁" only to text not already starting with one (a space).
  json j = json::parse(read_file(tiny_dir() + "/tokenizer.json"));
  j["normalizer"] = nullptr;
  j["pre_tokenizer"] = {{"type", "Metaspace"}, {"replacement", "\xE2\x96\x81"}, {"prepend_scheme", "always"},
                        {"split", false}};
  j["decoder"] = {{"type", "Sequence"},
                  {"decoders", {{{"type", "Metaspace"}, {"replacement", "\xE2\x96\x81"}, {"prepend_scheme", "always"}},
                                {{"type", "ByteFallback"}},
                                {{"type", "Fuse"}}}}};
  const Tokenizer meta = Tokenizer::from_json(j.dump());
  for (const char* text : {"Hello world", "trailing spaces   ", "tabs\tand\nnew\n\nlines\r\n end"}) {
    const auto ids = tiny_tokenizer().encode(text);
    EXPECT_EQ(meta.encode(text), ids) << text;
    EXPECT_EQ(meta.decode(ids), text) << text;
  }
  EXPECT_EQ(meta.encode(" Hello"), tiny_tokenizer().encode("Hello"));
}

TEST(Tokenizer, Gpt2StyleByteLevelRegex) {
  if (spear::test::mixlm_dir().empty()) GTEST_SKIP() << "mixlm-19m not found (set SPEAR_SHARED_DIR)";
  json j = json::parse(read_file(spear::test::mixlm_dir() + "/tokenizer.json"));
  j["pre_tokenizer"] = {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", true}};
  const Tokenizer gpt2 = Tokenizer::from_json(j.dump());
  // On plain words the GPT-2 and Llama-3 patterns split alike.
  EXPECT_EQ(gpt2.encode("Hello world"), mixlm_tokenizer().encode("Hello world"));
  // They differ on digits: GPT-2 keeps " 2024" as one pre-token, Llama-3 cuts 3-digit groups.
  const std::string year = "The year 2024";
  EXPECT_NE(gpt2.encode(year), mixlm_tokenizer().encode(year));
  for (const char* text : {"The year 2024 had 366 days; 1234567 is a number.", "emoji 🦙🚀 end", "tabs\tand\nnew"}) {
    EXPECT_EQ(gpt2.decode(gpt2.encode(text)), text);
  }
  j["pre_tokenizer"]["add_prefix_space"] = true;
  const Tokenizer prefixed = Tokenizer::from_json(j.dump());
  EXPECT_EQ(prefixed.encode("Hello world"), mixlm_tokenizer().encode(" Hello world"));
}

TEST(Tokenizer, UnknownCharactersWithoutByteFallback) {
  // byte_fallback off and fuse_unk on: a run of unknown characters is one <unk>.
  json j = json::parse(read_file(tiny_dir() + "/tokenizer.json"));
  j["model"]["byte_fallback"] = false;
  const Tokenizer tok = Tokenizer::from_json(j.dump());
  const auto ids = tok.encode("a日本b", false);  // "▁a", <unk>, "b"
  ASSERT_EQ(ids.size(), 3u);
  EXPECT_EQ(ids[0], 261);
  EXPECT_EQ(ids[1], 0);
  EXPECT_EQ(ids[2], tok.token_to_id("b"));
  j["model"]["fuse_unk"] = false;
  EXPECT_EQ(Tokenizer::from_json(j.dump()).encode("日本", false), std::vector<int32_t>({410, 0, 0}));
}

// ---- decoding --------------------------------------------------------------------

TEST(Tokenizer, OutOfRangeIdsDecodeToReplacementCharacter) {
  const Tokenizer& tok = tiny_tokenizer();
  const auto hello = tok.encode("Hello", false);
  std::vector<int32_t> ids = hello;
  ids.push_back(100000);
  ids.push_back(-3);
  EXPECT_EQ(tok.decode(ids), "Hello\xEF\xBF\xBD\xEF\xBF\xBD");
  // Byte tokens that never complete a character become U+FFFD, one per byte.
  EXPECT_EQ(tok.decode({tok.token_to_id("<0xE6>"), tok.token_to_id("<0x97>")}), "\xEF\xBF\xBD\xEF\xBF\xBD");
}

TEST(Tokenizer, StreamEmitsOnlyCompleteCharacters) {
  const Tokenizer& tok = tiny_tokenizer();
  const auto ids = tok.encode("日", false);  // three byte tokens after "▁"
  ASSERT_EQ(ids.size(), 4u);
  StreamDecoder stream(tok);
  EXPECT_EQ(stream.push(ids[0]), "");  // a lone leading "▁" is stripped: nothing yet
  EXPECT_EQ(stream.push(ids[1]), "");
  EXPECT_EQ(stream.push(ids[2]), "");
  EXPECT_EQ(stream.push(ids[3]), "日");
  EXPECT_EQ(stream.finish(), "");
  // An unfinished character comes out as U+FFFD at finish().
  EXPECT_EQ(stream_decode(tok, {ids[0], ids[1], ids[2]}), tok.decode({ids[0], ids[1], ids[2]}));
}

bool is_byte_token(const Tokenizer& tok, int32_t id) {
  const std::string t = tok.id_to_token(id);
  return t.size() == 6 && t.compare(0, 3, "<0x") == 0;
}

// Streaming must reproduce decode() exactly for realistic id sequences:
// encodings of mixed text with special tokens spliced in at random (not inside
// a run of <0xXX> tokens: see the StreamDecoder comment for that case).
void check_stream_matches_decode(const Tokenizer& tok, const std::string& text) {
  std::mt19937 rng(1234);
  auto ids = tok.encode(text);
  for (int inserted = 0; inserted < 20;) {
    const size_t at = std::uniform_int_distribution<size_t>(0, ids.size())(rng);
    if (at > 0 && at < ids.size() && is_byte_token(tok, ids[at - 1]) && is_byte_token(tok, ids[at])) continue;
    ids.insert(ids.begin() + std::ptrdiff_t(at), inserted++ % 2 ? 1 : 0);
  }
  for (bool skip : {true, false}) {
    EXPECT_EQ(stream_decode(tok, ids, skip), tok.decode(ids, skip)) << "skip_special=" << skip;
  }
}

const char* kMixedText =
    "Once upon a time 日本語のテキスト and emoji 🦙🚀, naïve café — “quotes”.\n\n"
    "   Spaces   everywhere   \tand tabs\r\n123456789 !!! ??? ... ‘single’ … end ";

TEST(Tokenizer, StreamMatchesDecodeTiny) { check_stream_matches_decode(tiny_tokenizer(), kMixedText); }

TEST(Tokenizer, StreamMatchesDecodeMixlm) {
  if (spear::test::mixlm_dir().empty()) GTEST_SKIP() << "mixlm-19m not found (set SPEAR_SHARED_DIR)";
  check_stream_matches_decode(mixlm_tokenizer(), kMixedText);
}

TEST(Tokenizer, StreamOverLongGenerationIsLinear) {
  // 200k tokens through the stream: quadratic re-decoding would take minutes.
  const Tokenizer& tok = tiny_tokenizer();
  const std::string text = read_file(spear::test::data_dir() + "/tinystories/tinystories_val.txt").substr(0, 400000);
  const auto ids = tok.encode(text);
  const auto t0 = std::chrono::steady_clock::now();
  const std::string streamed = stream_decode(tok, ids);
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("[ timing   ] stream-decoded %zu tokens in %.3f s\n", ids.size(), s);
  EXPECT_EQ(streamed, tok.decode(ids));
  EXPECT_EQ(streamed, text);
  EXPECT_LT(s, 10.0);
}

TEST(Tokenizer, ConcurrentEncodesAgreeWithSequential) {
  // A fresh tokenizer, so the threads fill its word cache concurrently.
  const Tokenizer tok = Tokenizer::from_file(tiny_dir() + "/tokenizer.json");
  const std::string text = read_file(spear::test::data_dir() + "/tinystories/tinystories_val.txt").substr(0, 200000);
  std::vector<std::string> parts;
  for (size_t i = 0; i < 8; ++i) parts.push_back(text.substr(i * 25000, 25000));
  std::vector<std::vector<int32_t>> concurrent(parts.size());
  std::vector<std::thread> threads;
  for (size_t i = 0; i < parts.size(); ++i) {
    threads.emplace_back([&, i] { concurrent[i] = tok.encode(parts[i]); });
  }
  for (auto& t : threads) t.join();
  for (size_t i = 0; i < parts.size(); ++i) EXPECT_EQ(concurrent[i], tiny_tokenizer().encode(parts[i])) << i;
}

// ---- bad input -------------------------------------------------------------------

TEST(Tokenizer, InvalidUtf8InputIsAnError) {
  EXPECT_THROW(tiny_tokenizer().encode("abc\xFF"), spear::Error);
  EXPECT_THROW(tiny_tokenizer().encode("\xE6\x97"), spear::Error);
  EXPECT_THROW(tiny_tokenizer().encode("\xED\xA0\x80"), spear::Error);  // a surrogate
}

void expect_load_error(const std::string& json_text, const std::string& fragment) {
  try {
    Tokenizer::from_json(json_text);
    ADD_FAILURE() << "no error; expected one mentioning \"" << fragment << "\"";
  } catch (const spear::Error& e) {
    EXPECT_NE(std::string(e.what()).find(fragment), std::string::npos) << e.what();
  }
}

TEST(Tokenizer, MalformedTokenizerJsonIsAnError) {
  const std::string good = read_file(tiny_dir() + "/tokenizer.json");
  expect_load_error(good.substr(0, good.size() / 2), "not valid JSON");
  expect_load_error("", "not valid JSON");
  expect_load_error("[1, 2]", "top level");

  json j = json::parse(good);
  json no_model = j;
  no_model.erase("model");
  expect_load_error(no_model.dump(), "\"model\" is missing");

  json unigram = j;
  unigram["model"]["type"] = "Unigram";
  expect_load_error(unigram.dump(), "unsupported model type \"Unigram\"");

  json bad_merge = j;
  bad_merge["model"]["merges"][3] = json::array({"a"});
  expect_load_error(bad_merge.dump(), "merges[3]");
  bad_merge["model"]["merges"][3] = "nospace";
  expect_load_error(bad_merge.dump(), "merges[3]");
  bad_merge["model"]["merges"][3] = json::array({"q", "zzz-not-a-token"});
  expect_load_error(bad_merge.dump(), "merges[3]");

  json bad_vocab = j;
  bad_vocab["model"]["vocab"]["<s>"] = "one";
  expect_load_error(bad_vocab.dump(), "invalid id");

  json bad_regex = j;
  bad_regex["pre_tokenizer"] = {{"type", "Split"}, {"pattern", {{"Regex", "(unclosed[\\p{L}"}}},
                                {"behavior", "Isolated"}, {"invert", false}};
  expect_load_error(bad_regex.dump(), "invalid regex");

  json unknown_normalizer = j;
  unknown_normalizer["normalizer"] = {{"type", "NFKC"}};
  expect_load_error(unknown_normalizer.dump(), "unsupported normalizer type \"NFKC\"");

  json unknown_decoder = j;
  unknown_decoder["decoder"] = {{"type", "WordPiece"}};
  expect_load_error(unknown_decoder.dump(), "unsupported decoder type");

  json bad_template = j;
  bad_template["post_processor"]["single"][0]["SpecialToken"]["id"] = "<missing>";
  expect_load_error(bad_template.dump(), "<missing>");

  json wrong_type = j;
  wrong_type["model"]["fuse_unk"] = "yes";
  expect_load_error(wrong_type.dump(), "fuse_unk");

  json bad_added = j;
  bad_added["added_tokens"][0]["id"] = "zero";
  expect_load_error(bad_added.dump(), "added token");

  json deep = j;
  json normalizer = {{"type", "Prepend"}, {"prepend", "x"}};
  for (int i = 0; i < 100; ++i) normalizer = {{"type", "Sequence"}, {"normalizers", {normalizer}}};
  deep["normalizer"] = normalizer;
  expect_load_error(deep.dump(), "nested too deeply");

  json exploding = j;
  json steps = json::array();
  for (int i = 0; i < 12; ++i) steps.push_back({{"type", "Replace"}, {"pattern", {{"Regex", ""}}}, {"content", "ab"}});
  exploding["normalizer"] = {{"type", "Sequence"}, {"normalizers", steps}};
  const Tokenizer exploder = Tokenizer::from_json(exploding.dump());
  EXPECT_THROW(exploder.encode("hello"), spear::Error);

  json sparse = j;
  sparse["model"]["vocab"]["far away"] = 2000000000;  // must not allocate per id
  EXPECT_EQ(Tokenizer::from_json(sparse.dump()).vocab_size(), 2000000001);

  EXPECT_THROW(Tokenizer::from_file(tiny_dir() + "/no-such-tokenizer.json"), spear::Error);
}

}  // namespace
