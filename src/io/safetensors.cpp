#include "io/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <string_view>
#include <unordered_set>

#include <nlohmann/json.hpp>

#if defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif

#include "core/error.h"

namespace fs = std::filesystem;

namespace spear {

namespace {

using ojson = nlohmann::ordered_json;

[[noreturn]] void fail(const std::string& label, const std::string& why) {
  throw Error("safetensors '" + label + "': " + why);
}
[[noreturn]] void fail_tensor(const std::string& label, const std::string& name,
                              const std::string& why) {
  throw Error("safetensors '" + label + "': tensor '" + name + "': " + why);
}

std::string errno_str() { return std::strerror(errno); }

// Strict UTF-8 (no overlong forms, no surrogates, nothing above U+10FFFF), as
// Rust's str::from_utf8 which the reference loader applies to the header.
bool valid_utf8(const uint8_t* s, size_t n) {
  size_t i = 0;
  while (i < n) {
    uint8_t c = s[i];
    if (c < 0x80) {
      ++i;
      continue;
    }
    size_t len;
    uint32_t cp;
    if ((c & 0xe0) == 0xc0) {
      len = 2;
      cp = c & 0x1f;
    } else if ((c & 0xf0) == 0xe0) {
      len = 3;
      cp = c & 0x0f;
    } else if ((c & 0xf8) == 0xf0) {
      len = 4;
      cp = c & 0x07;
    } else {
      return false;
    }
    if (n - i < len) return false;
    for (size_t k = 1; k < len; ++k) {
      if ((s[i + k] & 0xc0) != 0x80) return false;
      cp = (cp << 6) | (s[i + k] & 0x3f);
    }
    static constexpr uint32_t min_cp[5] = {0, 0, 0x80, 0x800, 0x10000};
    if (cp < min_cp[len] || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) return false;
    i += len;
  }
  return true;
}

// Parses JSON text and refuses duplicate keys in any object: nlohmann keeps the
// last duplicate silently, which would let a header hide a tensor entry (or an
// index list a tensor twice). ordered_json keeps the file's key order.
ojson parse_json_unique(std::string_view text, const std::string& label, const char* what) {
  std::vector<std::unordered_set<std::string>> open_objects;
  std::string duplicate;
  bool has_duplicate = false;
  auto cb = [&](int /*depth*/, ojson::parse_event_t ev, ojson& parsed) {
    switch (ev) {
      case ojson::parse_event_t::object_start:
        open_objects.emplace_back();
        break;
      case ojson::parse_event_t::key:
        if (!open_objects.back().insert(parsed.get_ref<const std::string&>()).second &&
            !has_duplicate) {
          has_duplicate = true;
          duplicate = parsed.get_ref<const std::string&>();
        }
        break;
      case ojson::parse_event_t::object_end:
        open_objects.pop_back();
        break;
      default:
        break;
    }
    return true;  // keep everything
  };
  ojson j;
  try {
    j = ojson::parse(text.begin(), text.end(), cb, /*allow_exceptions=*/true,
                     /*ignore_comments=*/false);
  } catch (const nlohmann::json::exception& e) {
    fail(label, std::string(what) + " is not valid JSON: " + e.what());
  }
  if (has_duplicate) fail(label, std::string(what) + " has the key '" + duplicate + "' twice");
  return j;
}

uint64_t read_u64_le(const uint8_t* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

// A JSON value that must be a non-negative integer (nlohmann stores every
// non-negative integer literal as unsigned; negatives and floats are refused).
bool as_u64(const ojson& v, uint64_t* out) {
  if (!v.is_number_unsigned()) return false;
  *out = v.get<uint64_t>();
  return true;
}

std::string describe_number(const ojson& v) {
  std::string s = v.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  return s.size() > 40 ? s.substr(0, 40) + "..." : s;
}

// --- float conversion kernels ----------------------------------------------------
// Sources may be unaligned (the header length is not required to be a multiple of
// 8), so every load is unaligned.

void bf16_block(const uint8_t* src, float* dst, size_t n) {
  size_t i = 0;
#if defined(__AVX2__)
  for (; i + 16 <= n; i += 16) {
    __m256i a = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 2 * i)));
    __m256i b =
        _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 2 * i + 16)));
    _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(_mm256_slli_epi32(a, 16)));
    _mm256_storeu_ps(dst + i + 8, _mm256_castsi256_ps(_mm256_slli_epi32(b, 16)));
  }
