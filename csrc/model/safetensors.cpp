#include "model/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <map>
#include <set>

#include "common/check.h"
#include "model/files.h"

namespace dgemma {

namespace fs = std::filesystem;
using json = nlohmann::json;

const char* dtype_name(DType d) {
  switch (d) {
    case DType::F32: return "F32";
    case DType::BF16: return "BF16";
    case DType::F16: return "F16";
    case DType::U8: return "U8";
    case DType::F8_E4M3: return "F8_E4M3";
    default: return "other";
  }
}

size_t dtype_size(DType d) {
  switch (d) {
    case DType::F32: return 4;
    case DType::BF16:
    case DType::F16: return 2;
    case DType::U8:
    case DType::F8_E4M3: return 1;
    default: return 0;
  }
}

namespace {

// Sizes of every dtype the format defines, so byte ranges can be checked for tensors we won't load.
// Never destroyed: a checkpoint may still be opening on another thread (a Python daemon thread's
// Engine) while the process runs its exit-time destructors (ThreadSanitizer saw exactly that).
size_t safetensors_dtype_bytes(const std::string& s) {
  static const auto& sizes = *new std::unordered_map<std::string, size_t>{
      {"BOOL", 1}, {"U8", 1},   {"I8", 1},   {"F8_E4M3", 1}, {"F8_E5M2", 1}, {"F8_E8M0", 1}, {"I16", 2},
      {"U16", 2},  {"F16", 2},  {"BF16", 2}, {"I32", 4},     {"U32", 4},     {"F32", 4},     {"I64", 8},
      {"U64", 8},  {"F64", 8},  {"C64", 8}};
  auto it = sizes.find(s);
  return it == sizes.end() ? 0 : it->second;
}

DType parse_dtype(const std::string& s) {
  if (s == "F32") return DType::F32;
  if (s == "BF16") return DType::BF16;
  if (s == "F16") return DType::F16;
  if (s == "U8") return DType::U8;
  if (s == "F8_E4M3") return DType::F8_E4M3;
  return DType::Other;
}

}  // namespace

MappedFile::MappedFile(const std::string& path) : path_(path) {
  const int fd = open_regular_file(path, &size_);
  if (size_ > 0) {
    void* p = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) {
      const int err = errno;
      ::close(fd);
      DG_THROW(CheckpointError, "cannot memory-map " << printable(path, 400) << ": " << std::strerror(err));
    }
    data_ = static_cast<const uint8_t*>(p);
  }
  ::close(fd);
}

MappedFile::~MappedFile() {
  if (data_) ::munmap(const_cast<uint8_t*>(data_), size_);
}

namespace {

// A JSON integer in [0, max] (no bools, floats or negatives: the header describes byte counts).
bool exact_uint(const json& v, uint64_t max, uint64_t* out) {
  if (!v.is_number_integer()) return false;
  if (!v.is_number_unsigned() && v.get<int64_t>() < 0) return false;  // "-0" parses as a signed 0
  const uint64_t u = v.is_number_unsigned() ? v.get<uint64_t>() : static_cast<uint64_t>(v.get<int64_t>());
  if (u > max) return false;
  *out = u;
  return true;
}

}  // namespace

