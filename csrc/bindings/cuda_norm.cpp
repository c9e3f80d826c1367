// Test entry point for kernels/norm.
#include <cuda_bf16.h>

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

RegisterCudaOps reg([](py::module_& m) {
  m.def("rmsnorm_f32", &rmsnorm_f32, py::arg("x"), py::arg("weight") = py::none(), py::arg("eps") = 1e-6f);
});

}  // namespace
}  // namespace dgemma::bindings
