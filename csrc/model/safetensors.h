// Memory-mapped safetensors checkpoints (single file or sharded with model.safetensors.index.json).
// Every header is validated against the file before any tensor is touched.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

namespace dgemma {

enum class DType { F32, BF16, F16, U8, F8_E4M3, Other };

inline bool is_float(DType d) { return d == DType::F32 || d == DType::BF16 || d == DType::F16; }

const char* dtype_name(DType d);
size_t dtype_size(DType d);

class MappedFile {
 public:
  explicit MappedFile(const std::string& path);
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  const uint8_t* data() const { return data_; }
  size_t size() const { return size_; }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  const uint8_t* data_ = nullptr;
  size_t size_ = 0;
};

struct TensorRef {
  std::string name;
  std::string dtype_str;
  DType dtype = DType::Other;
  std::vector<int64_t> shape;
  const uint8_t* data = nullptr;
  size_t nbytes = 0;
  const MappedFile* file = nullptr;
};

class Checkpoint {
 public:
  // Opens model.safetensors.index.json if present, else every *.safetensors in dir.
  static std::unique_ptr<Checkpoint> open(const std::string& dir);
  const TensorRef* find(const std::string& name) const;
  const std::unordered_map<std::string, TensorRef>& tensors() const { return tensors_; }

 private:
  void add_file(const std::string& path, const std::vector<std::string>* expected);
  std::vector<std::unique_ptr<MappedFile>> files_;
  std::unordered_map<std::string, TensorRef> tensors_;
};

}  // namespace dgemma
