// Test entry point for kernels/norm.
#include <cuda_bf16.h>

#include <cstdint>
#include <type_traits>

#include "bindings/cuda_ops.h"
#include "kernels/norm/rmsnorm.cuh"

namespace py = pybind11;

namespace dgemma::bindings {
namespace {

py::array_t<float> rmsnorm_f32(F32Array x, py::object weight,
                               float eps) {
  DG_REQUIRE(x.ndim() == 2, InvalidArgument, "x must be 2-D [rows, dim]");
  const int rows = static_cast<int>(x.shape(0)), dim = static_cast<int>(x.shape(1));
  auto dx = DeviceBuffer<float>::from(x);
  DeviceBuffer<float> dw;
  if (!weight.is_none()) {
    auto w = F32Array::ensure(weight);
    DG_REQUIRE(w && w.ndim() == 1 && w.shape(0) == dim, InvalidArgument, "weight must be [dim]");
    dw = DeviceBuffer<float>::from(w);
  }
  DeviceBuffer<float> dy(static_cast<size_t>(rows) * dim);
  DG_CUDA_CHECK(kernels::rmsnorm<float>(dx.get(), dw.get(), dy.get(), rows, dim, eps, nullptr));
  DG_CUDA_CHECK(cudaDeviceSynchronize());
  py::array_t<float> y({rows, dim});
  dy.copy_to(y.mutable_data());
  return y;
}

bool is_u16(const py::array& a) { return a.dtype().kind() == 'u' && a.dtype().itemsize() == 2; }

template <typename Tx, typename Ty, typename AX>
py::array rmsnorm_mixed_run(const AX& x, const DeviceBuffer<float>& dw, float eps, bool in_place) {
  const int64_t rows = x.shape(0);
  const int dim = static_cast<int>(x.shape(1));
  auto dx = DeviceBuffer<Tx>::from(x);
  DeviceBuffer<Ty> dy(in_place ? 0 : static_cast<size_t>(rows) * dim);
  Ty* y = in_place ? reinterpret_cast<Ty*>(dx.get()) : dy.get();
  DG_CUDA_CHECK((kernels::rmsnorm_mixed<Tx, Ty>(dx.get(), dw.get(), y, rows, dim, eps, nullptr)));
  DG_CUDA_CHECK(cudaDeviceSynchronize());
  CArray<std::conditional_t<std::is_same_v<Ty, float>, float, uint16_t>> out({rows, static_cast<int64_t>(dim)});
  if constexpr (std::is_same_v<Tx, Ty>) {
    if (in_place) {
      dx.copy_to(out.mutable_data());
      return std::move(out);
    }
  }
  dy.copy_to(out.mutable_data());
  return std::move(out);
}

// x: float32 or uint16 (bf16 bits) [rows, dim]; out_bf16 picks y's dtype; in_place writes y over x (same
// dtypes only).
py::array rmsnorm_mixed(const py::array& x, py::object weight, float eps, bool out_bf16, bool in_place) {
  DG_REQUIRE(x.ndim() == 2, InvalidArgument, "x must be 2-D [rows, dim]");
  const bool in_bf16 = is_u16(x);
  DG_REQUIRE(!in_place || in_bf16 == out_bf16, InvalidArgument, "in place needs one dtype");
  DeviceBuffer<float> dw;
  if (!weight.is_none()) {
    auto w = F32Array::ensure(weight);
    DG_REQUIRE(w && w.ndim() == 1 && w.shape(0) == x.shape(1), InvalidArgument, "weight must be [dim]");
    dw = DeviceBuffer<float>::from(w);
  }
  using bf16 = __nv_bfloat16;
  if (in_bf16) {
    auto xa = U16Array::ensure(x);
    return out_bf16 ? rmsnorm_mixed_run<bf16, bf16>(xa, dw, eps, in_place)
                    : rmsnorm_mixed_run<bf16, float>(xa, dw, eps, in_place);
  }
  auto xa = F32Array::ensure(x);
  return out_bf16 ? rmsnorm_mixed_run<float, bf16>(xa, dw, eps, in_place)
                  : rmsnorm_mixed_run<float, float>(xa, dw, eps, in_place);
}

// 1 if rmsnorm_mixed rejects the sizes (null pointers unless rows == 0).
int rmsnorm_mixed_rejects(int64_t rows, int dim) {
  return kernels::rmsnorm_mixed<float, float>(nullptr, nullptr, nullptr, rows, dim, 1e-6f, nullptr) ==
         cudaErrorInvalidValue;
}

RegisterCudaOps reg([](py::module_& m) {
  m.def("rmsnorm_mixed", &rmsnorm_mixed, py::arg("x"), py::arg("weight") = py::none(), py::arg("eps") = 1e-6f,
        py::arg("out_bf16") = false, py::arg("in_place") = false);
  m.def("rmsnorm_mixed_rejects", &rmsnorm_mixed_rejects, py::arg("rows"), py::arg("dim"));
  m.def("rmsnorm_f32", &rmsnorm_f32, py::arg("x"), py::arg("weight") = py::none(), py::arg("eps") = 1e-6f);
});

}  // namespace
}  // namespace dgemma::bindings
