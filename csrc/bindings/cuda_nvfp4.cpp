// Test entry point for kernels/nvfp4 (bf16 travels as uint16 bit patterns, E4M3 as uint8 codes).
#include <cuda_bf16.h>

#include "bindings/cuda_ops.h"
#include "kernels/nvfp4/nvfp4.cuh"

namespace py = pybind11;

namespace dgemma::bindings {
namespace {

U16Array grouped_gemm_nvfp4(U16Array x, U8Array w, U8Array w_scale, F32Array w_global, I32Array offsets) {
  DG_REQUIRE(x.ndim() == 2 && w.ndim() == 3 && w_scale.ndim() == 3 && w_global.ndim() == 1 && offsets.ndim() == 1,
             InvalidArgument, "x must be [Mtot, K], w [G, N, K/2], w_scale [G, N, K/16], w_global [G], offsets [G+1]");
  const int Mtot = static_cast<int>(x.shape(0)), K = static_cast<int>(x.shape(1));
  const int G = static_cast<int>(w.shape(0)), N = static_cast<int>(w.shape(1));
  DG_REQUIRE(K % 16 == 0 && K > 0, InvalidArgument, "K must be a positive multiple of 16, got " << K);
  DG_REQUIRE(w.shape(2) == K / 2, InvalidArgument, "w must be [G, N, " << K / 2 << "]");
  DG_REQUIRE(w_scale.shape(0) == G && w_scale.shape(1) == N && w_scale.shape(2) == K / 16, InvalidArgument,
             "w_scale must be [" << G << ", " << N << ", " << K / 16 << "]");
  DG_REQUIRE(w_global.shape(0) == G && offsets.shape(0) == G + 1, InvalidArgument,
             "w_global must be [G] and offsets [G + 1]");
  const int32_t* o = offsets.data();
  DG_REQUIRE(o[0] == 0 && o[G] == Mtot, InvalidArgument, "offsets must start at 0 and end at Mtot");
  for (int g = 0; g < G; ++g) DG_REQUIRE(o[g] <= o[g + 1], InvalidArgument, "offsets must be non-decreasing");
  auto dx = DeviceBuffer<__nv_bfloat16>::from(x);
  auto dw = DeviceBuffer<uint8_t>::from(w);
  auto ds = DeviceBuffer<uint8_t>::from(w_scale);
  auto dg = DeviceBuffer<float>::from(w_global);
  auto doff = DeviceBuffer<int32_t>::from(offsets);
  DeviceBuffer<__nv_bfloat16> dy(static_cast<size_t>(Mtot) * N);
  kernels::GroupedGemmNvfp4Params p;
  p.x = dx.get(), p.w = dw.get(), p.w_scale = ds.get(), p.w_global = dg.get(), p.offsets = doff.get();
  p.y = dy.get(), p.G = G, p.N = N, p.K = K;
  if (Mtot > 0) {
    DG_CUDA_CHECK(kernels::grouped_gemm_nvfp4(p, nullptr));
    DG_CUDA_CHECK(cudaDeviceSynchronize());
  }
  U16Array y({Mtot, N});
  dy.copy_to(y.mutable_data());
  return y;
}

RegisterCudaOps reg([](py::module_& m) {
  m.def("grouped_gemm_nvfp4", &grouped_gemm_nvfp4, py::arg("x"), py::arg("w"), py::arg("w_scale"),
        py::arg("w_global"), py::arg("offsets"),
        "y[o_g:o_g+1] = x[o_g:o_g+1] @ dequant(W_g)^T: NVFP4 weights, bf16 activations (uint16) in and out");
});

}  // namespace
}  // namespace dgemma::bindings