void Checkpoint::add_file(const std::string& path, const std::vector<std::string>* expected) {
  auto file = std::make_unique<MappedFile>(path);
  const std::string where = printable(path, 400);
  const size_t size = file->size();
  DG_REQUIRE(size >= 8, CheckpointError, where << ": file too small to be safetensors (" << size << " bytes)");
  uint64_t header_len = 0;
  std::memcpy(&header_len, file->data(), 8);  // little-endian on every platform we build for
  DG_REQUIRE(header_len <= size - 8 && header_len <= kMaxSafetensorsHeaderBytes, CheckpointError,
             where << ": header length " << header_len << " does not fit in the file (" << size
                   << " bytes): truncated or not a safetensors file");
  const json header = parse_json(reinterpret_cast<const char*>(file->data()) + 8,
                                 reinterpret_cast<const char*>(file->data()) + 8 + header_len, where + ": header");
  DG_REQUIRE(header.is_object(), CheckpointError, where << ": header is not a JSON object");
  const uint8_t* base = file->data() + 8 + header_len;
  const uint64_t data_size = size - 8 - header_len;

  std::vector<std::pair<uint64_t, uint64_t>> ranges;
  std::vector<TensorRef> refs;
  for (const auto& [name, info] : header.items()) {
    if (name == "__metadata__") continue;
    const std::string tname = printable(name, 200);
    DG_REQUIRE(info.is_object() && info.contains("dtype") && info.contains("shape") && info.contains("data_offsets"),
               CheckpointError, where << ": tensor '" << tname << "' has a malformed header entry");
    TensorRef t;
    t.name = name;
    const json& dtype = info["dtype"];
    const json& shape = info["shape"];
    const json& offs = info["data_offsets"];
    DG_REQUIRE(dtype.is_string(), CheckpointError,
               where << ": tensor '" << tname << "' dtype must be a string, got " << describe(dtype));
    t.dtype_str = dtype.get<std::string>();
    const size_t elem = safetensors_dtype_bytes(t.dtype_str);
    DG_REQUIRE(elem > 0, CheckpointError,
               where << ": tensor '" << tname << "' has unknown dtype " << printable(t.dtype_str, 40));
    DG_REQUIRE(shape.is_array() && shape.size() <= 16, CheckpointError,
               where << ": tensor '" << tname << "' shape must be an array of at most 16 sizes, got " << describe(shape));
    for (const json& d : shape) {
      uint64_t n = 0;
      DG_REQUIRE(exact_uint(d, static_cast<uint64_t>(INT64_MAX), &n), CheckpointError,
                 where << ": tensor '" << tname << "' has a dimension that is not a non-negative integer: "
                       << describe(d));
      t.shape.push_back(static_cast<int64_t>(n));
    }
    // Elements (times at most 16 bytes each) without overflow; a zero dimension makes any shape empty.
    uint64_t count = std::count(t.shape.begin(), t.shape.end(), 0) ? 0 : 1;
    for (int64_t n : t.shape) {
      if (!count) break;
      DG_REQUIRE(count <= (UINT64_MAX / 16) / static_cast<uint64_t>(n), CheckpointError,
                 where << ": tensor '" << tname << "' shape overflows");
      count *= static_cast<uint64_t>(n);
    }
    uint64_t begin = 0, end = 0;
    DG_REQUIRE(offs.is_array() && offs.size() == 2 && exact_uint(offs[0], UINT64_MAX, &begin) &&
                   exact_uint(offs[1], UINT64_MAX, &end),
               CheckpointError,
               where << ": tensor '" << tname << "' data_offsets must be 2 non-negative integers, got " << describe(offs));
    DG_REQUIRE(begin <= end && end <= data_size, CheckpointError,
               where << ": tensor '" << tname << "' data_offsets [" << begin << ", " << end
                     << "] fall outside the data section (" << data_size << " bytes): truncated or corrupt file");
    DG_REQUIRE(count * elem == end - begin, CheckpointError,
               where << ": tensor '" << tname << "' holds " << (end - begin) << " bytes but its shape and dtype "
                     << t.dtype_str << " need " << count * elem);
    t.dtype = parse_dtype(t.dtype_str);
    t.data = base + begin;
    t.nbytes = end - begin;
    t.file = file.get();
    if (end > begin) ranges.emplace_back(begin, end);  // an empty tensor overlaps nothing
    refs.push_back(std::move(t));
  }
  // Sorted, each range must end before the next begins: an empty one left in between (it sorts anywhere)
  // hid an overlap of its neighbours.
  std::sort(ranges.begin(), ranges.end());
  for (size_t i = 1; i < ranges.size(); ++i)
    DG_REQUIRE(ranges[i].first >= ranges[i - 1].second, CheckpointError,
               where << ": tensors overlap in the data section (corrupt file)");
  if (expected) {
    std::set<std::string> have;
    for (const auto& r : refs) have.insert(r.name);
    for (const auto& n : *expected)
      DG_REQUIRE(have.count(n), CheckpointError,
                 "model.safetensors.index.json maps '" << printable(n, 200) << "' to " << where
                                                       << ", which does not contain it");
  }
  for (auto& r : refs) {
    DG_REQUIRE(!tensors_.count(r.name), CheckpointError,
               "tensor '" << printable(r.name, 200) << "' appears in more than one file");
    tensors_.emplace(r.name, std::move(r));
  }
  files_.push_back(std::move(file));
}

std::unique_ptr<Checkpoint> Checkpoint::open(const std::string& dir) {
  require_directory(dir);
  auto ckpt = std::unique_ptr<Checkpoint>(new Checkpoint());
  const std::string index = dir + "/model.safetensors.index.json";
  if (path_present(index)) {
    const std::string where = printable(index, 400);
    const json j = read_json_file(index, kMaxIndexBytes);
    DG_REQUIRE(j.is_object() && j.contains("weight_map") && j["weight_map"].is_object(), CheckpointError,
               where << ": missing weight_map");
    std::map<std::string, std::vector<std::string>> by_file;
    for (const auto& [name, file] : j["weight_map"].items()) {
      DG_REQUIRE(file.is_string(), CheckpointError,
                 where << ": weight_map entry for '" << printable(name, 200) << "' is not a string");
      const std::string f = file.get<std::string>();
      DG_REQUIRE(!f.empty() && f.find('/') == std::string::npos && f.find("..") == std::string::npos &&
                     f.find('\0') == std::string::npos,
                 CheckpointError, where << ": shard name '" << printable(f, 200) << "' must be a plain file name");
      by_file[f].push_back(name);
    }
    for (const auto& [f, names] : by_file) {
      const std::string p = dir + "/" + f;
      DG_REQUIRE(path_present(p), CheckpointError,
                 "shard " << printable(f, 200) << " listed in model.safetensors.index.json is missing");
      ckpt->add_file(p, &names);
    }
  } else {
    std::vector<std::string> files;
    std::error_code ec;
    fs::directory_iterator it(dir, ec), end;
    DG_REQUIRE(!ec, CheckpointError, "cannot list " << printable(dir, 400) << ": " << ec.message());
    for (; it != end; it.increment(ec)) {
      DG_REQUIRE(!ec, CheckpointError, "cannot list " << printable(dir, 400) << ": " << ec.message());
      if (it->path().extension() == ".safetensors") files.push_back(it->path().string());
    }
    std::sort(files.begin(), files.end());
    DG_REQUIRE(!files.empty(), CheckpointError, "no *.safetensors files in " << printable(dir, 400));
    for (const auto& f : files) ckpt->add_file(f, nullptr);
  }
  return ckpt;
}

const TensorRef* Checkpoint::find(const std::string& name) const {
  auto it = tensors_.find(name);
  return it == tensors_.end() ? nullptr : &it->second;
}

}  // namespace dgemma
