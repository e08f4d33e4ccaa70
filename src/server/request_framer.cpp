#include "server/request_framer.h"

#include <zlib.h>

#include <algorithm>
#include <cctype>
#include <exception>
#include <string_view>

namespace spear::server {

namespace {

std::string lower(std::string s) {
  for (char& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

std::string trim(const std::string& s) {
  size_t b = s.find_first_not_of(" \t"), e = s.find_last_not_of(" \t");
  return b == std::string::npos ? "" : s.substr(b, e - b + 1);
}

// RFC 9110 5.6.2: a field name (and a method) is a token of tchar.
bool is_token(const std::string& s) {
  if (s.empty()) return false;
  for (unsigned char c : s)
    if (!(std::isalnum(c) || std::string_view("!#$%&'*+-.^_`|~").find(static_cast<char>(c)) != std::string_view::npos))
      return false;
  return true;
}

// A control character other than HTAB (NUL, a bare CR, DEL, ...): RFC 9110 5.5 has a
// recipient reject a field value holding CR, LF or NUL; the others are invalid too.
bool has_ctl(const std::string& s) {
  for (unsigned char c : s)
    if ((c < 0x20 && c != '\t') || c == 0x7f) return true;
  return false;
}

// Joins repeated headers as one comma-separated list (RFC 9110 5.3).
void append_list(std::string& acc, const std::string& value) {
  acc += (acc.empty() ? "" : ",") + value;
}

// Reserves room for a body of unknown size up to the limit (a chunked body, an
// inflated one). Only address space: pages count once written. Should the allocator
// refuse (a strict overcommit policy, a large --max-body-mb), the string grows by
// appends as it would without the reservation.
void reserve_bound(std::string& s, size_t n) {
  try {
    s.reserve(n);
  } catch (const std::exception&) {  // bad_alloc, length_error
  }
}

}  // namespace

void RequestFramer::reset() {
  FramingLimits lim = lim_;
  *this = RequestFramer(lim);
}

bool RequestFramer::take_continue() {
  if (!expect_continue_ || continue_taken_ || phase_ == Phase::Done || phase_ == Phase::Failed ||
      !head_done())
    return false;
  continue_taken_ = true;
  return true;
}

RequestFramer::State RequestFramer::fail(int status, std::string code, std::string message) {
  phase_ = Phase::Failed;
  status_ = status;
  code_ = std::move(code);
  message_ = std::move(message);
  return State::Error;
}

bool RequestFramer::take_line(std::string& in, std::string& line, size_t max, int status,
                              const char* what) {
  size_t nl = in.find('\n');
  size_t have = line_.size() + (nl == std::string::npos ? in.size() : nl);
  if (have > max) {
    fail(status, status == 414 ? "uri_too_long" : "headers_too_large",
         std::string(what) + " is longer than " + std::to_string(max) + " bytes");
    return false;
  }
  if (nl == std::string::npos) {
    line_ += in;
    in.clear();
    return false;
  }
  line = line_ + in.substr(0, nl);
  in.erase(0, nl + 1);
  line_.clear();
  if (!line.empty() && line.back() == '\r') line.pop_back();
  return true;
}

RequestFramer::State RequestFramer::feed(std::string& in) {
  std::string line;
  while (true) {
    switch (phase_) {
      case Phase::Done: return State::Complete;
      case Phase::Failed: return State::Error;
      case Phase::Start:
      case Phase::Head: {
        const bool first = phase_ == Phase::Start;
        const size_t max = std::min(lim_.max_line_bytes, lim_.max_head_bytes - std::min(head_bytes_, lim_.max_head_bytes));
        if (!take_line(in, line, max, first ? 414 : 431, first ? "the request line" : "a header line")) {
          if (phase_ == Phase::Failed) return State::Error;
          return State::NeedMore;
        }
        head_bytes_ += line.size() + 2;
        if (head_bytes_ > lim_.max_head_bytes)
          return fail(431, "headers_too_large", "the request head is larger than " + std::to_string(lim_.max_head_bytes) + " bytes");
        if (first) {
          if (line.empty()) continue;  // stray CRLFs between requests (RFC 9112 2.2)
          size_t a = line.find(' '), b = line.rfind(' ');
          if (a == std::string::npos || a == 0 || b == a || b + 1 >= line.size() || has_ctl(line) ||
              line.find('\t') != std::string::npos || !is_token(line.substr(0, a)))
            return fail(400, "bad_request", "malformed request line");
          const std::string version = line.substr(b + 1);
          if (version != "HTTP/1.1" && version != "HTTP/1.0")
            return fail(505, "http_version_not_supported", "only HTTP/1.0 and HTTP/1.1 are served");
          request_line_ = line;
          phase_ = Phase::Head;
          continue;
        }
        State s = on_head_line(line);
        if (s != State::NeedMore) return s;
        continue;  // more head lines, or the body
      }
      case Phase::Body: {
        size_t take = static_cast<size_t>(std::min<uint64_t>(length_ - body_.size(), in.size()));
        body_.append(in, 0, take);
        in.erase(0, take);
        if (body_.size() == length_) return finish();
        return State::NeedMore;
      }
      case Phase::ChunkSize: {
        if (!take_line(in, line, 1024, 400, "a chunk-size line")) {
          if (phase_ == Phase::Failed) return fail(400, "bad_request", "a chunk-size line is longer than 1024 bytes");
          return State::NeedMore;
        }
        std::string hex = trim(line.substr(0, line.find(';')));
        if (hex.empty() || hex.find_first_not_of("0123456789abcdefABCDEF") != std::string::npos)
          return fail(400, "bad_request", "malformed chunk size");
        if (hex.size() > 15 && hex.find_first_not_of('0') < hex.size() - 15)
          return fail(413, "payload_too_large", "a chunk is larger than the body limit");
        uint64_t size = std::stoull(hex, nullptr, 16);
        if (size == 0) {
          phase_ = Phase::Trailers;
          continue;
        }
        if (body_.size() + size > lim_.max_body_bytes)
          return fail(413, "payload_too_large",
                      "the request body is larger than " + std::to_string(lim_.max_body_bytes) + " bytes");
        // The whole bound at the first chunk rather than growth by appends. A string
        // that doubles its way up holds the old and the new buffer at each step (1.5x
        // the body near the limit; a body refused at the limit peaked at 2x), may lack
        // the room for the head at the end (one more copy), and frees each step: glibc
        // answers the free of a large mmapped block by raising its mmap threshold to
        // that size, after which blocks of up to that size come from malloc arenas,
        // where what is freed stays resident (docs/BENCHMARKS.md, issue 14).
        if (body_.capacity() < lim_.max_body_bytes)
          reserve_bound(body_, lim_.max_body_bytes + (inflate_ ? 0 : head_room_));
        length_ = body_.size() + size;  // where this chunk ends
        phase_ = Phase::ChunkData;
        continue;
      }
      case Phase::ChunkData: {
        size_t take = static_cast<size_t>(std::min<uint64_t>(length_ - body_.size(), in.size()));
        body_.append(in, 0, take);
        in.erase(0, take);
        if (body_.size() < length_) return State::NeedMore;
        phase_ = Phase::ChunkEnd;
        continue;
      }
      case Phase::ChunkEnd: {
        if (!take_line(in, line, 2, 400, "a chunk's end")) {
          if (phase_ == Phase::Failed) return fail(400, "bad_request", "a chunk is longer than its size");
          return State::NeedMore;
        }
        if (!line.empty()) return fail(400, "bad_request", "a chunk is longer than its size");
        phase_ = Phase::ChunkSize;
        continue;
      }
      case Phase::Trailers: {
        const size_t max = std::min(lim_.max_line_bytes, lim_.max_head_bytes - std::min(head_bytes_, lim_.max_head_bytes));
        if (!take_line(in, line, max, 431, "a trailer line")) {
          if (phase_ == Phase::Failed) return State::Error;
          return State::NeedMore;
        }
        head_bytes_ += line.size() + 2;
        if (head_bytes_ > lim_.max_head_bytes)
          return fail(431, "headers_too_large", "the request head and trailers are larger than " + std::to_string(lim_.max_head_bytes) + " bytes");
        if (line.empty()) return finish();  // trailers are dropped
        continue;
      }
    }
  }
}

RequestFramer::State RequestFramer::on_head_line(const std::string& line) {
  if (line.empty()) return head_complete();
  if (++headers_ > lim_.max_headers)
    return fail(431, "headers_too_large", "more than " + std::to_string(lim_.max_headers) + " header lines");
  if (line[0] == ' ' || line[0] == '\t') return fail(400, "bad_request", "folded header lines are not accepted");
  size_t colon = line.find(':');
  if (colon == std::string::npos || colon == 0) return fail(400, "bad_request", "malformed header line");
  std::string name = line.substr(0, colon);
  // Not a token (a space before the colon, a NUL, any control or separator): a
  // downstream parser could read another name into it ("Transfer-Encoding\0").
  if (!is_token(name)) return fail(400, "bad_request", "malformed header name");
  name = lower(name);
  const std::string value = trim(line.substr(colon + 1));
  if (has_ctl(value)) return fail(400, "bad_request", "a control character in the value of header '" + name + "'");
  if (name == "content-length") {
    if (value.empty() || value.size() > 18 || value.find_first_not_of("0123456789") != std::string::npos)
      return fail(value.size() > 18 && value.find_first_not_of("0123456789") == std::string::npos ? 413 : 400,
                  value.size() > 18 ? "payload_too_large" : "bad_request", "invalid Content-Length");
    uint64_t n = std::stoull(value);
    if (has_length_ && n != length_) return fail(400, "bad_request", "conflicting Content-Length headers");
    has_length_ = true;
    length_ = n;
  } else if (name == "transfer-encoding") {
    append_list(te_, lower(value));
  } else if (name == "content-encoding") {
    append_list(ce_, lower(value));
  } else if (name == "expect") {
    if (lower(value) != "100-continue") return fail(417, "expectation_failed", "only 'Expect: 100-continue' is understood");
    expect_continue_ = true;
  } else {
    head_ += line + "\r\n";
  }
  return State::NeedMore;
}

RequestFramer::State RequestFramer::head_complete() {
  if (!te_.empty()) {
    if (has_length_) return fail(400, "bad_request", "a request may not have both Content-Length and Transfer-Encoding");
    if (te_ != "chunked")
      return fail(501, "unsupported_transfer_encoding", "Transfer-Encoding '" + te_ + "' is not supported (only chunked)");
    chunked_ = true;
  }
  if (!ce_.empty() && ce_ != "identity") {
    if (ce_ != "gzip" && ce_ != "x-gzip" && ce_ != "deflate")
      return fail(415, "unsupported_content_encoding",
                  "Content-Encoding '" + ce_ + "' is not supported (gzip, deflate or none)");
    inflate_ = true;
  }
  if (has_length_ && length_ > lim_.max_body_bytes)
    return fail(413, "payload_too_large",
                "the request body is larger than " + std::to_string(lim_.max_body_bytes) + " bytes");
  // Room for the head that finish() puts in front of the body handed on: the request
  // line and its CRLF, the kept headers, "Content-Length: " with at most 20 digits and
  // the blank line.
  head_room_ = request_line_.size() + head_.size() + 64;
  if (chunked_) {
    phase_ = Phase::ChunkSize;
    return State::NeedMore;
  }
  if (has_length_ && length_ > 0) {
    // A compressed body is not handed on (what it inflates to is): no head room.
    body_.reserve(static_cast<size_t>(length_) + (inflate_ ? 0 : head_room_));
    phase_ = Phase::Body;
    return State::NeedMore;
  }
  return finish();
}

RequestFramer::State RequestFramer::finish() {
  if (inflate_ && !body_.empty()) {
    z_stream zs{};
    if (inflateInit2(&zs, 15 + 32) != Z_OK)  // gzip or zlib, detected from the header
      return fail(500, "internal_error", "cannot start the inflater");
    // Reserved once up to the limit, with room for the head (why: ChunkSize); the
    // check below keeps it from growing past the reservation.
    std::string out;
    reserve_bound(out, lim_.max_body_bytes + head_room_);
    char buf[16384];
    zs.next_in = reinterpret_cast<Bytef*>(body_.data());
    zs.avail_in = static_cast<uInt>(body_.size());
    int r = Z_OK;
    while (true) {
      zs.next_out = reinterpret_cast<Bytef*>(buf);
      zs.avail_out = sizeof buf;
      r = inflate(&zs, Z_NO_FLUSH);
      if (r != Z_OK && r != Z_STREAM_END && r != Z_BUF_ERROR) break;
      const size_t got = sizeof buf - zs.avail_out;
      if (out.size() + got > lim_.max_body_bytes) {
        inflateEnd(&zs);
        return fail(413, "payload_too_large",
                    "the decompressed request body is larger than " + std::to_string(lim_.max_body_bytes) + " bytes");
      }
      out.append(buf, got);
      if (r == Z_STREAM_END || (r == Z_BUF_ERROR && got == 0)) break;
    }
    const bool ok = r == Z_STREAM_END && zs.avail_in == 0;
    inflateEnd(&zs);
    if (!ok) return fail(400, "bad_request", "the compressed request body is corrupt or truncated");
    body_ = std::move(out);
  }
  // The head goes in front of the body in the body's own buffer: each body buffer was
  // reserved with head_room_ to spare (unless the allocator refused a bound), so this
  // moves the bytes in place rather than copying them into a new buffer (a large body
  // is not held twice here).
  std::string head = request_line_ + "\r\n" + head_ + "Content-Length: " + std::to_string(body_.size()) +
                     "\r\n\r\n";
  body_.insert(0, head);
  out_ = std::move(body_);
  std::string().swap(body_);
  phase_ = Phase::Done;
  return State::Complete;
}

}  // namespace spear::server
