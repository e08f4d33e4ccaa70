#include "tokenizer/bpe.h"

#include <algorithm>
#include <climits>
#include <cstdio>
#include <mutex>
#include <queue>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "tokenizer/utf8.h"

namespace spear::tok {
namespace {

using nlohmann::json;

// Keeps vocab_size() = max id + 1 representable as int32_t.
constexpr int64_t kMaxTokenId = INT32_MAX - 1;

std::string optional_string(const json& obj, const char* key) {
  auto it = obj.find(key);
  if (it == obj.end() || it->is_null()) return {};
  SPEAR_CHECK(it->is_string(), std::string("tokenizer.json: model.") + key + " must be a string or null");
  return it->get<std::string>();
}

bool optional_bool(const json& obj, const char* key, bool fallback) {
  auto it = obj.find(key);
  if (it == obj.end() || it->is_null()) return fallback;
  SPEAR_CHECK(it->is_boolean(), std::string("tokenizer.json: model.") + key + " must be a boolean");
  return it->get<bool>();
}

// One merges entry: ["a", "b"] (tokenizers >= 0.20) or "a b" (older files).
std::pair<std::string, std::string> parse_merge(const json& entry, size_t index) {
  const std::string where = "tokenizer.json: merges[" + std::to_string(index) + "]";
  if (entry.is_string()) {
    const std::string s = entry.get<std::string>();
    const size_t space = s.find(' ');
    SPEAR_CHECK(space != std::string::npos && space > 0 && space + 1 < s.size(),
                where + " = \"" + s + "\" is not of the form \"a b\"");
    return {s.substr(0, space), s.substr(space + 1)};
  }
  SPEAR_CHECK(entry.is_array() && entry.size() == 2 && entry[0].is_string() && entry[1].is_string(),
              where + " must be a pair of strings or an \"a b\" string");
  return {entry[0].get<std::string>(), entry[1].get<std::string>()};
}

}  // namespace

std::unique_ptr<BpeModel> BpeModel::from_json(const json& model) {
  SPEAR_CHECK(model.is_object(), "tokenizer.json: \"model\" must be an object");
  const auto type_it = model.find("type");
  SPEAR_CHECK(type_it != model.end() && type_it->is_string(), "tokenizer.json: model.type is missing");
  const std::string type = type_it->get<std::string>();
  SPEAR_CHECK(type == "BPE", "tokenizer.json: unsupported model type \"" + type + "\" (spear supports BPE)");

  auto bpe = std::unique_ptr<BpeModel>(new BpeModel());
  const auto vocab_it = model.find("vocab");
  SPEAR_CHECK(vocab_it != model.end() && vocab_it->is_object(), "tokenizer.json: model.vocab must be an object");
  bpe->vocab_.reserve(vocab_it->size());
  bpe->id_to_token_.reserve(vocab_it->size());
  for (const auto& [token, id] : vocab_it->items()) {
    SPEAR_CHECK(id.is_number_integer() && id.get<int64_t>() >= 0 && id.get<int64_t>() <= kMaxTokenId,
                "tokenizer.json: vocab entry \"" + token + "\" has an invalid id");
    SPEAR_CHECK(find_invalid_utf8(token) == kAllValid, "tokenizer.json: vocab has a token that is not UTF-8");
    const auto i = id.get<int32_t>();
    bpe->vocab_[token] = i;
    bpe->id_to_token_[i] = token;
    bpe->max_id_ = std::max(bpe->max_id_, i);
  }

  bpe->fuse_unk_ = optional_bool(model, "fuse_unk", false);
  bpe->byte_fallback_ = optional_bool(model, "byte_fallback", false);
  bpe->ignore_merges_ = optional_bool(model, "ignore_merges", false);
  bpe->continuing_subword_prefix_ = optional_string(model, "continuing_subword_prefix");
  bpe->end_of_word_suffix_ = optional_string(model, "end_of_word_suffix");
  const std::string unk = optional_string(model, "unk_token");
  if (!unk.empty()) {
    bpe->unk_id_ = bpe->token_to_id(unk);
    SPEAR_CHECK(bpe->unk_id_ >= 0, "tokenizer.json: unk_token \"" + unk + "\" is not in the vocab");
  }
  for (int b = 0; b < 256; ++b) {
    char name[8];
    std::snprintf(name, sizeof name, "<0x%02X>", b);
    bpe->byte_fallback_ids_[b] = bpe->token_to_id(name);
  }

  const auto merges_it = model.find("merges");
  if (merges_it != model.end() && !merges_it->is_null()) {
    SPEAR_CHECK(merges_it->is_array(), "tokenizer.json: model.merges must be an array");
    const size_t prefix_len = bpe->continuing_subword_prefix_.size();
    bpe->merges_.reserve(merges_it->size());
    for (size_t rank = 0; rank < merges_it->size(); ++rank) {
      const auto [a, b] = parse_merge((*merges_it)[rank], rank);
      const int32_t a_id = bpe->token_to_id(a), b_id = bpe->token_to_id(b);
      SPEAR_CHECK(a_id >= 0 && b_id >= 0,
                  "tokenizer.json: merges[" + std::to_string(rank) + "] uses a token missing from the vocab");
      // With a continuing-subword prefix the right part carries it; the merged token does not.
      const bool b_prefixed = prefix_len > 0 && b.compare(0, prefix_len, bpe->continuing_subword_prefix_) == 0;
      const std::string merged = a + (b_prefixed ? b.substr(prefix_len) : b);
      const int32_t new_id = bpe->token_to_id(merged);
      SPEAR_CHECK(new_id >= 0, "tokenizer.json: merges[" + std::to_string(rank) + "] makes \"" + merged +
                                   "\", which is not in the vocab");
      // A repeated pair keeps its last rank, as tokenizers' HashMap collect does.
      bpe->merges_.insert_or_assign(pair_key(a_id, b_id), Merge{int32_t(rank), new_id});
    }
  }
  return bpe;
}

int32_t BpeModel::token_to_id(std::string_view token) const {
  auto it = vocab_.find(token);
  return it == vocab_.end() ? -1 : it->second;
}

const std::string* BpeModel::id_to_token(int32_t id) const {
  auto it = id_to_token_.find(id);
  return it == id_to_token_.end() ? nullptr : &it->second;
}

const BpeModel::Merge* BpeModel::find_merge(int32_t a, int32_t b) const {
  auto it = merges_.find(pair_key(a, b));
  return it == merges_.end() ? nullptr : &it->second;
}

void BpeModel::tokenize(std::string_view word, std::vector<int32_t>& out) const {
  if (word.empty()) return;
  if (ignore_merges_) {
    if (const int32_t id = token_to_id(word); id >= 0) {
      out.push_back(id);
      return;
    }
  }
  if (word.size() > kCacheMaxWordBytes) {
    merge_word(word, out);
    return;
  }
  {
    std::shared_lock lock(cache_mutex_);
    if (auto it = cache_.find(word); it != cache_.end()) {
      out.insert(out.end(), it->second.begin(), it->second.end());
      return;
    }
  }
  const size_t first = out.size();
  merge_word(word, out);
  std::unique_lock lock(cache_mutex_);
  if (cache_.size() < kCacheMaxEntries) cache_.emplace(std::string(word), std::vector<int32_t>(out.begin() + first, out.end()));
}

void BpeModel::merge_word(std::string_view word, std::vector<int32_t>& out) const {
  // A doubly linked list over the initial symbols; merged-away symbols get len 0.
  struct Symbol {
    int32_t id;
    int32_t prev, next;
    uint32_t len;  // bytes of the word it covers
  };
  std::vector<Symbol> symbols;
  symbols.reserve(word.size());
  auto add = [&symbols](int32_t id, uint32_t len) {
    const auto index = int32_t(symbols.size());
    if (index > 0) symbols.back().next = index;
    symbols.push_back({id, index - 1, -1, len});
  };

  // Pending unknown run: fused into one unk token when fuse_unk is set.
  int32_t pending_unk_len = 0;
  std::string piece;
  for (size_t i = 0; i < word.size();) {
    const size_t char_len = utf8_char_len(word, i);
    const bool is_first = i == 0, is_last = i + char_len == word.size();
    const std::string_view ch = word.substr(i, char_len);
    i += char_len;
    std::string_view lookup = ch;
    if ((!is_first && !continuing_subword_prefix_.empty()) || (is_last && !end_of_word_suffix_.empty())) {
      piece.assign(!is_first ? continuing_subword_prefix_ : std::string());
      piece += ch;
      if (is_last) piece += end_of_word_suffix_;
      lookup = piece;
    }
    if (const int32_t id = token_to_id(lookup); id >= 0) {
      if (pending_unk_len > 0) add(unk_id_, uint32_t(pending_unk_len)), pending_unk_len = 0;
      add(id, uint32_t(char_len));
      continue;
    }
    if (byte_fallback_) {
      bool all_bytes_known = true;
      for (unsigned char b : lookup) all_bytes_known &= byte_fallback_ids_[b] >= 0;
      if (all_bytes_known) {
        // Like tokenizers, a pending unk is not flushed first: it lands after these bytes.
        for (unsigned char b : lookup) add(byte_fallback_ids_[b], 1);
        continue;
      }
    }
    if (unk_id_ >= 0) {
      if (pending_unk_len > 0 && !fuse_unk_) add(unk_id_, uint32_t(pending_unk_len)), pending_unk_len = 0;
      pending_unk_len += int32_t(char_len);
    }
    // Without an unk token an unknown character is dropped, as in tokenizers.
  }
  if (pending_unk_len > 0) add(unk_id_, uint32_t(pending_unk_len));

  struct Candidate {
    int32_t pos, rank, new_id;
    // priority_queue pops the "largest": make that the lowest rank, then leftmost.
    bool operator<(const Candidate& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
  };
  std::vector<Candidate> heap_storage;
  heap_storage.reserve(symbols.size());
  std::priority_queue<Candidate> queue(std::less<Candidate>(), std::move(heap_storage));
  for (size_t i = 0; i + 1 < symbols.size(); ++i) {
    if (const Merge* m = find_merge(symbols[i].id, symbols[i + 1].id)) queue.push({int32_t(i), m->rank, m->new_id});
  }
  while (!queue.empty()) {
    const Candidate top = queue.top();
    queue.pop();
    Symbol& left = symbols[size_t(top.pos)];
    if (left.len == 0 || left.next < 0) continue;
    const int32_t right_pos = left.next;
    const Symbol right = symbols[size_t(right_pos)];
    // Skip stale candidates: the pair at this position changed since it was queued.
    const Merge* current = find_merge(left.id, right.id);
    if (current == nullptr || current->new_id != top.new_id) continue;

    left.id = top.new_id;
    left.len += right.len;
    left.next = right.next;
    symbols[size_t(right_pos)].len = 0;
    if (right.next >= 0) symbols[size_t(right.next)].prev = top.pos;

    if (left.prev >= 0) {
      if (const Merge* m = find_merge(symbols[size_t(left.prev)].id, left.id)) {
        queue.push({left.prev, m->rank, m->new_id});
      }
    }
    if (left.next >= 0) {
      if (const Merge* m = find_merge(left.id, symbols[size_t(left.next)].id)) {
        queue.push({top.pos, m->rank, m->new_id});
      }
    }
  }
  for (const Symbol& s : symbols) {
    if (s.len != 0) out.push_back(s.id);
  }
}

}  // namespace spear::tok
