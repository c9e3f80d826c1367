// Registry for the CUDA kernels' test entry points (dgemma_rt._core.cuda_ops): each
// csrc/bindings/cuda_<area>.cpp registers its functions with a static RegisterCudaOps, so adding a
// kernel family needs no edit here or in module.cpp. Compiled only when CUDA is enabled.
#pragma once

#include <cuda_runtime.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstring>
#include <string>
#include <vector>

#include "common/check.h"

namespace dgemma::kernels {
enum class W4A16Path : int;  // kernels/nvfp4/nvfp4.cuh
}

namespace dgemma::bindings {

// "auto", "mma" or "wgmma": the W4A16 grouped GEMM's kernel (cuda_nvfp4.cpp).
kernels::W4A16Path parse_w4a16_path(const std::string& path);

// numpy arguments as C-contiguous arrays of one dtype (bf16 travels as uint16 bit patterns).
template <typename T>
using CArray = pybind11::array_t<T, pybind11::array::c_style | pybind11::array::forcecast>;
using F32Array = CArray<float>;
using U16Array = CArray<uint16_t>;
using U8Array = CArray<uint8_t>;
using I32Array = CArray<int32_t>;

using CudaOpBinder = void (*)(pybind11::module_&);
std::vector<CudaOpBinder>& cuda_op_binders();

struct RegisterCudaOps {
  explicit RegisterCudaOps(CudaOpBinder f) { cuda_op_binders().push_back(f); }
};

#define DG_CUDA_CHECK(expr)                                                                      \
  do {                                                                                           \
    cudaError_t dg_err_ = (expr);                                                                \
    if (dg_err_ != cudaSuccess)                                                                  \
      DG_THROW(Error, #expr << " failed at " << __FILE__ << ":" << __LINE__ << ": "              \
                            << cudaGetErrorString(dg_err_));                                     \
  } while (0)

// A device allocation owned by the binding call; copies numpy arrays in and out.
template <typename T>
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(size_t n) : n_(n) {
    if (n) DG_CUDA_CHECK(cudaMalloc(&p_, n * sizeof(T)));
  }
  template <typename A>
  static DeviceBuffer from(const A& arr) {  // A: py::array_t<U, c_style | forcecast>, sizeof(U) == sizeof(T)
    static_assert(sizeof(typename A::value_type) == sizeof(T), "element size mismatch");
    DeviceBuffer b(static_cast<size_t>(arr.size()));
    if (b.n_) DG_CUDA_CHECK(cudaMemcpy(b.p_, arr.data(), b.n_ * sizeof(T), cudaMemcpyHostToDevice));
    return b;
  }
  DeviceBuffer(DeviceBuffer&& o) noexcept : p_(o.p_), n_(o.n_) { o.p_ = nullptr, o.n_ = 0; }
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    std::swap(p_, o.p_);
    std::swap(n_, o.n_);
    return *this;
  }
  ~DeviceBuffer() {
    if (p_) cudaFree(p_);
  }
  T* get() const { return p_; }
  size_t size() const { return n_; }
  template <typename U>
  void copy_to(U* host) const {
    static_assert(sizeof(U) == sizeof(T), "element size mismatch");
    if (n_) DG_CUDA_CHECK(cudaMemcpy(host, p_, n_ * sizeof(T), cudaMemcpyDeviceToHost));
  }

 private:
  T* p_ = nullptr;
  size_t n_ = 0;
};

}  // namespace dgemma::bindings
