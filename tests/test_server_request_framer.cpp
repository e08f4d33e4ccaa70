// server::RequestFramer on its own: what it hands on and what it refuses, including
// the inputs fuzz/fuzz_http_framer found (also replayed from fuzz/corpus/http_framer/).
#include <gtest/gtest.h>

#include <string>

#include "server/request_framer.h"

using spear::server::FramingLimits;
using spear::server::RequestFramer;

namespace {

struct Framed {
  RequestFramer::State state;
  int status = 0;
  std::string request;
};

Framed frame(std::string in, FramingLimits lim = {}) {
  RequestFramer f(lim);
  RequestFramer::State s = f.feed(in);
  return {s, f.status(), s == RequestFramer::State::Complete ? f.request() : std::string()};
}

}  // namespace

TEST(RequestFramer, HandsOnPlainFraming) {
  Framed r = frame("POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                   "3\r\nabc\r\n2;ext=1\r\nde\r\n0\r\nX-Trailer: 1\r\n\r\n");
  ASSERT_EQ(r.state, RequestFramer::State::Complete);
  EXPECT_EQ(r.request, "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nabcde");
}

// Found by fuzz_http_framer: a header name holding a NUL ("Transfer-Encoding\0...:
// chunked") was handed on to cpp-httplib as a header of its own. A field name must be
// a token (RFC 9110 5.6.2).
TEST(RequestFramer, RefusesHeaderNamesThatAreNotTokens) {
  using namespace std::string_literals;
  for (const std::string& name : {"Transfer-Encoding\0\0"s, "Content-Length\x17"s, "X Y"s, "X(y)"s,
                                  "X\x7f"s, "\xc3\xa9t\xc3\xa9"s, "X/Y"s}) {
    Framed r = frame("POST / HTTP/1.1\r\nHost: x\r\n" + name + ": chunked\r\n\r\n");
    EXPECT_EQ(r.state, RequestFramer::State::Error) << name;
    EXPECT_EQ(r.status, 400) << name;
  }
  EXPECT_EQ(frame("GET / HTTP/1.1\r\nX-Ok_!#$%&'*+.^`|~1: v\r\n\r\n").state, RequestFramer::State::Complete);
}

// RFC 9110 5.5: a field value holding NUL or a bare CR is rejected, not passed on.
TEST(RequestFramer, RefusesControlCharactersInHeaderValues) {
  using namespace std::string_literals;
  for (const std::string& value : {"a\0b"s, "a\rb"s, "a\x01"s, "\x7f"s}) {
    Framed r = frame("GET / HTTP/1.1\r\nX-V: " + value + "\r\n\r\n");
    EXPECT_EQ(r.state, RequestFramer::State::Error);
    EXPECT_EQ(r.status, 400);
  }
  // A tab and obs-text (bytes >= 0x80) are allowed in a value.
  EXPECT_EQ(frame("GET / HTTP/1.1\r\nX-V: a\tb \xc3\xa9\r\n\r\n").state, RequestFramer::State::Complete);
}

TEST(RequestFramer, RefusesControlCharactersInTheRequestLine) {
  using namespace std::string_literals;
  for (const std::string& line : {"GET /a\0b HTTP/1.1"s, "GE\x01T / HTTP/1.1"s, "G(T / HTTP/1.1"s,
                                  "GET /\x7f HTTP/1.1"s, "GET /\r/ HTTP/1.1"s})
    EXPECT_EQ(frame(line + "\r\nHost: x\r\n\r\n").status, 400) << line;
}
