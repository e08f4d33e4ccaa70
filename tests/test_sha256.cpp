// SHA-256 (io/sha256.h): the FIPS 180-4 test vectors, and the SHA-NI path against the
// portable loop on every length around the block boundaries and in pieces of any size.
#include <gtest/gtest.h>

#include <random>
#include <string>
#include <vector>

#include "io/sha256.h"

using namespace spear;

namespace {

struct PortableOnly {
  PortableOnly() { sha256_force_portable(true); }
  ~PortableOnly() { sha256_force_portable(false); }
};

}  // namespace

TEST(Sha256, KnownVectors) {
  for (bool portable : {false, true}) {
    sha256_force_portable(portable);
    EXPECT_EQ(sha256_hex("", 0), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    EXPECT_EQ(sha256_hex("abc", 3), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    const std::string two = "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";
    EXPECT_EQ(sha256_hex(two.data(), two.size()),
              "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
    const std::string million(1000000, 'a');
    EXPECT_EQ(sha256_hex(million.data(), million.size()),
              "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
  }
  sha256_force_portable(false);
}

TEST(Sha256, FastPathMatchesPortable) {
  std::mt19937 g(5);
  std::vector<uint8_t> data(4096 + 257);
  for (auto& b : data) b = static_cast<uint8_t>(g());
  for (size_t n : {0u, 1u, 55u, 56u, 63u, 64u, 65u, 119u, 128u, 1000u, 4096u, 4353u}) {
    const std::string fast = sha256_hex(data.data(), n);
    std::string slow;
    {
      PortableOnly p;
      slow = sha256_hex(data.data(), n);
    }
    EXPECT_EQ(fast, slow) << n;
    // Fed in uneven pieces: the same digest.
    Sha256 h;
    for (size_t i = 0; i < n;) {
      const size_t k = std::min<size_t>(n - i, 1 + g() % 150);
      h.update(data.data() + i, k);
      i += k;
    }
    EXPECT_EQ(h.hex(), slow) << n;
  }
}
