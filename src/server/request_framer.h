#pragma once
// Cuts one HTTP/1.1 request at a time from the bytes a connection has received,
// under hard limits, before cpp-httplib sees any of it. Debian's cpp-httplib 0.11
// buffers a request line or header line without bound, applies the body limit only
// to a Content-Length body (a chunked body is read in full), and inflates a gzip
// body without counting what comes out. The framer closes those holes:
//   * the request line and each header line at most max_line_bytes, the whole head
//     at most max_head_bytes and max_headers lines: past them 414 / 431 at once,
//     without waiting for the line's end;
//   * Content-Length above max_body_bytes: 413 before any body byte is read;
//   * Transfer-Encoding: chunked is de-chunked here, its data counted (413 past the
//     limit) and its chunk-size and trailer lines bounded; any other transfer coding
//     is 501, and Content-Length with Transfer-Encoding (request smuggling) is 400;
//   * Content-Encoding gzip / x-gzip / deflate is inflated here with the limit
//     applied to the inflated bytes (413 past it, 400 if corrupt); any other
//     content coding (br, several codings) is 415;
//   * Expect: 100-continue is answered here (wants_continue), anything else is 417.
// What it hands on (request()) is the same request in plain framing: the head
// without Transfer-Encoding, Content-Encoding, Expect and Content-Length, then
// "Content-Length: N" and exactly N body bytes. Bytes after the request (a pipelined
// next request) stay in the caller's buffer for the next call.
// Memory: each body buffer is reserved once (a Content-Length body: its length; a
// chunked or inflated one: the limit, as address space that counts only once written)
// with room for the head, which is then put in front in place; nothing is grown by
// appends or copied into a second buffer (why growth costs RSS: ChunkSize in the .cpp).
#include <cstddef>
#include <cstdint>
#include <string>

namespace spear::server {

struct FramingLimits {
  size_t max_line_bytes = 8192;     // request line, each header line
  size_t max_head_bytes = 64 << 10;  // request line + headers (and chunked trailers)
  size_t max_headers = 128;
  size_t max_body_bytes = 8u << 20;  // after de-chunking and inflating
};

class RequestFramer {
 public:
  enum class State { NeedMore, Complete, Error };

  explicit RequestFramer(FramingLimits lim) : lim_(lim) {}

  // Consumes from the front of `in` what belongs to the current request. Complete:
  // request() holds it (call reset() before the next one). Error: status()/message().
  State feed(std::string& in);
  void reset();

  bool started() const { return phase_ != Phase::Start || !line_.empty(); }  // any byte seen
  bool head_done() const { return phase_ > Phase::Head; }
  // True once per request: the head asked for 100 Continue and the body is wanted.
  bool take_continue();

  const std::string& request() const { return out_; }
  std::string take_request() { return std::move(out_); }  // after Complete; no copy
  int status() const { return status_; }
  const std::string& code() const { return code_; }
  const std::string& message() const { return message_; }

 private:
  enum class Phase { Start, Head, Body, ChunkSize, ChunkData, ChunkEnd, Trailers, Done, Failed };

  State fail(int status, std::string code, std::string message);
  // Takes one '\n'-terminated line (without "\r\n") from `in`; false if none yet.
  // Fails (returns false, phase Failed) when the line would exceed `max`.
  bool take_line(std::string& in, std::string& line, size_t max, int status, const char* what);
  State on_head_line(const std::string& line);
  State head_complete();
  State finish();

  FramingLimits lim_;
  Phase phase_ = Phase::Start;
  std::string line_;  // a partial line carried between feeds
  std::string request_line_, head_;  // head_: the kept header lines, "\r\n"-terminated
  std::string te_, ce_;              // Transfer-Encoding, Content-Encoding (lower case)
  size_t head_bytes_ = 0, headers_ = 0;
  bool has_length_ = false, chunked_ = false, inflate_ = false, expect_continue_ = false;
  bool continue_taken_ = false;
  uint64_t length_ = 0;       // Content-Length, or where the current chunk ends
  size_t head_room_ = 0;      // what finish() puts in front of the body, at most
  std::string body_;          // the body (compressed: as received), reserved once
  std::string out_;
  int status_ = 0;
  std::string code_, message_;
};

}  // namespace spear::server
