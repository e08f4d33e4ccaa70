#pragma once
// The one way spear includes cpp-httplib. Debian ships it compiled
// (libcpp-httplib.so, built with OpenSSL/zlib/brotli support), so its compile-time
// limits are fixed: request line and header lines at most 8 KiB each, a listen
// backlog of 5 (HttpServer raises it after binding), and writes without
// MSG_NOSIGNAL (the server ignores SIGPIPE). Timeouts, keep-alive and the body
// limit are set at run time by HttpServer. The definitions that must match the
// library's build come from pkg-config (cpp-httplib.pc's Cflags).
#include <httplib.h>
