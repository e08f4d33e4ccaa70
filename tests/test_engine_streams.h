#pragma once
// What the engine tests read from a finished request's stream.
#include <mutex>
#include <vector>

#include "engine/request.h"

namespace spear::test {

// The events a finished stream holds (taken under its lock).
inline std::vector<TokenEvent> drain_all(RequestStream& st) {
  std::vector<TokenEvent> evs;
  std::lock_guard<std::mutex> lk(st.notifier().mu);
  st.drain(evs);
  return evs;
}

inline std::vector<int32_t> ids_of(const std::vector<TokenEvent>& evs) {
  std::vector<int32_t> ids;
  for (const TokenEvent& e : evs) ids.push_back(e.id);
  return ids;
}

}  // namespace spear::test
