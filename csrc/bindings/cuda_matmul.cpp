// Test entry points for kernels/matmul (bf16 travels as uint16 bit patterns).
#include <cuda_bf16.h>

#include <cstdint>

#include "bindings/cuda_ops.h"
#include "kernels/matmul/matmul.cuh"

namespace py = pybind11;

namespace dgemma::bindings {
namespace {

using bf16 = __nv_bfloat16;

// x: uint16 [M, K]; w: uint16 [N, K], [K, N] (w_kn) or [G, N, K] (offsets: int32 [G + 1]).
// Returns y [M, N]: float32 if y_f32, else uint16 (bf16 bits).
py::array matmul_bf16(U16Array x, U16Array w, bool w_kn, bool y_f32, float alpha, float softcap, int split_k,
                      py::object offsets) {
  DG_REQUIRE(x.ndim() == 2, InvalidArgument, "x must be [M, K]");
  const int64_t M = x.shape(0), K = x.shape(1);
  kernels::MatmulParams p;
  DeviceBuffer<int32_t> doff;
  int64_t N = 0;
  if (!offsets.is_none()) {
    auto off = I32Array::ensure(offsets);
    DG_REQUIRE(off && off.ndim() == 1 && off.shape(0) >= 2, InvalidArgument, "offsets must be int32 [G + 1]");
    DG_REQUIRE(w.ndim() == 3 && w.shape(0) == off.shape(0) - 1 && w.shape(2) == K, InvalidArgument,
               "grouped w must be [G, N, K]");
    N = w.shape(1);
    p.G = static_cast<int>(off.shape(0) - 1);
    doff = DeviceBuffer<int32_t>::from(off);
    p.offsets = doff.get();
  } else {
    DG_REQUIRE(w.ndim() == 2 && w.shape(w_kn ? 0 : 1) == K, InvalidArgument,
               (w_kn ? "w must be [K, N]" : "w must be [N, K]"));
    N = w.shape(w_kn ? 1 : 0);
  }
  auto dx = DeviceBuffer<bf16>::from(x);
  auto dw = DeviceBuffer<bf16>::from(w);
  DeviceBuffer<float> dyf(y_f32 ? static_cast<size_t>(M * N) : 0);
  DeviceBuffer<bf16> dyh(y_f32 ? 0 : static_cast<size_t>(M * N));
  p.x = dx.get(), p.w = dw.get(), p.y = y_f32 ? static_cast<void*>(dyf.get()) : static_cast<void*>(dyh.get());
  p.y_f32 = y_f32, p.w_kn = w_kn, p.M = M, p.N = N, p.K = K, p.alpha = alpha, p.softcap = softcap;
  p.split_k = split_k;
  const size_t ws_bytes = kernels::matmul_workspace_bytes(p);
  DeviceBuffer<float> ws(ws_bytes / sizeof(float));
  p.workspace = ws.get(), p.workspace_bytes = ws_bytes;
  DG_CUDA_CHECK(kernels::matmul_bf16(p, nullptr));
  DG_CUDA_CHECK(cudaDeviceSynchronize());
  if (y_f32) {
    F32Array y({M, N});
    dyf.copy_to(y.mutable_data());
    return std::move(y);
  }
  U16Array y({M, N});
  dyh.copy_to(y.mutable_data());
  return std::move(y);
}

// Whether matmul_bf16 answers cudaErrorInvalidValue for these params (its host-side validation). x, w, y,
// offsets and the workspace point into one zeroed 1 MiB buffer (x null when null_x), so a shape that passes
// may run harmlessly: small shapes only. Zeroed offsets make every group empty (w[g] is never read).
bool matmul_bf16_rejects(int64_t M, int64_t N, int64_t K, int split_k, int G, bool w_kn, bool null_x,
                         size_t workspace_bytes) {
  constexpr size_t kBytes = size_t{1} << 20;
  const auto fits = [](int64_t a, int64_t b) { return a <= 0 || b <= 0 || a * b <= int64_t{1} << 16; };
  DG_REQUIRE(fits(M, K) && fits(N, K) && fits(M, N * (split_k > 1 ? split_k : 1)) &&
                 workspace_bytes <= kBytes,
             InvalidArgument, "small shapes only");
  DeviceBuffer<uint8_t> buf(kBytes);
  DG_CUDA_CHECK(cudaMemset(buf.get(), 0, kBytes));
  void* d = buf.get();
  kernels::MatmulParams p;
  p.x = null_x ? nullptr : static_cast<const bf16*>(d), p.w = static_cast<const bf16*>(d), p.y = d;
  p.offsets = G > 0 ? static_cast<const int32_t*>(d) : nullptr;
  p.M = M, p.N = N, p.K = K, p.split_k = split_k, p.G = G, p.w_kn = w_kn;
  p.workspace = workspace_bytes ? d : nullptr, p.workspace_bytes = workspace_bytes;
  const cudaError_t e = kernels::matmul_bf16(p, nullptr);
  DG_CUDA_CHECK(cudaDeviceSynchronize());
  if (e != cudaSuccess && e != cudaErrorInvalidValue) DG_CUDA_CHECK(e);
  return e == cudaErrorInvalidValue;
}

RegisterCudaOps reg([](py::module_& m) {
  m.def("matmul_bf16", &matmul_bf16, py::arg("x"), py::arg("w"), py::arg("w_kn") = false, py::arg("y_f32") = false,
        py::arg("alpha") = 1.0f, py::arg("softcap") = 0.0f, py::arg("split_k") = 1, py::arg("offsets") = py::none());
  m.def("matmul_bf16_rejects", &matmul_bf16_rejects, py::arg("M"), py::arg("N"), py::arg("K"),
        py::arg("split_k") = 1, py::arg("G") = 0, py::arg("w_kn") = false, py::arg("null_x") = false,
        py::arg("workspace_bytes") = 0);
  m.def("matmul_pick_split_k", &kernels::matmul_pick_split_k, py::arg("M"), py::arg("N"), py::arg("K"));
  m.def("matmul_workspace_bytes", [](int64_t M, int64_t N, int split_k) {
    kernels::MatmulParams p;
    p.M = M, p.N = N, p.split_k = split_k;
    return kernels::matmul_workspace_bytes(p);
  });
});

}  // namespace
}  // namespace dgemma::bindings
