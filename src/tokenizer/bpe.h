#pragma once
// The BPE model of HF tokenizers: a word (one pre-token) is split into
// characters looked up in the vocab (unknown ones via byte fallback or the unk
// token), then adjacent pairs are merged lowest merge rank first, ties going
// to the leftmost pair, exactly as tokenizers' Word::merge_all does.
#include <cstdint>
#include <memory>
#include <shared_mutex>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include <nlohmann/json_fwd.hpp>

namespace spear::tok {

// Lets unordered_map<std::string, V> be searched with a string_view without
// building a std::string.
struct StringHash {
  using is_transparent = void;
  size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
};
using StringToId = std::unordered_map<std::string, int32_t, StringHash, std::equal_to<>>;

class BpeModel {
 public:
  // `model` is the "model" object of tokenizer.json. Throws spear::Error when it is
  // not a BPE model or its vocab/merges are inconsistent.
  static std::unique_ptr<BpeModel> from_json(const nlohmann::json& model);

  // Appends the ids of one pre-token. Thread-safe.
  void tokenize(std::string_view word, std::vector<int32_t>& out) const;

  int32_t token_to_id(std::string_view token) const;  // -1 if absent
  const std::string* id_to_token(int32_t id) const;   // nullptr if absent
  int32_t max_id() const { return max_id_; }

 private:
  struct Merge {
    int32_t rank;
    int32_t new_id;
  };
  static uint64_t pair_key(int32_t a, int32_t b) { return (uint64_t(uint32_t(a)) << 32) | uint32_t(b); }
  const Merge* find_merge(int32_t a, int32_t b) const;
  void merge_word(std::string_view word, std::vector<int32_t>& out) const;

  StringToId vocab_;
  // A map, not a vector: ids need not be contiguous, and a corrupt file with one
  // huge id must not make us allocate for every id below it.
  std::unordered_map<int32_t, std::string> id_to_token_;
  int32_t max_id_ = -1;
  std::unordered_map<uint64_t, Merge> merges_;
  int32_t unk_id_ = -1;
  bool fuse_unk_ = false;
  bool byte_fallback_ = false;
  bool ignore_merges_ = false;
  std::string continuing_subword_prefix_;
  std::string end_of_word_suffix_;
  int32_t byte_fallback_ids_[256];  // id of "<0xXX>", -1 if missing

  // Pre-tokens repeat heavily in real text; caching their ids makes whole-file
  // encoding several times faster. Long words are not cached (rarely repeat).
  static constexpr size_t kCacheMaxWordBytes = 256;
  static constexpr size_t kCacheMaxEntries = 1 << 18;
  mutable std::shared_mutex cache_mutex_;
  mutable std::unordered_map<std::string, std::vector<int32_t>, StringHash, std::equal_to<>> cache_;
};

}  // namespace spear::tok
