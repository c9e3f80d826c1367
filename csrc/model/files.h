// Reading a checkpoint's files defensively: regular files only (a FIFO, device, socket or
// directory is refused without blocking), sizes bounded before anything is read, JSON nesting
// bounded before it is parsed, and every failure a CheckpointError that names the file.
#pragma once

#include <cstddef>
#include <string>

#include <nlohmann/json.hpp>

namespace dgemma {

// Deeper JSON is refused: real configs nest about 5 levels, and nlohmann::json copies and dumps
// recursively, so unbounded nesting would exhaust the stack.
constexpr int kMaxJsonDepth = 64;
// config.json, generation_config.json (a few KB in practice).
constexpr size_t kMaxConfigBytes = size_t{16} << 20;
// model.safetensors.index.json (hundreds of KB for the largest models).
constexpr size_t kMaxIndexBytes = size_t{64} << 20;
// A safetensors header (the format's own limit is 100 MB).
constexpr size_t kMaxSafetensorsHeaderBytes = size_t{100} << 20;

// True when anything is at path, even a dangling or looping symlink (lstat succeeds).
bool path_present(const std::string& path);
// Throws CheckpointError unless dir is a directory (following symlinks).
void require_directory(const std::string& dir);
// Opens a regular file read-only and returns its descriptor; its size goes to *size.
// Never blocks: the type is checked with stat() first and again on the descriptor.
int open_regular_file(const std::string& path, size_t* size);
// The whole file, which must be a regular file of at most max_bytes.
std::string read_small_file(const std::string& path, size_t max_bytes);

// Parses JSON text after checking its nesting depth; NUL bytes and a key written twice in one object
// are refused. `what` names the text in messages (a file, or "file: header").
nlohmann::json parse_json(const char* begin, const char* end, const std::string& what);
nlohmann::json read_json_file(const std::string& path, size_t max_bytes = kMaxConfigBytes);

// A short description of a JSON value for messages: scalars as written (strings cut short),
// arrays and objects by kind and size. Never serialises a nested value.
std::string describe(const nlohmann::json& v);

}  // namespace dgemma