#endif
  for (; i < n; ++i) {
    uint16_t h;
    std::memcpy(&h, src + 2 * i, 2);
    dst[i] = bf16_to_f32(h);
  }
}

void f16_block(const uint8_t* src, float* dst, size_t n) {
  size_t i = 0;
#if defined(__F16C__) && defined(__AVX__)
  for (; i + 8 <= n; i += 8) {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 2 * i));
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));
  }
#endif
  for (; i < n; ++i) {
    uint16_t h;
    std::memcpy(&h, src + 2 * i, 2);
    dst[i] = f16_to_f32(h);
  }
}

// Splits large conversions across threads; memory bandwidth of one core is the
// limit otherwise (a 19M-parameter bf16 model is ~38 MB in, ~76 MB out).
template <class Fn>
void convert_chunked(const uint8_t* src, float* dst, size_t n, size_t src_elem, Fn fn) {
  constexpr size_t kChunk = size_t{1} << 16;
  if (n < 4 * kChunk) {
    fn(src, dst, n);
    return;
  }
  const int64_t chunks = static_cast<int64_t>((n + kChunk - 1) / kChunk);
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < chunks; ++c) {
    size_t begin = static_cast<size_t>(c) * kChunk;
    size_t len = std::min(kChunk, n - begin);
    fn(src + begin * src_elem, dst + begin, len);
  }
}

bool path_is_within(const fs::path& root, const fs::path& p) {
  auto r = root.begin(), q = p.begin();
  for (; r != root.end(); ++r, ++q) {
    if (q == p.end() || *r != *q) return false;
  }
  return q != p.end();  // strictly inside: the directory itself is not a file in it
}

std::string read_small_file(const std::string& path, size_t cap) {
  std::error_code ec;
  auto size = fs::file_size(path, ec);
  if (ec) throw Error("cannot read '" + path + "': " + ec.message());
  if (size > cap)
    throw Error("'" + path + "' is " + std::to_string(size) + " bytes, more than the " +
                std::to_string(cap) + " allowed");
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error("cannot open '" + path + "': " + errno_str());
  std::string s(static_cast<size_t>(size), '\0');
  in.read(s.data(), static_cast<std::streamsize>(s.size()));
  if (static_cast<size_t>(in.gcount()) != s.size()) throw Error("cannot read '" + path + "'");
  return s;
}

}  // namespace

// --- TensorView ---------------------------------------------------------------------

int64_t TensorView::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::string shape_str(const std::vector<int64_t>& shape) {
  std::string s = "(";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(shape[i]);
  }
  return s + ")";
}

std::string TensorView::shape_str() const {
  return ::spear::shape_str(shape);
}

// --- MappedFile ---------------------------------------------------------------------

MappedFile::MappedFile(const std::string& path) : path_(path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw Error("cannot open '" + path + "': " + errno_str());
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    std::string why = errno_str();
    ::close(fd);
    throw Error("cannot stat '" + path + "': " + why);
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    throw Error("'" + path + "' is not a regular file");
  }
  size_ = static_cast<size_t>(st.st_size);
  // mmap of length 0 is an error; an empty file maps to (nullptr, 0) and the
  // safetensors parser then reports it as too short.
  if (size_ > 0) {
    void* p = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) {
      std::string why = errno_str();
      ::close(fd);
      throw Error("cannot map '" + path + "': " + why);
    }
    data_ = static_cast<const uint8_t*>(p);
  }
  ::close(fd);  // the mapping keeps the file alive
}

void MappedFile::release(const void* p, size_t n) const {
  if (!data_ || n == 0) return;
  const uintptr_t page = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));
  const uintptr_t lo = (reinterpret_cast<uintptr_t>(p) + page - 1) / page * page;  // whole pages inside
  const uintptr_t hi = (reinterpret_cast<uintptr_t>(p) + n) / page * page;
  const uintptr_t base = reinterpret_cast<uintptr_t>(data_);
  if (hi > lo && lo >= base && hi <= base + size_) ::madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_DONTNEED);
}

