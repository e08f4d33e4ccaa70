#pragma once
// The one way spear includes cpp-httplib. Debian ships it compiled
// (libcpp-httplib.so, built with OpenSSL/zlib/brotli support), so its compile-time
// limits are fixed: a listen backlog of 5 (HttpServer raises it after binding) and
// writes without MSG_NOSIGNAL (the server ignores SIGPIPE). The server uses the
// library to parse, route and answer requests that SocketFront has already received
// in full under spear's own limits (socket_front.h, request_framer.h). The
// definitions that must match the library's build come from pkg-config
// (cpp-httplib.pc's Cflags).
#include <httplib.h>
