#pragma once
// safetensors files: memory-mapped reading with the reference loader's checks,
// sharded checkpoints through model.safetensors.index.json, and atomic writing.
//
// File layout: u64 little-endian N, then N bytes of JSON header
// {"name": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, ...,
//  "__metadata__": {"key": "value", ...}}, then the data buffer. Offsets are
// relative to the start of the buffer.
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "core/dtype.h"

namespace spear {

// "(384, 1024)": a shape as error messages print it.
std::string shape_str(const std::vector<int64_t>& shape);

// A tensor inside a mapped file. `data` stays valid while the file that produced
// it is alive.
struct TensorView {
  std::string name;
  DType dtype = DType::F32;
  std::vector<int64_t> shape;  // row-major; empty = scalar
  const uint8_t* data = nullptr;
  size_t nbytes = 0;

  int64_t numel() const;
  std::string shape_str() const;  // "(384, 1024)"
};

// Read-only memory map of a whole file (RAII). Throws spear::Error when the file
// cannot be opened or mapped.
class MappedFile {
 public:
  explicit MappedFile(const std::string& path);
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  const uint8_t* data() const { return data_; }
  size_t size() const { return size_; }
  const std::string& path() const { return path_; }
  // Drops the whole pages inside [p, p + n) from this process's memory (madvise
  // MADV_DONTNEED); reading them again faults them back in from the file. For bytes that
  // were copied out and will not be read again.
  void release(const void* p, size_t n) const;

 private:
  std::string path_;
  const uint8_t* data_ = nullptr;
  size_t size_ = 0;
};

// Limits, as in the reference (Rust) loader.
inline constexpr size_t kMaxSafetensorsHeader = 100u * 1000u * 1000u;

// One .safetensors file. Every check happens in open(): header length within the
// cap and the file, valid JSON object, known dtypes, non-negative shapes whose
// element count times dtype size equals the byte range (no overflow), offsets
// ordered, contiguous, starting at 0 and covering the buffer exactly, no
// duplicate names. Any failure throws spear::Error naming the file and the tensor.
class SafetensorsFile {
 public:
  static std::shared_ptr<SafetensorsFile> open(const std::string& path);
  // Parses an in-memory buffer (used by the fuzzer); `bytes` must outlive the result.
  static std::shared_ptr<SafetensorsFile> parse(const uint8_t* bytes, size_t size,
                                                const std::string& label);

  const std::vector<TensorView>& tensors() const { return tensors_; }
  const TensorView* find(const std::string& name) const;  // nullptr if absent
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  size_t file_size() const { return size_; }
  const std::string& path() const { return label_; }  // file path, or parse()'s label
  // Drops a tensor's pages from memory once its bytes were copied (MappedFile::release);
  // nothing for a parse()d buffer.
  void release(const TensorView& t) const;
  // The same for any bytes [p, p + n) of the mapping (those outside it are left alone).
  void release(const void* p, size_t n) const;

 private:
  std::unique_ptr<MappedFile> file_;
  std::string label_;
  size_t size_ = 0;
  std::vector<TensorView> tensors_;
  std::map<std::string, size_t> index_;
  std::map<std::string, std::string> metadata_;
};

// The weight_map of a model.safetensors.index.json: shard file name -> the tensors the
// index places in it (names in file order). Checks the JSON (an object with a non-empty
// "weight_map" object of strings, no duplicate keys) and each shard name lexically (not
// empty, relative, no ".."); TensorStore::open then resolves the shards on disk.
using SafetensorsIndex = std::map<std::string, std::vector<std::string>>;
SafetensorsIndex parse_safetensors_index(std::string_view text, const std::string& label);

// All tensors of a model: a single model.safetensors, or the shards listed in
// model.safetensors.index.json (every weight_map file must resolve inside the
// directory: no absolute paths, no "..", no symlink escape; every listed tensor
// must exist in its shard). A path to a single .safetensors file also works.
class TensorStore {
 public:
  static TensorStore open(const std::string& path);
  bool has(const std::string& name) const;
  const TensorView& get(const std::string& name) const;  // throws spear::Error if absent
  std::vector<std::string> names() const;                // sorted
  size_t mapped_bytes() const;                           // sum of file sizes
  const std::vector<std::shared_ptr<SafetensorsFile>>& files() const { return files_; }
  // Drops the whole pages of [p, p + n) that lie in one of the mapped shards
  // (MappedFile::release); bytes outside every shard are left alone.
  void release(const void* p, size_t n) const;

 private:
  std::string source_;  // the path given to open(), for error messages
  std::vector<std::shared_ptr<SafetensorsFile>> files_;
  std::map<std::string, const TensorView*> by_name_;
};

// Converts any F32/F16/BF16 tensor to float32; throws for other dtypes.
std::vector<float> to_f32(const TensorView& t);
void to_f32(const TensorView& t, float* out);  // out has numel() floats

// A tensor to write. `data` must hold numel*dtype_size bytes.
struct TensorToWrite {
  std::string name;
  DType dtype = DType::F32;
  std::vector<int64_t> shape;
  const void* data = nullptr;
};

// Writes a safetensors file atomically: to "<path>.tmp.<pid>.<n>", fsync, then rename
// over `path`. On any error the temporary is removed and `path` is untouched.
// Tensors are written in the given order; the header is padded with spaces to a
// multiple of 8 bytes.
void write_safetensors(const std::string& path, const std::vector<TensorToWrite>& tensors,
                       const std::map<std::string, std::string>& metadata);

// The name, dtype and shape of a tensor whose bytes come later (SafetensorsWriter).
struct TensorDecl {
  std::string name;
  DType dtype = DType::F32;
  std::vector<int64_t> shape;
};

// A safetensors file written as a stream, for tensors that are never all in memory at once:
// the header (every tensor declared up front) goes to "<path>.tmp.<pid>.<n>" at construction,
// then write() appends the data buffer in order (any split of the tensors' bytes), and
// commit() checks that exactly the declared bytes came, fsyncs and renames over `path`.
// Destroyed without a commit (an error, an exception on the way), the temporary is removed
// and `path` is untouched. Errors throw spear::Error naming the file.
class SafetensorsWriter {
 public:
  SafetensorsWriter(std::string path, const std::vector<TensorDecl>& tensors,
                    const std::map<std::string, std::string>& metadata);
  ~SafetensorsWriter();
  SafetensorsWriter(const SafetensorsWriter&) = delete;
  SafetensorsWriter& operator=(const SafetensorsWriter&) = delete;
  void write(const void* data, size_t n);
  void commit();
  uint64_t data_bytes() const { return total_; }     // the declared data buffer's size
  uint64_t file_bytes() const { return header_bytes_ + total_; }

 private:
  std::string path_, tmp_;
  int fd_ = -1;
  uint64_t header_bytes_ = 0, total_ = 0, written_ = 0;
  bool committed_ = false;
};

}  // namespace spear
