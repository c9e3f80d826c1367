#include "model/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <map>
#include <set>

#include "common/check.h"

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
size_t safetensors_dtype_bytes(const std::string& s) {
  static const std::unordered_map<std::string, size_t> sizes = {
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
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  DG_REQUIRE(fd >= 0, CheckpointError, "cannot open " << path << ": " << std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    ::close(fd);
    DG_THROW(CheckpointError, "cannot stat " << path);
  }
  size_ = static_cast<size_t>(st.st_size);
  if (size_ > 0) {
    void* p = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) {
      ::close(fd);
      DG_THROW(CheckpointError, "cannot memory-map " << path << ": " << std::strerror(errno));
    }
    data_ = static_cast<const uint8_t*>(p);
  }
  ::close(fd);
}

MappedFile::~MappedFile() {
  if (data_) ::munmap(const_cast<uint8_t*>(data_), size_);
}

void Checkpoint::add_file(const std::string& path, const std::vector<std::string>* expected) {
  auto file = std::make_unique<MappedFile>(path);
  const size_t size = file->size();
  DG_REQUIRE(size >= 8, CheckpointError, path << ": file too small to be safetensors (" << size << " bytes)");
  uint64_t header_len = 0;
  std::memcpy(&header_len, file->data(), 8);  // little-endian on every platform we build for
  DG_REQUIRE(header_len <= size - 8 && header_len <= (100u << 20), CheckpointError,
             path << ": header length " << header_len << " does not fit in the file (" << size
                  << " bytes): truncated or not a safetensors file");
  json header;
  try {
    header = json::parse(file->data() + 8, file->data() + 8 + header_len);
  } catch (const json::exception& e) {
    DG_THROW(CheckpointError, path << ": header is not valid JSON: " << e.what());
  }
  DG_REQUIRE(header.is_object(), CheckpointError, path << ": header is not a JSON object");
  const uint8_t* base = file->data() + 8 + header_len;
  const uint64_t data_size = size - 8 - header_len;

  std::vector<std::pair<uint64_t, uint64_t>> ranges;
  std::vector<TensorRef> refs;
  for (const auto& [name, info] : header.items()) {
    if (name == "__metadata__") continue;
    DG_REQUIRE(info.is_object() && info.contains("dtype") && info.contains("shape") && info.contains("data_offsets"),
               CheckpointError, path << ": tensor '" << name << "' has a malformed header entry");
    TensorRef t;
    t.name = name;
    try {
      t.dtype_str = info["dtype"].get<std::string>();
      t.shape = info["shape"].get<std::vector<int64_t>>();
      const auto offs = info["data_offsets"].get<std::vector<uint64_t>>();
      DG_REQUIRE(offs.size() == 2, CheckpointError, path << ": tensor '" << name << "' data_offsets must have 2 entries");
      DG_REQUIRE(offs[0] <= offs[1] && offs[1] <= data_size, CheckpointError,
                 path << ": tensor '" << name << "' data_offsets [" << offs[0] << ", " << offs[1]
                      << "] fall outside the data section (" << data_size << " bytes): truncated or corrupt file");
      const size_t elem = safetensors_dtype_bytes(t.dtype_str);
      DG_REQUIRE(elem > 0, CheckpointError, path << ": tensor '" << name << "' has unknown dtype " << t.dtype_str);
      uint64_t count = 1;
      for (int64_t d : t.shape) {
        DG_REQUIRE(d >= 0, CheckpointError, path << ": tensor '" << name << "' has a negative dimension");
        DG_REQUIRE(d == 0 || count <= (UINT64_MAX / 16) / static_cast<uint64_t>(d), CheckpointError,
                   path << ": tensor '" << name << "' shape overflows");
        count *= static_cast<uint64_t>(d);
      }
      DG_REQUIRE(count * elem == offs[1] - offs[0], CheckpointError,
                 path << ": tensor '" << name << "' holds " << (offs[1] - offs[0]) << " bytes but its shape and dtype "
                      << t.dtype_str << " need " << count * elem);
      t.dtype = parse_dtype(t.dtype_str);
      t.data = base + offs[0];
      t.nbytes = offs[1] - offs[0];
      t.file = file.get();
      ranges.emplace_back(offs[0], offs[1]);
    } catch (const json::exception& e) {
      DG_THROW(CheckpointError, path << ": tensor '" << name << "' header entry has the wrong types: " << e.what());
    }
    refs.push_back(std::move(t));
  }
  std::sort(ranges.begin(), ranges.end());
  for (size_t i = 1; i < ranges.size(); ++i)
    DG_REQUIRE(ranges[i].first >= ranges[i - 1].second || ranges[i].first == ranges[i].second ||
                   ranges[i - 1].first == ranges[i - 1].second,
               CheckpointError, path << ": tensors overlap in the data section (corrupt file)");
  if (expected) {
    std::set<std::string> have;
    for (const auto& r : refs) have.insert(r.name);
    for (const auto& n : *expected)
      DG_REQUIRE(have.count(n), CheckpointError,
                 "model.safetensors.index.json maps '" << n << "' to " << path << ", which does not contain it");
  }
  for (auto& r : refs) {
    DG_REQUIRE(!tensors_.count(r.name), CheckpointError, "tensor '" << r.name << "' appears in more than one file");
    tensors_.emplace(r.name, std::move(r));
  }
  files_.push_back(std::move(file));
}

std::unique_ptr<Checkpoint> Checkpoint::open(const std::string& dir) {
  auto ckpt = std::unique_ptr<Checkpoint>(new Checkpoint());
  const fs::path index = fs::path(dir) / "model.safetensors.index.json";
  if (fs::exists(index)) {
    json j;
    {
      std::ifstream in(index);
      try {
        j = json::parse(in);
      } catch (const json::exception& e) {
        DG_THROW(CheckpointError, index.string() << " is not valid JSON: " << e.what());
      }
    }
    DG_REQUIRE(j.is_object() && j.contains("weight_map") && j["weight_map"].is_object(), CheckpointError,
               index.string() << ": missing weight_map");
    std::map<std::string, std::vector<std::string>> by_file;
    for (const auto& [name, file] : j["weight_map"].items()) {
      DG_REQUIRE(file.is_string(), CheckpointError, index.string() << ": weight_map entry for '" << name << "' is not a string");
      const std::string f = file.get<std::string>();
      DG_REQUIRE(f.find('/') == std::string::npos && f.find("..") == std::string::npos, CheckpointError,
                 index.string() << ": shard name '" << f << "' must be a plain file name");
      by_file[f].push_back(name);
    }
    for (const auto& [f, names] : by_file) {
      const fs::path p = fs::path(dir) / f;
      DG_REQUIRE(fs::exists(p), CheckpointError, "shard " << f << " listed in model.safetensors.index.json is missing");
      ckpt->add_file(p.string(), &names);
    }
  } else {
    std::vector<std::string> files;
    if (fs::is_directory(dir))
      for (const auto& e : fs::directory_iterator(dir))
        if (e.path().extension() == ".safetensors") files.push_back(e.path().string());
    std::sort(files.begin(), files.end());
    DG_REQUIRE(!files.empty(), CheckpointError, "no *.safetensors files in " << dir);
    for (const auto& f : files) ckpt->add_file(f, nullptr);
  }
  return ckpt;
}

const TensorRef* Checkpoint::find(const std::string& name) const {
  auto it = tensors_.find(name);
  return it == tensors_.end() ? nullptr : &it->second;
}

}  // namespace dgemma
