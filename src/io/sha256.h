#pragma once
// SHA-256 (FIPS 180-4), hex. Used for the source model, calibration data and the tensor
// hash a .spear file records.
#include <array>
#include <cstddef>
#include <cstdint>
#include <string>

namespace spear {

std::string sha256_hex(const void* data, size_t n);

class Sha256 {
 public:
  Sha256();
  void update(const void* data, size_t n);
  std::string hex();  // finishes; the object must not be updated afterwards

 private:
  void block(const uint8_t* p);                 // one 64-byte block, portable
  void blocks(const uint8_t* p, size_t n);      // n blocks, SHA-NI where the CPU has it
  std::array<uint32_t, 8> h_;
  std::array<uint8_t, 64> buf_;
  size_t buf_len_ = 0;
  uint64_t total_ = 0;
};

// Tests: true makes every hash use the portable loop (to check the SHA-NI path against it).
void sha256_force_portable(bool on);

// Hash of a model directory: config.json, then every *.safetensors file by name.
std::string model_dir_hash(const std::string& dir);

}  // namespace spear
