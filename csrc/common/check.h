// Error types and checks shared by the whole engine. User-facing errors carry a readable message;
// internal invariants (DG_CHECK) also carry file and line.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

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
