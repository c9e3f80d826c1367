// Typed views of backend memory, and the memory itself. The forward (model/forward.h) hands these
// to a backend's ops; the data pointer is the backend's (host memory on the CPU, device memory on a
// GPU), so only the backend dereferences it.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "common/check.h"

namespace dgemma {

enum class ScalarType : uint8_t { kF32, kF64, kBF16, kI32 };

constexpr size_t scalar_size(ScalarType t) {
  switch (t) {
    case ScalarType::kF32: return 4;
    case ScalarType::kF64: return 8;
    case ScalarType::kBF16: return 2;
    case ScalarType::kI32: return 4;
  }
  return 0;
}

constexpr const char* scalar_name(ScalarType t) {
  switch (t) {
    case ScalarType::kF32: return "f32";
    case ScalarType::kF64: return "f64";
    case ScalarType::kBF16: return "bf16";
    case ScalarType::kI32: return "i32";
  }
  return "?";
}

// The dtype of a C++ element type (bf16 is stored as its 16 raw bits).
template <typename T>
struct ScalarTypeOf;
template <>
struct ScalarTypeOf<float> {
  static constexpr ScalarType value = ScalarType::kF32;
};
template <>
struct ScalarTypeOf<double> {
  static constexpr ScalarType value = ScalarType::kF64;
};
template <>
struct ScalarTypeOf<int32_t> {
  static constexpr ScalarType value = ScalarType::kI32;
};
template <>
struct ScalarTypeOf<uint16_t> {
  static constexpr ScalarType value = ScalarType::kBF16;
};

// Pointer, dtype, shape and strides (in elements) of up to 4 dimensions. An empty tensor (null data)
// stands for "none" where an op's contract allows it.
struct Tensor {
  static constexpr int kMaxDims = 4;
  void* data = nullptr;
  ScalarType dtype = ScalarType::kF32;
  int ndim = 0;
  std::array<int64_t, kMaxDims> shape{};
  std::array<int64_t, kMaxDims> stride{};

  // A contiguous row-major view.
  static Tensor of(void* data, ScalarType dtype, std::initializer_list<int64_t> dims) {
    Tensor t;
    DG_CHECK(dims.size() >= 1 && dims.size() <= kMaxDims, "tensor of " << dims.size() << " dims");
    t.data = data;
    t.dtype = dtype;
    t.ndim = static_cast<int>(dims.size());
    int i = 0;
    for (int64_t d : dims) t.shape[i++] = d;
    int64_t s = 1;
    for (int k = t.ndim - 1; k >= 0; --k) {
      t.stride[k] = s;
      s *= t.shape[k];
    }
    return t;
  }
  template <typename T>
  static Tensor of(T* data, std::initializer_list<int64_t> dims) {
    return of(const_cast<void*>(static_cast<const void*>(data)), ScalarTypeOf<std::remove_const_t<T>>::value, dims);
  }

  bool empty() const { return data == nullptr; }
  int64_t dim(int i) const { return shape[i]; }
  int64_t numel() const {
    int64_t n = ndim > 0 ? 1 : 0;
    for (int i = 0; i < ndim; ++i) n *= shape[i];
    return n;
  }
  size_t bytes() const { return static_cast<size_t>(numel()) * scalar_size(dtype); }
  bool contiguous() const {
    int64_t s = 1;
    for (int k = ndim - 1; k >= 0; --k) {
      if (shape[k] != 1 && stride[k] != s) return false;
      s *= shape[k];
    }
    return true;
  }
  // Elements per row when viewed as [numel / last, last].
  int64_t cols() const { return ndim > 0 ? shape[ndim - 1] : 0; }
  int64_t rows() const { return cols() > 0 ? numel() / cols() : 0; }

  template <typename T>
  T* ptr() const {
    DG_CHECK(ScalarTypeOf<std::remove_const_t<T>>::value == dtype,
             "tensor of " << scalar_name(dtype) << " read as " << scalar_name(ScalarTypeOf<std::remove_const_t<T>>::value));
    return static_cast<T*>(data);
  }

  // Rows [begin, begin + count) of the first dimension.
  Tensor slice(int64_t begin, int64_t count) const {
    DG_CHECK(ndim >= 1 && begin >= 0 && count >= 0 && begin + count <= shape[0],
             "slice [" << begin << ", " << begin + count << ") of " << shape[0] << " rows");
    Tensor t = *this;
    t.data = static_cast<char*>(data) + static_cast<size_t>(begin * stride[0]) * scalar_size(dtype);
    t.shape[0] = count;
    return t;
  }
  // The same contiguous elements under another shape.
  Tensor view(std::initializer_list<int64_t> dims) const {
    DG_CHECK(contiguous(), "view of a strided tensor");
    Tensor t = of(data, dtype, dims);
    DG_CHECK(t.numel() == numel(), "view of " << numel() << " elements as " << t.numel());
    return t;
  }
};

// Memory a backend allocated (host or device). read/write copy to and from host memory, so code
// that holds only the buffer (a KV cache copied out after its engine is gone) needs no backend.
class Buffer {
 public:
  Buffer(void* data, size_t bytes) : data_(data), bytes_(bytes) {}
  virtual ~Buffer() = default;
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;

  void* data() const { return data_; }
  size_t bytes() const { return bytes_; }
  virtual void read(size_t offset, size_t n, void* dst) const = 0;
  virtual void write(size_t offset, size_t n, const void* src) = 0;

 protected:
  void check_range(size_t offset, size_t n) const {
    DG_CHECK(offset <= bytes_ && n <= bytes_ - offset, "bytes [" << offset << ", " << offset + n << ") of a "
                                                                 << bytes_ << "-byte buffer");
  }

 private:
  void* data_;
  size_t bytes_;
};

}  // namespace dgemma
