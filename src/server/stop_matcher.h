#pragma once
// Stop strings over streamed text. Text that could still be the beginning of a
// stop string is held back, so a client never sees part of a stop string; when one
// completes, everything before it is released and the match is reported.
#include <string>
#include <vector>

namespace spear::server {

class StopMatcher {
 public:
  explicit StopMatcher(std::vector<std::string> stops) : stops_(std::move(stops)) {}
  // Appends text; returns what may be shown now. After a match, returns the text
  // up to the stop string and stopped() is true; later calls return "".
  std::string push(const std::string& text);
  // The held-back text once the stream ends without a match.
  std::string flush();
  bool stopped() const { return stopped_; }

 private:
  std::vector<std::string> stops_;
  std::string held_;
  bool stopped_ = false;
};

}  // namespace spear::server
