#include "engine/request.h"

namespace spear {

const char* finish_reason_name(FinishReason r) {
  switch (r) {
    case FinishReason::Stop: return "stop";
    case FinishReason::Length: return "length";
    case FinishReason::Cancelled: return "cancelled";
    case FinishReason::Error: return "error";
    case FinishReason::None: break;
  }
  return "none";
}

void RequestStream::push(TokenEvent ev) {
  {
    std::lock_guard<std::mutex> lk(notifier_->mu);
    events_.push_back(std::move(ev));
  }
  notifier_->cv.notify_all();
}

void RequestStream::finish(FinishReason r, std::string error) {
  {
    std::lock_guard<std::mutex> lk(notifier_->mu);
    if (finished_) return;
    finished_ = true;
    reason_ = r;
    error_ = std::move(error);
  }
  notifier_->cv.notify_all();
}

bool RequestStream::drain(std::vector<TokenEvent>& out) {
  while (!events_.empty()) {
    out.push_back(std::move(events_.front()));
    events_.pop_front();
  }
  return finished_;
}

bool RequestStream::wait_finished(std::chrono::milliseconds timeout) {
  std::unique_lock<std::mutex> lk(notifier_->mu);
  notifier_->cv.wait_for(lk, timeout, [&] { return finished_; });
  return finished_;
}

}  // namespace spear
