// safetensors reading, validation, sharded stores and atomic writing.
#include <gtest/gtest.h>

#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <random>
#include <string>
#include <vector>

#include "core/error.h"
#include "io/safetensors.h"
#include "test_paths.h"

namespace fs = std::filesystem;
using spear::DType;

namespace {

struct TempDir : spear::test::TempDir {
  TempDir() : spear::test::TempDir("st") {}
};

// u64 little-endian header length + header + buffer; `declared_len` overrides the
// length field (to point past the end, or past the cap).
std::string raw_file(const std::string& header, const std::string& buffer,
                     uint64_t declared_len = UINT64_MAX) {
  uint64_t n = declared_len == UINT64_MAX ? header.size() : declared_len;
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>(n >> (8 * i));
  return out + header + buffer;
}

void write_file(const std::string& path, const std::string& bytes) {
  std::ofstream f(path, std::ios::binary);
  f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

std::string parse_error(const std::string& bytes) {
  try {
    spear::SafetensorsFile::parse(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size(),
                                  "mem.safetensors");
  } catch (const spear::Error& e) {
    return e.what();
  }
  return "";
}

// Parsing must fail with a spear::Error naming the file and containing `reason`.
#define EXPECT_REFUSED(bytes, reason)                                       \
  do {                                                                      \
    std::string msg_ = parse_error(bytes);                                  \
    EXPECT_FALSE(msg_.empty()) << "accepted; expected: " << (reason);       \
    EXPECT_NE(msg_.find("mem.safetensors"), std::string::npos) << msg_;     \
    EXPECT_NE(msg_.find(reason), std::string::npos) << msg_;                \
  } while (0)

std::string u8_entry(const std::string& name, uint64_t b, uint64_t e) {
  return "\"" + name + "\":{\"dtype\":\"U8\",\"shape\":[" + std::to_string(e - b) +
         "],\"data_offsets\":[" + std::to_string(b) + "," + std::to_string(e) + "]}";
}

// A small valid two-tensor file to start corruptions from.
std::vector<float> kF32 = {1.5f, -2.0f, 0.25f, 3.0f, 0.0f, -0.0f};

void write_two_tensor_file(const std::string& path, const std::string& a, const std::string& b,
                           float scale) {
  std::vector<float> x(kF32);
  for (float& v : x) v *= scale;
  std::vector<uint16_t> y = {spear::f32_to_bf16(scale), spear::f32_to_bf16(-scale)};
  spear::write_safetensors(path,
                           {{a, DType::F32, {2, 3}, x.data()}, {b, DType::BF16, {2}, y.data()}},
                           {{"format", "pt"}});
}

}  // namespace

TEST(Safetensors, RoundTripAllDtypes) {
  TempDir dir;
  const std::string path = dir / "rt.safetensors";
  std::vector<float> f32 = kF32;
  std::vector<uint16_t> f16, bf16;
  const std::vector<float> halfs = {1.0f, -0.5f, 65504.0f, 6.1035156e-05f, 0.0f, 3.140625f};
  for (float v : halfs) f16.push_back(spear::f32_to_f16(v));
  for (float v : halfs) bf16.push_back(spear::f32_to_bf16(v));
  std::vector<uint8_t> u8 = {0, 1, 2, 253, 254, 255, 7};
  std::vector<int32_t> i32 = {-1, 0, 1, 2147483647};
  float scalar = 42.0f;
  std::map<std::string, std::string> meta = {{"format", "pt"}, {"note", "héllo \"q\""}};
  spear::write_safetensors(path,
                           {{"w.f32", DType::F32, {2, 3}, f32.data()},
                            {"w.f16", DType::F16, {6}, f16.data()},
                            {"w.bf16", DType::BF16, {3, 2}, bf16.data()},
                            {"w.u8", DType::U8, {7}, u8.data()},
                            {"w.empty", DType::F32, {0, 4}, nullptr},
                            {"w.i32", DType::I32, {4}, i32.data()},
                            {"w.scalar", DType::F32, {}, &scalar}},
                           meta);
  // No temporary left next to the file.
  auto entries = std::distance(fs::directory_iterator(dir.path), fs::directory_iterator());
  EXPECT_EQ(entries, 1);

  auto f = spear::SafetensorsFile::open(path);
  EXPECT_EQ(f->metadata(), meta);
  ASSERT_EQ(f->tensors().size(), 7u);
  // File order is write order.
  const char* order[] = {"w.f32", "w.f16", "w.bf16", "w.u8", "w.empty", "w.i32", "w.scalar"};
  for (size_t i = 0; i < 7; ++i) EXPECT_EQ(f->tensors()[i].name, order[i]);

  const auto* t = f->find("w.f32");
  ASSERT_NE(t, nullptr);
  EXPECT_EQ(t->dtype, DType::F32);
  EXPECT_EQ(t->shape, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(t->shape_str(), "(2, 3)");
  EXPECT_EQ(t->numel(), 6);
  EXPECT_EQ(spear::to_f32(*t), f32);

  t = f->find("w.f16");
  ASSERT_NE(t, nullptr);
  EXPECT_EQ(t->dtype, DType::F16);
  EXPECT_EQ(spear::to_f32(*t), halfs);  // all exactly representable in half
  t = f->find("w.bf16");
  ASSERT_NE(t, nullptr);
  EXPECT_EQ(t->dtype, DType::BF16);
  EXPECT_EQ(t->shape, (std::vector<int64_t>{3, 2}));
  std::vector<float> got = spear::to_f32(*t);
  for (size_t i = 0; i < halfs.size(); ++i) EXPECT_EQ(got[i], spear::bf16_to_f32(bf16[i]));
  EXPECT_EQ(got[0], 1.0f);
  EXPECT_EQ(got[1], -0.5f);

  t = f->find("w.u8");
  ASSERT_NE(t, nullptr);
  EXPECT_EQ(t->nbytes, 7u);
  EXPECT_EQ(0, std::memcmp(t->data, u8.data(), 7));
  EXPECT_THROW(spear::to_f32(*t), spear::Error);  // not a float type

  t = f->find("w.i32");
  ASSERT_NE(t, nullptr);
  EXPECT_EQ(t->dtype, DType::I32);
  EXPECT_EQ(0, std::memcmp(t->data, i32.data(), 16));

  t = f->find("w.empty");
  ASSERT_NE(t, nullptr);
  EXPECT_EQ(t->shape, (std::vector<int64_t>{0, 4}));
  EXPECT_EQ(t->nbytes, 0u);
  EXPECT_EQ(t->numel(), 0);
  EXPECT_TRUE(spear::to_f32(*t).empty());

  t = f->find("w.scalar");
  ASSERT_NE(t, nullptr);
  EXPECT_TRUE(t->shape.empty());
  EXPECT_EQ(t->shape_str(), "()");
  EXPECT_EQ(spear::to_f32(*t), std::vector<float>{42.0f});
  EXPECT_EQ(f->find("nope"), nullptr);

  // Layout: header padded to 8 bytes with spaces; file = 8 + N + buffer.
  std::ifstream in(path, std::ios::binary);
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<uint8_t>(bytes[i]);
  EXPECT_EQ(n % 8, 0u);
  EXPECT_EQ(bytes[8], '{');
  size_t buffer = 24 + 12 + 12 + 7 + 0 + 16 + 4;
  EXPECT_EQ(bytes.size(), 8 + n + buffer);
  EXPECT_EQ(f->file_size(), bytes.size());
  size_t last = bytes.find_last_not_of(' ', 8 + n - 1);
  EXPECT_EQ(bytes[last], '}');
}

TEST(Safetensors, WriteIsAtomicAndValidates) {
  TempDir dir;
  const std::string path = dir / "a.safetensors";
  write_two_tensor_file(path, "a", "b", 1.0f);
  float x = 1.0f;
  // A refused write leaves the previous file untouched and no temporary behind.
  EXPECT_THROW(spear::write_safetensors(path,
                                        {{"a", DType::F32, {1}, &x}, {"a", DType::F32, {1}, &x}},
                                        {}),
               spear::Error);
  EXPECT_THROW(spear::write_safetensors(path, {{"a", DType::F32, {-1}, &x}}, {}), spear::Error);
  EXPECT_THROW(spear::write_safetensors(path, {{"__metadata__", DType::F32, {1}, &x}}, {}),
               spear::Error);
  EXPECT_THROW(spear::write_safetensors(path, {{"a", DType::F32, {4}, nullptr}}, {}),
               spear::Error);
  EXPECT_THROW(spear::write_safetensors(path, {{"bad\xff", DType::F32, {1}, &x}}, {}),
               spear::Error);
  auto f = spear::SafetensorsFile::open(path);
  EXPECT_EQ(f->tensors().size(), 2u);
  EXPECT_EQ(spear::to_f32(*f->find("a")), kF32);
  // Writing into a missing directory fails cleanly.
  EXPECT_THROW(spear::write_safetensors(dir / "no/such/dir.safetensors",
                                        {{"a", DType::F32, {1}, &x}}, {}),
               spear::Error);
  // Renaming over a directory fails after the data was written: the temp goes away.
  fs::create_directory(dir / "isdir.safetensors");
  fs::create_directory(dir / "isdir.safetensors/x");
  EXPECT_THROW(spear::write_safetensors(dir / "isdir.safetensors", {{"a", DType::F32, {1}, &x}}, {}),
               spear::Error);
  // Overwrite works.
  write_two_tensor_file(path, "c", "d", 2.0f);
  f = spear::SafetensorsFile::open(path);
  EXPECT_NE(f->find("c"), nullptr);
  EXPECT_EQ(f->find("a"), nullptr);
  auto entries = std::distance(fs::directory_iterator(dir.path), fs::directory_iterator());
  EXPECT_EQ(entries, 2);  // a.safetensors and isdir.safetensors
}

TEST(Safetensors, AcceptsUnsortedHeaderAndZeroSize) {
  // Header order need not be offset order (the reference sorts by offsets), zero-size
  // tensors may sit anywhere, and "__metadata__": null means no metadata.
  std::string h = "{\"b\":{\"dtype\":\"U8\",\"shape\":[2],\"data_offsets\":[3,5]}," +
                  u8_entry("a", 0, 3) +
                  ",\"z\":{\"dtype\":\"F32\",\"shape\":[0,7],\"data_offsets\":[3,3]}," +
                  "\"__metadata__\":null}";
  std::string bytes = raw_file(h, "abcde");
  auto f = spear::SafetensorsFile::parse(reinterpret_cast<const uint8_t*>(bytes.data()),
                                         bytes.size(), "mem");
  ASSERT_EQ(f->tensors().size(), 3u);
  EXPECT_EQ(f->tensors()[0].name, "a");
  EXPECT_EQ(f->tensors()[1].name, "z");
  EXPECT_EQ(f->tensors()[2].name, "b");
  EXPECT_EQ(std::string(reinterpret_cast<const char*>(f->find("b")->data), 2), "de");
  EXPECT_TRUE(f->metadata().empty());
  // A file with no tensors at all is valid.
  std::string empty = raw_file("{}      ", "");
  EXPECT_EQ(parse_error(empty), "");
}

TEST(Safetensors, RefusesCorruptFiles) {
  const std::string good_h = "{" + u8_entry("a", 0, 4) + "," + u8_entry("b", 4, 6) + "}";
  ASSERT_EQ(parse_error(raw_file(good_h, "abcdef")), "");

  EXPECT_REFUSED(std::string(), "empty");
  EXPECT_REFUSED(std::string("\x05\0\0", 3), "shorter than");
  // Truncated buffer and trailing bytes.
  EXPECT_REFUSED(raw_file(good_h, "abcde"), "past the");
  EXPECT_REFUSED(raw_file(good_h, "abcdefg"), "trailing");
  // Header length over the cap, and past EOF.
  EXPECT_REFUSED(raw_file(good_h, "abcdef", spear::kMaxSafetensorsHeader + 1), "exceeds the limit");
  EXPECT_REFUSED(raw_file(good_h, "abcdef", UINT64_MAX - 1), "exceeds the limit");
  EXPECT_REFUSED(raw_file(good_h, "abcdef", good_h.size() + 7), "past the end");
  // Not JSON, not an object, not UTF-8.
  EXPECT_REFUSED(raw_file("{not json}", ""), "not valid JSON");
  EXPECT_REFUSED(raw_file("[1,2]", ""), "start with");
  EXPECT_REFUSED(raw_file("{\"a\":1} x", ""), "not valid JSON");
  EXPECT_REFUSED(raw_file("{\"\xc3\x28\":{}}", ""), "UTF-8");
  EXPECT_REFUSED(raw_file("", "abc"), "start with");
  // Entries.
  EXPECT_REFUSED(raw_file("{\"a\":{\"dtype\":\"Q7\",\"shape\":[1],\"data_offsets\":[0,1]}}", "x"),
                 "unknown dtype 'Q7'");
  EXPECT_REFUSED(raw_file("{\"a\":{\"dtype\":\"U8\",\"shape\":[-1],\"data_offsets\":[0,1]}}", "x"),
                 "non-negative");
  EXPECT_REFUSED(raw_file("{\"a\":{\"dtype\":\"U8\",\"shape\":[1.0],\"data_offsets\":[0,1]}}", "x"),
                 "non-negative");
  EXPECT_REFUSED(raw_file("{\"a\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,-1]}}", "x"),
                 "data_offsets");
  EXPECT_REFUSED(raw_file("{\"a\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0]}}", "x"),
                 "data_offsets");
  EXPECT_REFUSED(raw_file("{\"a\":{\"shape\":[1],\"data_offsets\":[0,1]}}", "x"), "dtype");
  EXPECT_REFUSED(raw_file("{\"a\":[1,2]}", "x"), "not an object");
  // shape x dtype != byte range.
  EXPECT_REFUSED(raw_file("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,4]}}", "abcd"),
                 "needs 8 bytes");
  // Element count and byte size overflow.
  EXPECT_REFUSED(raw_file("{\"a\":{\"dtype\":\"U8\",\"shape\":[4294967296,4294967296],"
                          "\"data_offsets\":[0,0]}}", ""),
                 "overflows");
  EXPECT_REFUSED(raw_file("{\"a\":{\"dtype\":\"F64\",\"shape\":[4611686018427387904],"
                          "\"data_offsets\":[0,0]}}", ""),
                 "overflows");
  EXPECT_REFUSED(raw_file("{\"a\":{\"dtype\":\"U8\",\"shape\":[18446744073709551615],"
                          "\"data_offsets\":[0,0]}}", ""),
                 "too large");
  // Offsets: overlapping, gapped, reversed, not starting at 0.
  EXPECT_REFUSED(raw_file("{" + u8_entry("a", 0, 4) + "," + u8_entry("b", 3, 6) + "}", "abcdef"),
                 "overlaps");
  EXPECT_REFUSED(raw_file("{" + u8_entry("a", 0, 3) + "," + u8_entry("b", 4, 6) + "}", "abcdef"),
                 "gap");
  EXPECT_REFUSED(raw_file("{" + u8_entry("a", 1, 6) + "}", "abcdef"), "gap");
  EXPECT_REFUSED(raw_file("{\"a\":{\"dtype\":\"U8\",\"shape\":[0],\"data_offsets\":[4,0]}}", "abcd"),
                 "reversed");
  EXPECT_REFUSED(raw_file("{" + u8_entry("a", 0, 4) + "," + u8_entry("b", 0, 4) + "}", "abcd"),
                 "overlaps");
  // Duplicate names (nlohmann would silently keep the last one), also nested.
  EXPECT_REFUSED(raw_file("{" + u8_entry("a", 0, 2) + "," + u8_entry("a", 2, 4) + "}", "abcd"),
                 "'a' twice");
  EXPECT_REFUSED(raw_file("{\"a\":{\"dtype\":\"U8\",\"dtype\":\"U8\",\"shape\":[1],"
                          "\"data_offsets\":[0,1]}}", "x"),
                 "twice");
  // Metadata must map strings to strings.
  EXPECT_REFUSED(raw_file("{\"__metadata__\":{\"k\":1}}", ""), "not a string");
  EXPECT_REFUSED(raw_file("{\"__metadata__\":[\"k\"]}", ""), "not an object");
  // Error messages name the tensor.
  EXPECT_REFUSED(raw_file("{\"my.weight\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,4]}}",
                          "abcd"),
                 "tensor 'my.weight'");
}

TEST(Safetensors, OpenNamesTheFile) {
  TempDir dir;
  const std::string empty = dir / "empty.safetensors";
  write_file(empty, "");
  try {
    spear::SafetensorsFile::open(empty);
    FAIL() << "empty file accepted";
  } catch (const spear::Error& e) {
    EXPECT_NE(std::string(e.what()).find(empty), std::string::npos) << e.what();
  }
  write_file(dir / "short.safetensors", "abc");
  EXPECT_THROW(spear::SafetensorsFile::open(dir / "short.safetensors"), spear::Error);
  EXPECT_THROW(spear::SafetensorsFile::open(dir / "missing.safetensors"), spear::Error);
  EXPECT_THROW(spear::SafetensorsFile::open(dir.path.string()), spear::Error);  // a directory
  EXPECT_THROW(spear::TensorStore::open(dir / "missing"), spear::Error);
  EXPECT_THROW(spear::TensorStore::open(dir.path.string()), spear::Error);  // nothing inside
}

TEST(Safetensors, ToF32Bf16MatchesScalarForAllPatterns) {
  // Every bf16 bit pattern, at an odd byte offset (unaligned), through the vector path.
  std::vector<uint8_t> buf(1 + 2 * 65536);
  for (uint32_t i = 0; i < 65536; ++i) {
    buf[1 + 2 * i] = static_cast<uint8_t>(i);
    buf[2 + 2 * i] = static_cast<uint8_t>(i >> 8);
  }
  spear::TensorView t;
  t.name = "all";
  t.dtype = DType::BF16;
  t.shape = {65536};
  t.data = buf.data() + 1;
  t.nbytes = 2 * 65536;
  std::vector<float> out = spear::to_f32(t);
  std::vector<float> f16out;
  for (uint32_t i = 0; i < 65536; ++i) {
    float want = spear::bf16_to_f32(static_cast<uint16_t>(i));
    ASSERT_EQ(0, std::memcmp(&out[i], &want, 4)) << i;
  }
  t.dtype = DType::F16;
  f16out = spear::to_f32(t);
  for (uint32_t i = 0; i < 65536; ++i) {
    float want = spear::f16_to_f32(static_cast<uint16_t>(i));
    if (std::isnan(want)) {
      ASSERT_TRUE(std::isnan(f16out[i])) << i;
    } else {
      ASSERT_EQ(0, std::memcmp(&f16out[i], &want, 4)) << i;
    }
  }
  // A large tensor takes the threaded path; compare against the scalar conversion.
  const size_t n = (size_t{1} << 20) + 7;
  std::vector<uint16_t> big(n);
  std::mt19937 rng(1);
  for (auto& v : big) v = static_cast<uint16_t>(rng());
  t.dtype = DType::BF16;
  t.shape = {static_cast<int64_t>(n)};
  t.data = reinterpret_cast<const uint8_t*>(big.data());
  t.nbytes = 2 * n;
  out = spear::to_f32(t);
  for (size_t i = 0; i < n; ++i) {
    float want = spear::bf16_to_f32(big[i]);
    ASSERT_EQ(0, std::memcmp(&out[i], &want, 4)) << i;
  }
}

// --- sharded stores -------------------------------------------------------------------

namespace {

void write_index(const std::string& path, const std::string& weight_map_body) {
  write_file(path, "{\"metadata\":{\"total_size\":0},\"weight_map\":{" + weight_map_body + "}}");
}

std::string store_error(const std::string& path) {
  try {
    spear::TensorStore::open(path);
  } catch (const spear::Error& e) {
    return e.what();
  }
  return "";
}

}  // namespace

TEST(Safetensors, ShardedStore) {
  TempDir dir;
  write_two_tensor_file(dir / "s1.safetensors", "a", "b", 1.0f);
  write_two_tensor_file(dir / "s2.safetensors", "c", "d", 3.0f);
  write_index(dir / "model.safetensors.index.json",
              "\"a\":\"s1.safetensors\",\"b\":\"s1.safetensors\",\"c\":\"s2.safetensors\","
              "\"d\":\"s2.safetensors\"");
  auto store = spear::TensorStore::open(dir.path.string());
  EXPECT_EQ(store.names(), (std::vector<std::string>{"a", "b", "c", "d"}));
  EXPECT_EQ(store.files().size(), 2u);
  EXPECT_TRUE(store.has("c"));
  EXPECT_FALSE(store.has("e"));
  EXPECT_EQ(store.get("c").shape, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(spear::to_f32(store.get("d")), (std::vector<float>{3.0f, -3.0f}));
  EXPECT_EQ(store.mapped_bytes(),
            fs::file_size(dir / "s1.safetensors") + fs::file_size(dir / "s2.safetensors"));
  try {
    store.get("missing.weight");
    FAIL();
  } catch (const spear::Error& e) {
    EXPECT_NE(std::string(e.what()).find("missing.weight"), std::string::npos);
  }
  // The index file itself can be given, and the store survives a move.
  auto moved = spear::TensorStore::open(dir / "model.safetensors.index.json");
  spear::TensorStore other = std::move(moved);
  EXPECT_EQ(spear::to_f32(other.get("a")), kF32);
  // A path to one shard opens just that file.
  EXPECT_EQ(spear::TensorStore::open(dir / "s2.safetensors").names(),
            (std::vector<std::string>{"c", "d"}));
}

TEST(Safetensors, ShardedStoreRefusesBadIndexes) {
  TempDir root;
  fs::create_directories(root.path / "m");
  const std::string dir = root / "m";
  const std::string idx = dir + "/model.safetensors.index.json";
  write_two_tensor_file(dir + "/s1.safetensors", "a", "b", 1.0f);
  write_two_tensor_file(dir + "/s2.safetensors", "c", "d", 1.0f);
  write_two_tensor_file(root / "x.safetensors", "c", "d", 1.0f);  // outside the model dir
  const std::string s1 = "\"a\":\"s1.safetensors\",\"b\":\"s1.safetensors\"";

  write_index(idx, s1 + ",\"c\":\"../x.safetensors\"");
  EXPECT_NE(store_error(dir).find(".."), std::string::npos) << store_error(dir);
  write_index(idx, s1 + ",\"c\":\"" + root / "x.safetensors" + "\"");
  EXPECT_NE(store_error(dir).find("absolute"), std::string::npos) << store_error(dir);
  write_index(idx, s1 + ",\"c\":\"s3.safetensors\"");
  EXPECT_NE(store_error(dir).find("does not exist"), std::string::npos) << store_error(dir);
  write_index(idx, s1 + ",\"e\":\"s2.safetensors\"");
  EXPECT_NE(store_error(dir).find("'e'"), std::string::npos) << store_error(dir);
  // A symlink inside the directory that points out of it.
  fs::create_symlink(root / "x.safetensors", dir + "/link.safetensors");
  write_index(idx, s1 + ",\"c\":\"link.safetensors\"");
  EXPECT_NE(store_error(dir).find("outside"), std::string::npos) << store_error(dir);
  // The same tensor in two shards.
  write_two_tensor_file(dir + "/s3.safetensors", "a", "z", 1.0f);
  write_index(idx, s1 + ",\"z\":\"s3.safetensors\"");
  EXPECT_NE(store_error(dir).find("in both"), std::string::npos) << store_error(dir);
  // Malformed indexes.
  write_file(idx, "{\"weight_map\":{\"a\":\"s1.safetensors\",\"a\":\"s2.safetensors\"}}");
  EXPECT_NE(store_error(dir).find("twice"), std::string::npos) << store_error(dir);
  write_file(idx, "{\"weight_map\":{\"a\":1}}");
  EXPECT_NE(store_error(dir).find("not a string"), std::string::npos) << store_error(dir);
  write_file(idx, "{\"metadata\":{}}");
  EXPECT_NE(store_error(dir).find("weight_map"), std::string::npos) << store_error(dir);
  write_file(idx, "not json");
  EXPECT_NE(store_error(dir).find("JSON"), std::string::npos) << store_error(dir);
  write_file(idx, "{\"weight_map\":{\"a\":\"\"}}");
  EXPECT_NE(store_error(dir).find("empty"), std::string::npos) << store_error(dir);
  write_file(idx, "{\"weight_map\":{\"a\":\".\"}}");
  EXPECT_FALSE(store_error(dir).empty());
}

// --- the real checkpoints -------------------------------------------------------------

TEST(Safetensors, LoadsStories260K) {
  auto store = spear::TensorStore::open(spear::test::tiny_model_dir());
  // 5 layers x 9 tensors + embeddings + final norm; the head is tied.
  EXPECT_EQ(store.names().size(), 47u);
  const auto& e = store.get("model.embed_tokens.weight");
  EXPECT_EQ(e.dtype, DType::F32);
  EXPECT_EQ(e.shape, (std::vector<int64_t>{512, 64}));
  EXPECT_FALSE(store.has("lm_head.weight"));
  EXPECT_EQ(store.files().front()->metadata().at("format"), "pt");
  std::vector<float> v = spear::to_f32(e);
  for (float x : v) ASSERT_TRUE(std::isfinite(x));
  // Reading with a single-file path gives the same tensors.
  auto single = spear::TensorStore::open(spear::test::tiny_model_dir() + "/model.safetensors");
  EXPECT_EQ(single.names(), store.names());
}

TEST(Safetensors, LoadsShardedMixlm) {
  const std::string dir = spear::test::mixlm_dir();
  if (dir.empty()) GTEST_SKIP() << "mixlm-19m not found (set SPEAR_SHARED_DIR or ../shared)";
  auto store = spear::TensorStore::open(dir);
  // 8 layers x 9 tensors + embeddings + final norm + untied head.
  EXPECT_EQ(store.names().size(), 75u);
  EXPECT_EQ(store.files().size(), 4u);
  const auto& e = store.get("model.embed_tokens.weight");
  EXPECT_EQ(e.dtype, DType::BF16);
  EXPECT_EQ(e.shape, (std::vector<int64_t>{8192, 384}));
  EXPECT_EQ(store.get("lm_head.weight").shape, (std::vector<int64_t>{8192, 384}));
  size_t params = 0;
  for (const auto& n : store.names()) {
    const auto& t = store.get(n);
    EXPECT_EQ(t.dtype, DType::BF16) << n;
    params += static_cast<size_t>(t.numel());
  }
  EXPECT_EQ(params, 18880896u);  // total_parameters in the index metadata
  auto t0 = std::chrono::steady_clock::now();
  std::vector<float> v = spear::to_f32(e);
  double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  uint16_t h;
  std::memcpy(&h, e.data + 2 * 12345, 2);
  EXPECT_EQ(v[12345], spear::bf16_to_f32(h));
  for (float x : v) ASSERT_TRUE(std::isfinite(x));
  RecordProperty("embed_to_f32_ms", std::to_string(ms));
}

namespace {
// This process's resident set (bytes), from /proc/self/statm.
long long resident_bytes() {
  std::ifstream f("/proc/self/statm");
  long long size = 0, resident = 0;
  f >> size >> resident;
  return resident * static_cast<long long>(::sysconf(_SC_PAGESIZE));
}
}  // namespace

// TensorStore::release (what quantize and the loaders call once a tensor's bytes are read)
// drops the mapped pages from the resident set, and the bytes read back unchanged after it;
// a range outside every shard is left alone.
TEST(Safetensors, ReleaseDropsMappedPagesAndKeepsTheBytes) {
  TempDir d;
  const std::string path = d / "big.safetensors";
  const int64_t n = int64_t{16} << 20;  // 16M floats: 64 MiB
  {
    std::vector<float> x(n);
    for (int64_t i = 0; i < n; ++i) x[i] = static_cast<float>(i % 1009) - 504.0f;
    spear::write_safetensors(path, {{"w", DType::F32, {n}, x.data()}}, {{"format", "pt"}});
  }
  const spear::TensorStore store = spear::TensorStore::open(path);
  const spear::TensorView& t = store.get("w");
  auto checksum = [&] {
    double s = 0;
    const float* p = reinterpret_cast<const float*>(t.data);
    for (int64_t i = 0; i < n; i += 97) s += p[i] * static_cast<double>(i % 7 + 1);
    volatile uint8_t touch = 0;
    for (size_t i = 0; i < t.nbytes; i += 4096) touch = touch + t.data[i];  // every page
    return s;
  };
  const long long r0 = resident_bytes();
  const double s0 = checksum();
  const long long r1 = resident_bytes();
  EXPECT_GT(r1 - r0, 48ll << 20) << "reading the tensor should fault its pages in";
  std::vector<float> outside(1024, 1.0f);
  store.release(outside.data(), outside.size() * sizeof(float));  // not in a shard: untouched
  EXPECT_EQ(outside[17], 1.0f);
  store.release(t.data, t.nbytes);
  const long long r2 = resident_bytes();
  EXPECT_GT(r1 - r2, 48ll << 20) << "release should drop the pages";
  EXPECT_EQ(checksum(), s0) << "the bytes after release";
}
