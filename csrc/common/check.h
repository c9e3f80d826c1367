// Error types and checks shared by the whole engine. User-facing errors carry a readable message;
// internal invariants (DG_CHECK) also carry file and line.
#pragma once

#include <cstddef>
#include <cstdio>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>

namespace dgemma {

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};
// Anything wrong with a checkpoint directory or its files.
struct CheckpointError : Error {
  using Error::Error;
};
// A bad argument from the caller (ids, shapes, sampler parameters).
struct InvalidArgument : Error {
  using Error::Error;
};
// Not enough room (KV block pool) for a request.
struct ResourceError : Error {
  using Error::Error;
};
// The request was cancelled (by its handle, or because the engine shut down).
struct Cancelled : Error {
  using Error::Error;
};
// Thrown by a request's on_step/on_block callback to end the request early, as done (not cancelled):
// it ends once the canvas being denoised is committed (from on_block: with the canvas just committed).
struct Stopped : Error {
  using Error::Error;
};

// Text from a file or a caller (names, keys, parser messages) made safe for an error message:
// valid UTF-8 stays, other bytes and control characters become \xNN, and it is cut to max_bytes
// (with a note of the full length), so a message never carries megabytes or undecodable bytes.
inline std::string printable(std::string_view s, size_t max_bytes = 160) {
  std::string out;
  size_t i = 0;
  auto escape = [&](unsigned char c) {
    char buf[8];
    std::snprintf(buf, sizeof buf, "\\x%02x", c);
    out += buf;
  };
  while (i < s.size() && out.size() < max_bytes) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    if (c >= 0x20 && c < 0x7f) {
      out += static_cast<char>(c);
      ++i;
      continue;
    }
    // A well-formed multi-byte sequence (no overlongs, no surrogates, at most U+10FFFF) is kept.
    size_t n = c >= 0xc2 && c <= 0xdf ? 2 : c >= 0xe0 && c <= 0xef ? 3 : c >= 0xf0 && c <= 0xf4 ? 4 : 0;
    bool ok = n > 0 && i + n <= s.size();
    for (size_t k = 1; ok && k < n; ++k) ok = (static_cast<unsigned char>(s[i + k]) & 0xc0) == 0x80;
    if (ok && n >= 3) {
      const unsigned char c1 = static_cast<unsigned char>(s[i + 1]);
      if (c == 0xe0) ok = c1 >= 0xa0;
      if (c == 0xed) ok = c1 < 0xa0;
      if (c == 0xf0) ok = c1 >= 0x90;
      if (c == 0xf4) ok = c1 < 0x90;
    }
    if (ok) {
      out.append(s.data() + i, n);
      i += n;
    } else {
      escape(c);
      ++i;
    }
  }
  if (i < s.size()) out += "... (" + std::to_string(s.size()) + " bytes)";
  return out;
}

}  // namespace dgemma

#define DG_THROW(Type, msg)                 \
  do {                                      \
    std::ostringstream dg_msg_;             \
    dg_msg_ << msg;                         \
    throw ::dgemma::Type(dg_msg_.str());    \
  } while (0)

#define DG_REQUIRE(cond, Type, msg) \
  do {                              \
    if (!(cond)) DG_THROW(Type, msg); \
  } while (0)

#define DG_CHECK(cond, msg)                                                                   \
  do {                                                                                        \
    if (!(cond))                                                                              \
      DG_THROW(Error, "internal check failed (" #cond ") at " << __FILE__ << ":" << __LINE__ \
                                                                << ": " << msg);              \
  } while (0)
