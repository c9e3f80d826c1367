// Test entry points for the row moves of kernels/layer/rows.cu. Rows are raw bytes, so any numpy dtype
// works; `shift` bytes of offset on the device pointers exercise the narrower copy paths.
#include <cuda_bf16.h>

#include <cstdint>

#include "bindings/cuda_ops.h"
#include "kernels/layer/layer.cuh"

namespace py = pybind11;

namespace dgemma::bindings {
namespace {

using bf16 = __nv_bfloat16;
using CAny = py::array;

// A device copy of a C-contiguous array's bytes, starting `shift` bytes into the allocation.
struct RawDevice {
  DeviceBuffer<uint8_t> buf;
  uint8_t* p = nullptr;
  size_t bytes = 0;
};
RawDevice raw_device(const py::array& a, size_t shift) {
  DG_REQUIRE(a.flags() & py::array::c_style, InvalidArgument, "arrays must be C-contiguous");
  RawDevice r{DeviceBuffer<uint8_t>(static_cast<size_t>(a.nbytes()) + shift + 16), nullptr,
              static_cast<size_t>(a.nbytes())};
  r.p = r.buf.get() + shift;
  if (r.bytes) DG_CUDA_CHECK(cudaMemcpy(r.p, a.data(), r.bytes, cudaMemcpyHostToDevice));
  return r;
}

// gather (scatter false): returns dst with dst[i] = src[index[i]]; scatter: dst[index[i]] = src[i].
// dst is the initial destination (scatter: its rows not written stay as they are; gather writes every row).
py::array move_rows(const py::array& src, I32Array index, const py::array& dst, bool scatter, size_t shift) {
  DG_REQUIRE(src.ndim() == 2 && dst.ndim() == 2 && src.dtype().is(dst.dtype()) && src.shape(1) == dst.shape(1),
             InvalidArgument, "src and dst must be 2-D of one dtype and row length");
  DG_REQUIRE(index.ndim() == 1 && index.shape(0) == (scatter ? src.shape(0) : dst.shape(0)), InvalidArgument,
             "index must have one entry per " << (scatter ? "src" : "dst") << " row");
  const py::ssize_t bound = scatter ? dst.shape(0) : src.shape(0);
  for (py::ssize_t i = 0; i < index.shape(0); ++i)
    DG_REQUIRE(index.data()[i] < bound, InvalidArgument, "index out of range");
  auto ds = raw_device(src, shift), dd = raw_device(dst, shift);
  auto di = DeviceBuffer<int32_t>::from(index);
  const int64_t m = index.shape(0), row_bytes = src.shape(1) * src.itemsize();
  DG_CUDA_CHECK(scatter ? kernels::scatter_rows(ds.p, di.get(), dd.p, m, row_bytes, nullptr)
                        : kernels::gather_rows(ds.p, di.get(), dd.p, m, row_bytes, nullptr));
  DG_CUDA_CHECK(cudaDeviceSynchronize());
  py::array out(dst.dtype(), {dst.shape(0), dst.shape(1)});
  if (dd.bytes) DG_CUDA_CHECK(cudaMemcpy(out.mutable_data(), dd.p, dd.bytes, cudaMemcpyDeviceToHost));
  return out;
}

// dst f32 [R, d] += rows of src (bf16 bits, [m, d]) at index; returns the new dst.
F32Array scatter_add_rows(F32Array dst, U16Array src, I32Array index, size_t shift) {
  DG_REQUIRE(dst.ndim() == 2 && src.ndim() == 2 && dst.shape(1) == src.shape(1), InvalidArgument,
             "dst [R, d], src [m, d]");
  DG_REQUIRE(index.ndim() == 1 && index.shape(0) == src.shape(0), InvalidArgument, "index must be [m]");
  for (py::ssize_t i = 0; i < index.shape(0); ++i)
    DG_REQUIRE(index.data()[i] < dst.shape(0), InvalidArgument, "index out of range");
  auto dd = raw_device(dst, shift * 4), ds = raw_device(src, shift * 2);
  auto di = DeviceBuffer<int32_t>::from(index);
  DG_CUDA_CHECK(kernels::scatter_add_rows(reinterpret_cast<float*>(dd.p), reinterpret_cast<const bf16*>(ds.p),
                                          di.get(), src.shape(0), src.shape(1), nullptr));
  DG_CUDA_CHECK(cudaDeviceSynchronize());
  F32Array out({dst.shape(0), dst.shape(1)});
  if (dd.bytes) DG_CUDA_CHECK(cudaMemcpy(out.mutable_data(), dd.p, dd.bytes, cudaMemcpyDeviceToHost));
  return out;
}

// The status code of a call with the given sizes on null pointers (validation only): 1 if invalid.
int rows_rejects(const std::string& op, int64_t m, int64_t size) {
  cudaError_t e;
  if (op == "gather")
    e = kernels::gather_rows(nullptr, nullptr, nullptr, m, size, nullptr);
  else if (op == "scatter")
    e = kernels::scatter_rows(nullptr, nullptr, nullptr, m, size, nullptr);
  else
    e = kernels::scatter_add_rows(nullptr, nullptr, nullptr, m, size, nullptr);
  return e == cudaErrorInvalidValue;
}

RegisterCudaOps reg([](py::module_& m) {
  m.def("gather_rows", [](const CAny& src, I32Array index, const CAny& dst, size_t shift) {
    return move_rows(src, index, dst, false, shift);
  }, py::arg("src"), py::arg("index"), py::arg("dst"), py::arg("shift") = 0);
  m.def("scatter_rows", [](const CAny& src, I32Array index, const CAny& dst, size_t shift) {
    return move_rows(src, index, dst, true, shift);
  }, py::arg("src"), py::arg("index"), py::arg("dst"), py::arg("shift") = 0);
  m.def("scatter_add_rows", &scatter_add_rows, py::arg("dst"), py::arg("src"), py::arg("index"),
        py::arg("shift") = 0);
  m.def("rows_rejects", &rows_rejects, py::arg("op"), py::arg("m"), py::arg("size"));
});

}  // namespace
}  // namespace dgemma::bindings
