#include "model/files.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <string>
#include <unordered_set>
#include <vector>

#include "common/check.h"

namespace dgemma {
namespace {

const char* file_kind(mode_t m) {
  if (S_ISDIR(m)) return "a directory";
  if (S_ISFIFO(m)) return "a named pipe (FIFO)";
  if (S_ISCHR(m)) return "a character device";
  if (S_ISBLK(m)) return "a block device";
  if (S_ISSOCK(m)) return "a socket";
  if (S_ISREG(m)) return "a regular file";
  return "not a regular file";
}

std::string reason(int err) {
  if (err == ELOOP) return "too many levels of symbolic links (a symlink loop?)";
  return std::strerror(err);
}

void check_path(const std::string& path) {
  DG_REQUIRE(path.find('\0') == std::string::npos, CheckpointError,
             "path " << printable(path) << " contains a NUL byte");
}

}  // namespace

bool path_present(const std::string& path) {
  struct stat st {};
  return path.find('\0') == std::string::npos && ::lstat(path.c_str(), &st) == 0;
}

void require_directory(const std::string& dir) {
  check_path(dir);
  struct stat st {};
  if (::stat(dir.c_str(), &st) != 0) {
    const int err = errno;
    DG_THROW(CheckpointError, "checkpoint directory " << printable(dir, 400)
                                  << (err == ENOENT ? " does not exist" : ": " + reason(err)));
  }
  DG_REQUIRE(S_ISDIR(st.st_mode), CheckpointError,
             "checkpoint path " << printable(dir, 400) << " is " << file_kind(st.st_mode) << ", not a directory");
}

int open_regular_file(const std::string& path, size_t* size) {
  check_path(path);
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) {
    const int err = errno;
    DG_THROW(CheckpointError, "cannot open " << printable(path, 400) << ": " << reason(err));
  }
  DG_REQUIRE(S_ISREG(st.st_mode), CheckpointError,
             printable(path, 400) << " is " << file_kind(st.st_mode) << ", not a regular file");
  // O_NONBLOCK: should the path have been swapped for a FIFO since the stat, open() must not wait.
  const int fd = ::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC | O_NOCTTY);
  if (fd < 0) {
    const int err = errno;
    DG_THROW(CheckpointError, "cannot open " << printable(path, 400) << ": " << reason(err));
  }
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    DG_THROW(CheckpointError, printable(path, 400) << " is not a regular file");
  }
  *size = static_cast<size_t>(st.st_size);
  return fd;
}

std::string read_small_file(const std::string& path, size_t max_bytes) {
  size_t size = 0;
  const int fd = open_regular_file(path, &size);
  if (size > max_bytes) {
    ::close(fd);
    DG_THROW(CheckpointError, printable(path, 400) << " is " << size << " bytes, more than the " << max_bytes
                                                   << " this file may have");
  }
  std::string out(size, '\0');
  size_t got = 0;
  for (;;) {
    if (got == out.size()) {
      if (out.size() >= max_bytes + 1) break;
      out.resize(std::min(max_bytes + 1, out.size() + 4096));  // the file grew since the stat
    }
    const ssize_t n = ::read(fd, &out[got], out.size() - got);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      const int err = errno;
      ::close(fd);
      DG_THROW(CheckpointError, "cannot read " << printable(path, 400) << ": " << reason(err));
    }
    if (n == 0) break;
    got += static_cast<size_t>(n);
  }
  ::close(fd);
  DG_REQUIRE(got <= max_bytes, CheckpointError,
             printable(path, 400) << " is more than the " << max_bytes << " bytes this file may have");
  out.resize(got);
  return out;
}

namespace {

// A SAX pass over valid JSON: whether some object holds a key twice (the DOM parser keeps the last value).
// One set of keys per open object; linear in the text (a parser callback that drops nothing was quadratic
// in the entries of an object: 3.6 s for a 20,000-tensor safetensors header).
class DuplicateKeys final : public nlohmann::json_sax<nlohmann::json> {
 public:
  bool found = false;
  bool null() override { return true; }
  bool boolean(bool) override { return true; }
  bool number_integer(number_integer_t) override { return true; }
  bool number_unsigned(number_unsigned_t) override { return true; }
  bool number_float(number_float_t, const string_t&) override { return true; }
  bool string(string_t&) override { return true; }
  bool binary(binary_t&) override { return true; }
  bool start_object(std::size_t) override {
    keys_.emplace_back();
    return true;
  }
  bool key(string_t& k) override {
    found = !keys_.back().insert(k).second;
    return !found;  // stops at the first
  }
  bool end_object() override {
    keys_.pop_back();
    return true;
  }
  bool start_array(std::size_t) override { return true; }
  bool end_array() override { return true; }
  bool parse_error(std::size_t, const std::string&, const nlohmann::detail::exception&) override { return false; }

 private:
  std::vector<std::unordered_set<std::string>> keys_;
};

bool key_written_twice(const char* begin, const char* end) {
  DuplicateKeys sax;
  nlohmann::json::sax_parse(begin, end, &sax);
  return sax.found;
}

}  // namespace

nlohmann::json parse_json(const char* begin, const char* end, const std::string& what) {
  // Depth first, without recursion: brackets outside strings. And no NUL byte (JSON has none), where the
  // parser would stop reading as if the text ended there.
  int depth = 0;
  bool in_string = false, escaped = false;
  for (const char* p = begin; p < end; ++p) {
    const char c = *p;
    DG_REQUIRE(c != '\0', CheckpointError, what << " holds a NUL byte (at byte " << (p - begin) << "): not JSON");
    if (in_string) {
      if (escaped) escaped = false;
      else if (c == '\\') escaped = true;
      else if (c == '"') in_string = false;
    } else if (c == '"') {
      in_string = true;
    } else if (c == '{' || c == '[') {
      DG_REQUIRE(++depth <= kMaxJsonDepth, CheckpointError,
                 what << " nests deeper than " << kMaxJsonDepth << " levels (at byte " << (p - begin)
                      << "): not a checkpoint file");
    } else if (c == '}' || c == ']') {
      --depth;
    }
  }
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(begin, end);
  } catch (const nlohmann::json::exception& e) {
    // The parser's message quotes the bytes it read last: they may be anything.
    DG_THROW(CheckpointError, what << " is not valid JSON: " << printable(e.what(), 300));
  }
  DG_REQUIRE(!key_written_twice(begin, end), CheckpointError,
             what << " names a key twice in one object: corrupt or ambiguous");
  return j;
}

nlohmann::json read_json_file(const std::string& path, size_t max_bytes) {
  const std::string text = read_small_file(path, max_bytes);
  return parse_json(text.data(), text.data() + text.size(), printable(path, 400));
}

std::string describe(const nlohmann::json& v) {
  switch (v.type()) {
    case nlohmann::json::value_t::null: return "null";
    case nlohmann::json::value_t::boolean: return v.get<bool>() ? "true" : "false";
    case nlohmann::json::value_t::string: return "\"" + printable(v.get_ref<const std::string&>(), 60) + "\"";
    case nlohmann::json::value_t::array: return "an array of " + std::to_string(v.size()) + " items";
    case nlohmann::json::value_t::object: return "an object of " + std::to_string(v.size()) + " keys";
    case nlohmann::json::value_t::binary: return "binary data";
    default: return v.dump();  // a number
  }
}

}  // namespace dgemma
