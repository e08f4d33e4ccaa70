#pragma once
// The fuzz entry points, shared by the libFuzzer targets (fuzz/fuzz_*.cpp) and the
// corpus replay that runs in every ctest (tests/test_fuzz_smoke.cpp).
//
// Each feeds arbitrary bytes to one parser. spear::Error is how spear refuses bad
// input, so it is swallowed; anything else escaping (another exception type, a
// crash, a sanitizer report) is a finding. Broken invariants on accepted input
// throw std::logic_error for the same reason.
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "io/model_config.h"
#include "io/safetensors.h"
#include "tokenizer/tokenizer.h"

namespace spear::fuzz {

inline void check(bool ok, const char* what) {
  if (!ok) throw std::logic_error(std::string("fuzz invariant broken: ") + what);
}

inline void safetensors_one(const uint8_t* data, size_t size) {
  try {
    auto f = SafetensorsFile::parse(data, size, "fuzz-input");
    // Read every byte the parser vouched for, so ASan checks that each range lies
    // inside the input; and convert small float tensors.
    uint64_t sum = 0, covered = 0;
    for (const TensorView& t : f->tensors()) {
      check(f->find(t.name) == &t, "find() returns the listed tensor");
      check(t.data >= data && t.nbytes <= size && t.data - data <= static_cast<ptrdiff_t>(size - t.nbytes),
            "tensor data inside the input");
      check(t.numel() >= 0 && static_cast<uint64_t>(t.numel()) * dtype_size(t.dtype) == t.nbytes,
            "numel * dtype size == nbytes");
      for (size_t i = 0; i < t.nbytes; ++i) sum += t.data[i];
      covered += t.nbytes;
      if ((t.dtype == DType::F32 || t.dtype == DType::F16 || t.dtype == DType::BF16) &&
          t.numel() <= (int64_t{1} << 16)) {
        std::vector<float> v = to_f32(t);
        check(v.size() == static_cast<size_t>(t.numel()), "to_f32 size");
      }
    }
    check(covered <= size, "tensors fit in the input");
    volatile uint64_t sink = sum;
    (void)sink;
  } catch (const Error&) {
  }
}

inline void config_one(const uint8_t* data, size_t size) {
  try {
    ModelConfig c =
        ModelConfig::from_json_text(std::string_view(reinterpret_cast<const char*>(data), size));
    (void)c.num_parameters();
    (void)c.q_dim();
    (void)c.kv_dim();
    // An accepted config must survive its own serialization: a refusal here is a bug
    // too, so it is not swallowed.
    nlohmann::json j = c.to_json();
    ModelConfig d;
    try {
      d = ModelConfig::from_json(j);
    } catch (const Error& e) {
      throw std::logic_error(std::string("config from to_json() refused: ") + e.what());
    }
    check(d.vocab_size == c.vocab_size && d.hidden_size == c.hidden_size &&
              d.num_layers == c.num_layers && d.num_heads == c.num_heads &&
              d.num_kv_heads == c.num_kv_heads && d.head_dim == c.head_dim &&
              d.rope.type == c.rope.type,
          "config to_json/from_json round trip");
  } catch (const Error&) {
  }
}

inline void tokenizer_one(const uint8_t* data, size_t size) {
  try {
    Tokenizer tok =
        Tokenizer::from_json(std::string_view(reinterpret_cast<const char*>(data), size));
    // Covers ASCII, digits, a contraction, multi-byte UTF-8, newlines and a special token.
    static constexpr std::string_view kText =
        "Hello world! It's 2024\n  caf\xc3\xa9 \xe2\x80\x94 \xf0\x9f\x99\x82<|begin_of_text|><s> x";
    for (bool special : {true, false}) {
      std::vector<int32_t> ids = tok.encode(kText, special);
      for (int32_t id : ids) (void)tok.is_special(id);
      (void)tok.decode(ids, true);
      (void)tok.decode(ids, false);
    }
    (void)tok.vocab_size();
    (void)tok.bos_id();
  } catch (const Error&) {
  }
}

}  // namespace spear::fuzz