void SafetensorsFile::release(const TensorView& t) const { release(t.data, t.nbytes); }

void SafetensorsFile::release(const void* p, size_t n) const {
  if (file_) file_->release(p, n);
}

MappedFile::~MappedFile() {
  if (data_) ::munmap(const_cast<uint8_t*>(data_), size_);
}

// --- SafetensorsFile ----------------------------------------------------------------

std::shared_ptr<SafetensorsFile> SafetensorsFile::open(const std::string& path) {
  auto mf = std::make_unique<MappedFile>(path);
  auto f = parse(mf->data(), mf->size(), path);
  f->file_ = std::move(mf);
  return f;
}

std::shared_ptr<SafetensorsFile> SafetensorsFile::parse(const uint8_t* bytes, size_t size,
                                                        const std::string& label) {
  if (size == 0) fail(label, "file is empty");
  if (size < 8)
    fail(label, "file is " + std::to_string(size) +
                    " bytes, shorter than the 8-byte header length field");
  const uint64_t n = read_u64_le(bytes);
  if (n > kMaxSafetensorsHeader)
    fail(label, "header length " + std::to_string(n) + " exceeds the limit of " +
                    std::to_string(kMaxSafetensorsHeader) + " bytes");
  if (n > size - 8)
    fail(label, "header length " + std::to_string(n) + " runs past the end of the " +
                    std::to_string(size) + "-byte file");
  const uint8_t* hdr = bytes + 8;
  if (n == 0 || hdr[0] != '{') fail(label, "header does not start with '{'");
  if (!valid_utf8(hdr, n)) fail(label, "header is not valid UTF-8");
  ojson j = parse_json_unique(std::string_view(reinterpret_cast<const char*>(hdr), n), label,
                              "header");
  if (!j.is_object()) fail(label, "header is not a JSON object");

  const uint8_t* buffer = hdr + n;
  const uint64_t buffer_size = size - 8 - n;

  auto out = std::shared_ptr<SafetensorsFile>(new SafetensorsFile());
  out->size_ = size;
  out->label_ = label;
  struct Range {
    uint64_t begin, end;
    size_t idx;
  };
  std::vector<Range> ranges;
  for (auto it = j.begin(); it != j.end(); ++it) {
    const std::string& name = it.key();
    const ojson& v = it.value();
    if (name == "__metadata__") {
      if (v.is_null()) continue;  // serde reads null as "no metadata"
      if (!v.is_object()) fail(label, "__metadata__ is not an object");
      for (auto m = v.begin(); m != v.end(); ++m) {
        if (!m.value().is_string())
          fail(label, "__metadata__ value of '" + m.key() + "' is not a string");
        out->metadata_[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    if (!v.is_object()) fail_tensor(label, name, "entry is not an object");
    auto dt = v.find("dtype");
    auto sh = v.find("shape");
    auto off = v.find("data_offsets");
    if (dt == v.end()) fail_tensor(label, name, "missing \"dtype\"");
    if (sh == v.end()) fail_tensor(label, name, "missing \"shape\"");
    if (off == v.end()) fail_tensor(label, name, "missing \"data_offsets\"");
    if (!dt->is_string()) fail_tensor(label, name, "\"dtype\" is not a string");
    TensorView t;
    t.name = name;
    if (!parse_dtype(dt->get_ref<const std::string&>(), &t.dtype))
      fail_tensor(label, name, "unknown dtype '" + dt->get<std::string>() + "'");
    if (!sh->is_array()) fail_tensor(label, name, "\"shape\" is not an array");
    uint64_t numel = 1;
    for (const auto& d : *sh) {
      uint64_t dim;
      if (!as_u64(d, &dim))
        fail_tensor(label, name, "shape entry " + describe_number(d) +
                                     " is not a non-negative integer");
      if (dim > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
        fail_tensor(label, name, "shape entry " + std::to_string(dim) + " is too large");
      if (__builtin_mul_overflow(numel, dim, &numel))
        fail_tensor(label, name, "element count overflows");
      t.shape.push_back(static_cast<int64_t>(dim));
    }
    // numel fits int64 so that TensorView::numel() cannot overflow.
    if (numel > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
      fail_tensor(label, name, "element count overflows");
    uint64_t nbytes;
    if (__builtin_mul_overflow(numel, static_cast<uint64_t>(dtype_size(t.dtype)), &nbytes))
      fail_tensor(label, name, "byte size overflows");
    if (!off->is_array() || off->size() != 2)
      fail_tensor(label, name, "\"data_offsets\" is not a [begin, end] pair");
    uint64_t begin, end;
    if (!as_u64((*off)[0], &begin) || !as_u64((*off)[1], &end))
      fail_tensor(label, name, "\"data_offsets\" are not non-negative integers");
    if (begin > end)
      fail_tensor(label, name, "data_offsets [" + std::to_string(begin) + ", " +
                                   std::to_string(end) + "] are reversed");
    if (end - begin != nbytes)
      fail_tensor(label, name, "shape " + t.shape_str() + " of " +
                                   std::string(dtype_name(t.dtype)) + " needs " +
                                   std::to_string(nbytes) + " bytes but data_offsets [" +
                                   std::to_string(begin) + ", " + std::to_string(end) +
                                   "] span " + std::to_string(end - begin));
    if (end > buffer_size)
      fail_tensor(label, name, "data_offsets end " + std::to_string(end) +
                                   " is past the " + std::to_string(buffer_size) +
                                   "-byte data buffer");
    t.nbytes = static_cast<size_t>(nbytes);
    t.data = buffer + begin;
    ranges.push_back({begin, end, out->tensors_.size()});
    out->tensors_.push_back(std::move(t));
  }

  // As the reference loader: sorted by offsets, the tensors must tile the buffer
  // exactly — no gap, no overlap, no trailing bytes.
  std::stable_sort(ranges.begin(), ranges.end(), [](const Range& a, const Range& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  uint64_t expected = 0;
  const std::string* prev = nullptr;
  for (const Range& r : ranges) {
    const std::string& name = out->tensors_[r.idx].name;
    if (r.begin < expected)
      fail_tensor(label, name, "data_offsets begin " + std::to_string(r.begin) +
                                   " overlaps the previous tensor '" + *prev +
                                   "', which ends at " + std::to_string(expected));
    if (r.begin > expected)
      fail_tensor(label, name, "data_offsets begin " + std::to_string(r.begin) +
                                   " leaves a gap after offset " + std::to_string(expected));
    expected = r.end;
    prev = &name;
  }
  if (expected != buffer_size)
    fail(label, "tensors cover " + std::to_string(expected) + " bytes but the data buffer is " +
                    std::to_string(buffer_size) + " bytes (truncated file or trailing bytes)");

  // Keep the tensors in file order: that is the order they were written in.
  std::vector<TensorView> ordered;
  ordered.reserve(ranges.size());
  for (const Range& r : ranges) ordered.push_back(std::move(out->tensors_[r.idx]));
  out->tensors_ = std::move(ordered);
  for (size_t i = 0; i < out->tensors_.size(); ++i) out->index_[out->tensors_[i].name] = i;
  return out;
}

const TensorView* SafetensorsFile::find(const std::string& name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : &tensors_[it->second];
}

// --- TensorStore --------------------------------------------------------------------

SafetensorsIndex parse_safetensors_index(std::string_view text, const std::string& label) {
  ojson j = parse_json_unique(text, label, "index");
  auto bad = [&](const std::string& why) -> Error { return Error("index '" + label + "': " + why); };
  if (!j.is_object()) throw bad("not a JSON object");
  auto wm = j.find("weight_map");
  if (wm == j.end() || !wm->is_object()) throw bad("missing \"weight_map\" object");
  if (wm->empty()) throw bad("\"weight_map\" is empty");
  SafetensorsIndex shards;
  for (auto it = wm->begin(); it != wm->end(); ++it) {
    if (!it.value().is_string())
      throw bad("weight_map entry of '" + it.key() + "' is not a string");
    shards[it.value().get<std::string>()].push_back(it.key());
  }
  for (const auto& [shard, names] : shards) {
    const fs::path rel(shard);
    const std::string where = "shard '" + shard + "' (for '" + names.front() + "')";
    if (shard.empty()) throw bad("empty shard file name for '" + names.front() + "'");
    if (rel.is_absolute() || rel.has_root_name() || rel.has_root_directory())
      throw bad(where + " is an absolute path; shards must be relative to the directory");
    for (const auto& part : rel)
      if (part == "..") throw bad(where + " contains '..'; shards must stay in the directory");
  }
  return shards;
}

namespace {

void store_from_index(const fs::path& index_path, std::vector<std::shared_ptr<SafetensorsFile>>* files) {
  const std::string label = index_path.string();
  const fs::path dir = index_path.parent_path().empty() ? fs::path(".") : index_path.parent_path();
  const std::string text = read_small_file(label, kMaxSafetensorsHeader);
  const SafetensorsIndex shards = parse_safetensors_index(text, label);
  auto bad = [&](const std::string& why) -> Error { return Error("index '" + label + "': " + why); };

  std::error_code ec;
  const fs::path root = fs::weakly_canonical(dir, ec);
  if (ec) throw bad("cannot resolve directory '" + dir.string() + "': " + ec.message());

  for (const auto& [shard, names] : shards) {
    const fs::path rel(shard);
    const std::string shard_desc = "shard '" + shard + "'";
    const std::string where = shard_desc + " (for '" + names.front() + "')";
    const fs::path full = fs::weakly_canonical(dir / rel, ec);
    if (ec) throw bad("cannot resolve " + where + ": " + ec.message());
    // Symlinks are resolved above, so this also refuses a link that points out.
    if (!path_is_within(root, full)) throw bad(where + " resolves outside '" + root.string() + "'");
    if (!fs::exists(full, ec)) throw bad(where + " does not exist");
    if (!fs::is_regular_file(full, ec)) throw bad(where + " is not a regular file");
    auto f = SafetensorsFile::open((dir / rel).string());
    for (const auto& name : names)
      if (!f->find(name))
        throw bad("tensor '" + name + "' is listed in " + shard_desc +
                  " but that file does not contain it");
    files->push_back(std::move(f));
  }
}

}  // namespace

TensorStore TensorStore::open(const std::string& path) {
  TensorStore s;
  s.source_ = path;
  std::error_code ec;
  const fs::path p(path);
  auto st = fs::status(p, ec);
  if (ec || !fs::exists(st)) throw Error("model path '" + path + "' does not exist");
  auto ends_with = [](const std::string& a, std::string_view b) {
    return a.size() >= b.size() && a.compare(a.size() - b.size(), b.size(), b) == 0;
  };
  if (fs::is_directory(st)) {
    // A single file wins over an index, as in transformers.
    if (fs::exists(p / "model.safetensors", ec)) {
      s.files_.push_back(SafetensorsFile::open((p / "model.safetensors").string()));
    } else if (fs::exists(p / "model.safetensors.index.json", ec)) {
      store_from_index(p / "model.safetensors.index.json", &s.files_);
    } else {
      throw Error("'" + path + "' has neither model.safetensors nor model.safetensors.index.json");
    }
  } else if (ends_with(path, ".index.json")) {
    store_from_index(p, &s.files_);
  } else {
    s.files_.push_back(SafetensorsFile::open(path));
  }
  for (const auto& f : s.files_) {
    for (const auto& t : f->tensors()) {
      auto [it, inserted] = s.by_name_.emplace(t.name, &t);
      if (!inserted) {
        // Only possible across shards: one file never holds a name twice.
        const std::string* other = nullptr;
        for (const auto& g : s.files_)
          if (g->find(t.name) == it->second) other = &g->path();
        throw Error("model '" + path + "': tensor '" + t.name + "' is in both '" +
                    (other ? *other : std::string("?")) + "' and '" + f->path() + "'");
      }
    }
  }
  return s;
}

bool TensorStore::has(const std::string& name) const { return by_name_.count(name) != 0; }

const TensorView& TensorStore::get(const std::string& name) const {
  auto it = by_name_.find(name);
  if (it == by_name_.end()) throw Error("model '" + source_ + "' has no tensor '" + name + "'");
  return *it->second;
}

std::vector<std::string> TensorStore::names() const {
  std::vector<std::string> out;
  out.reserve(by_name_.size());
  for (const auto& kv : by_name_) out.push_back(kv.first);
  return out;
}

void TensorStore::release(const void* p, size_t n) const {
  for (const auto& f : files_) f->release(p, n);  // each shard keeps to its own range
}

size_t TensorStore::mapped_bytes() const {
  size_t n = 0;
  for (const auto& f : files_) n += f->file_size();
  return n;
}

// --- conversion ---------------------------------------------------------------------

void to_f32(const TensorView& t, float* out) {
  const size_t n = static_cast<size_t>(t.numel());
  if (t.nbytes != n * dtype_size(t.dtype))
    throw Error("tensor '" + t.name + "': " + std::to_string(t.nbytes) +
                " bytes do not match shape " + t.shape_str());
  if (n == 0) return;
  switch (t.dtype) {
    case DType::F32:
      std::memcpy(out, t.data, n * 4);
      return;
    case DType::BF16:
      convert_chunked(t.data, out, n, 2, bf16_block);
      return;
    case DType::F16:
      convert_chunked(t.data, out, n, 2, f16_block);
      return;
    default:
      throw Error("tensor '" + t.name + "': cannot convert dtype " +
                  std::string(dtype_name(t.dtype)) + " to float32");
  }
}

std::vector<float> to_f32(const TensorView& t) {
  if (t.dtype != DType::F32 && t.dtype != DType::F16 && t.dtype != DType::BF16)
    throw Error("tensor '" + t.name + "': cannot convert dtype " +
                std::string(dtype_name(t.dtype)) + " to float32");
  std::vector<float> v(static_cast<size_t>(t.numel()));
  to_f32(t, v.data());
  return v;
}

// --- writing ------------------------------------------------------------------------

namespace {

void write_all(int fd, const void* data, size_t n, const std::string& tmp) {
  const auto* p = static_cast<const uint8_t*>(data);
  while (n > 0) {
    // Linux writes at most ~2 GiB per call; loop on partial writes and EINTR.
    ssize_t w = ::write(fd, p, std::min<size_t>(n, size_t{1} << 30));
    if (w < 0) {
      if (errno == EINTR) continue;
      throw Error("cannot write '" + tmp + "': " + errno_str());
    }
    p += w;
    n -= static_cast<size_t>(w);
  }
}

}  // namespace

namespace {

// The header text of a file of these tensors (padded to a multiple of 8 bytes) and each
// tensor's byte size. Throws for names given twice, the reserved name, overflowing sizes.
std::string build_header(const std::string& path, const std::vector<TensorDecl>& tensors,
                         const std::map<std::string, std::string>& metadata,
                         std::vector<uint64_t>* sizes) {
  auto bad = [&](const std::string& why) -> Error {
    return Error("cannot write safetensors '" + path + "': " + why);
  };
  ojson header = ojson::object();
  if (!metadata.empty()) {
    ojson m = ojson::object();
    for (const auto& [k, v] : metadata) m[k] = v;
    header["__metadata__"] = std::move(m);
  }
  sizes->clear();
  sizes->reserve(tensors.size());
  std::unordered_set<std::string> seen;
  uint64_t offset = 0;
  for (const auto& t : tensors) {
    if (t.name == "__metadata__") throw bad("'__metadata__' is reserved, not a tensor name");
    if (!seen.insert(t.name).second) throw bad("tensor '" + t.name + "' given twice");
    uint64_t numel = 1;
    for (int64_t d : t.shape) {
      if (d < 0) throw bad("tensor '" + t.name + "' has a negative dimension");
      if (__builtin_mul_overflow(numel, static_cast<uint64_t>(d), &numel))
        throw bad("tensor '" + t.name + "': element count overflows");
    }
    uint64_t nbytes, end;
    if (__builtin_mul_overflow(numel, static_cast<uint64_t>(dtype_size(t.dtype)), &nbytes) ||
        __builtin_add_overflow(offset, nbytes, &end))
      throw bad("tensor '" + t.name + "': byte size overflows");
    header[t.name] = {{"dtype", std::string(dtype_name(t.dtype))},
                      {"shape", t.shape},
                      {"data_offsets", {offset, end}}};
    sizes->push_back(nbytes);
    offset = end;
  }
  std::string text;
  try {
    text = header.dump();
  } catch (const nlohmann::json::exception& e) {  // e.g. a name that is not UTF-8
    throw bad(std::string("cannot encode header: ") + e.what());
  }
  // Padding keeps the data buffer 8-byte aligned in the file (and in a mapping).
  text.append((8 - text.size() % 8) % 8, ' ');
  if (text.size() > kMaxSafetensorsHeader) throw bad("header is larger than the format allows");
  return text;
}

}  // namespace

SafetensorsWriter::SafetensorsWriter(std::string path, const std::vector<TensorDecl>& tensors,
                                     const std::map<std::string, std::string>& metadata)
    : path_(std::move(path)) {
  std::vector<uint64_t> sizes;
  const std::string text = build_header(path_, tensors, metadata, &sizes);
  for (uint64_t n : sizes) total_ += n;
  header_bytes_ = 8 + text.size();
  static std::atomic<uint64_t> counter{0};
  tmp_ = path_ + ".tmp." + std::to_string(::getpid()) + "." + std::to_string(counter.fetch_add(1));
  fd_ = ::open(tmp_.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  if (fd_ < 0)
    throw Error("cannot write safetensors '" + path_ + "': cannot create '" + tmp_ + "': " + errno_str());
  try {
    uint8_t len[8];
    const uint64_t n = text.size();
    for (int i = 0; i < 8; ++i) len[i] = static_cast<uint8_t>(n >> (8 * i));
    write_all(fd_, len, 8, tmp_);
    write_all(fd_, text.data(), text.size(), tmp_);
  } catch (...) {
    ::close(fd_);
    ::unlink(tmp_.c_str());
    throw;
  }
}

SafetensorsWriter::~SafetensorsWriter() {
  if (committed_) return;
  if (fd_ >= 0) ::close(fd_);
  ::unlink(tmp_.c_str());
}

void SafetensorsWriter::write(const void* data, size_t n) {
  SPEAR_CHECK(!committed_ && fd_ >= 0, "safetensors '" + path_ + "': write after commit");
  if (n > total_ - written_)
    throw Error("cannot write safetensors '" + path_ + "': more data than the header declares");
  if (n) write_all(fd_, data, n, tmp_);
  written_ += n;
}

void SafetensorsWriter::commit() {
  auto bad = [&](const std::string& why) -> Error {
    return Error("cannot write safetensors '" + path_ + "': " + why);
  };
  SPEAR_CHECK(!committed_ && fd_ >= 0, "safetensors '" + path_ + "': committed twice");
  if (written_ != total_)
    throw bad("the data buffer has " + std::to_string(written_) + " of the " + std::to_string(total_) +
              " bytes the header declares");
  if (::fsync(fd_) != 0) throw bad("fsync of '" + tmp_ + "' failed: " + errno_str());
  const int rc = ::close(fd_);
  fd_ = -1;
  if (rc != 0) throw bad("close of '" + tmp_ + "' failed: " + errno_str());
  if (::rename(tmp_.c_str(), path_.c_str()) != 0)
    throw bad("cannot rename '" + tmp_ + "' into place: " + errno_str());
  committed_ = true;
  // Persist the rename itself; failure here leaves a complete file either way.
  fs::path dir = fs::path(path_).parent_path();
  int dfd = ::open(dir.empty() ? "." : dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    ::fsync(dfd);
    ::close(dfd);
  }
}

void write_safetensors(const std::string& path, const std::vector<TensorToWrite>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  std::vector<TensorDecl> decls;
  decls.reserve(tensors.size());
  for (const auto& t : tensors) decls.push_back({t.name, t.dtype, t.shape});
  // Checked before anything is created: every tensor with bytes has data.
  std::vector<uint64_t> sizes;
  build_header(path, decls, metadata, &sizes);
  for (size_t i = 0; i < tensors.size(); ++i)
    if (sizes[i] > 0 && tensors[i].data == nullptr)
      throw Error("cannot write safetensors '" + path + "': tensor '" + tensors[i].name + "' has no data");
  SafetensorsWriter w(path, decls, metadata);
  for (size_t i = 0; i < tensors.size(); ++i) w.write(tensors[i].data, static_cast<size_t>(sizes[i]));
  w.commit();
}

}  // namespace spear
