// Test entry points for the FP8 dense path: kernels/fp8 (activation quantization) and the sm_90a
// W8A8 GEMM (kernels/gemm). bf16 travels as uint16 bit patterns, E4M3 as uint8 codes.
#include <cuda_bf16.h>

#include <cmath>
#include <tuple>

#include "bindings/cuda_ops.h"
#include "common/nvfp4_format.h"
#include "kernels/fp8/fp8.cuh"
#include "kernels/gemm/gemm.cuh"

namespace py = pybind11;

namespace dgemma::bindings {
namespace {

// The kernel's per-row arithmetic run on the host (float32 in): the CPU check of its rounding.
std::tuple<U8Array, F32Array> quantize_rows_host(F32Array x) {
  DG_REQUIRE(x.ndim() == 2, InvalidArgument, "x must be [M, K]");
  const py::ssize_t M = x.shape(0), K = x.shape(1);
  U8Array q({M, K});
  F32Array scale({M});
  const float* src = x.data();
  uint8_t* dq = q.mutable_data();
  float* ds = scale.mutable_data();
  for (py::ssize_t r = 0; r < M; ++r) {
    float m = 0.0f;
    for (py::ssize_t i = 0; i < K; ++i) m = nvfp4::fp8_amax(m, src[r * K + i]);
    ds[r] = nvfp4::fp8_row_scale(m);
    for (py::ssize_t i = 0; i < K; ++i)
      dq[r * K + i] = static_cast<uint8_t>(nvfp4::e4m3_from_float_signed(src[r * K + i] / ds[r]));
  }
  return {q, scale};
}

std::tuple<U8Array, F32Array> quantize_rows(U16Array x) {
  DG_REQUIRE(x.ndim() == 2 && x.shape(1) > 0, InvalidArgument, "x must be [M, K] with K > 0");
  const int M = static_cast<int>(x.shape(0)), K = static_cast<int>(x.shape(1));
  auto dx = DeviceBuffer<__nv_bfloat16>::from(x);
  DeviceBuffer<uint8_t> dq(static_cast<size_t>(M) * K);
  DeviceBuffer<float> ds(static_cast<size_t>(M));
  kernels::QuantizeRowsFp8Params p;
  p.x = dx.get(), p.q = dq.get(), p.scale = ds.get(), p.M = M, p.K = K;
  DG_CUDA_CHECK(kernels::quantize_rows_fp8(p, nullptr));
  DG_CUDA_CHECK(cudaDeviceSynchronize());
  U8Array q({M, K});
  F32Array scale({M});
  dq.copy_to(q.mutable_data());
  ds.copy_to(scale.mutable_data());
  return {q, scale};
}

#if defined(DGEMMA_WITH_CUTLASS)
U16Array gemm_fp8(U8Array x, F32Array x_scale, U8Array w, F32Array w_scale) {
  DG_REQUIRE(x.ndim() == 2 && w.ndim() == 2 && x_scale.ndim() == 1 && w_scale.ndim() == 1, InvalidArgument,
             "x must be [M, K], x_scale [M], w [N, K], w_scale [N]");
  const int M = static_cast<int>(x.shape(0)), K = static_cast<int>(x.shape(1)), N = static_cast<int>(w.shape(0));
  DG_REQUIRE(w.shape(1) == K && x_scale.shape(0) == M && w_scale.shape(0) == N, InvalidArgument,
             "shapes disagree: x [" << M << ", " << K << "], w [" << N << ", " << w.shape(1) << "], x_scale ["
                                    << x_scale.shape(0) << "], w_scale [" << w_scale.shape(0) << "]");
  DG_REQUIRE(K > 0 && K % 16 == 0 && N % 8 == 0, InvalidArgument, "need K % 16 == 0 and N % 8 == 0");
  DG_REQUIRE(kernels::sm90_gemm_supported(), Error, "gemm_fp8 needs an sm_90 device and a build for sm_90a");
  auto dx = DeviceBuffer<uint8_t>::from(x);
  auto dxs = DeviceBuffer<float>::from(x_scale);
  auto dw = DeviceBuffer<uint8_t>::from(w);
  auto dws = DeviceBuffer<float>::from(w_scale);
  DeviceBuffer<__nv_bfloat16> dy(static_cast<size_t>(M) * N);
  kernels::GemmFp8Params p;
  p.x = dx.get(), p.x_scale = dxs.get(), p.w = dw.get(), p.w_scale = dws.get(), p.y = dy.get();
  p.M = M, p.N = N, p.K = K;
  DG_CUDA_CHECK(kernels::gemm_fp8_tn(p, nullptr));
  DG_CUDA_CHECK(cudaDeviceSynchronize());
  U16Array y({M, N});
  dy.copy_to(y.mutable_data());
  return y;
}
#endif

RegisterCudaOps reg([](py::module_& m) {
  m.def("fp8_quantize_rows_host", &quantize_rows_host, py::arg("x"),
        "the FP8 row quantization's arithmetic on the host: (E4M3 codes [M, K], scale per row [M])");
  m.def("quantize_rows_fp8", &quantize_rows, py::arg("x"),
        "bf16 (uint16) [M, K] -> (E4M3 codes [M, K], scale per row [M]) on the GPU");
#if defined(DGEMMA_WITH_CUTLASS)
  m.def("gemm_fp8", &gemm_fp8, py::arg("x"), py::arg("x_scale"), py::arg("w"), py::arg("w_scale"),
        "W8A8 GEMM (sm_90a): (x @ w^T) * x_scale[:, None] * w_scale[None, :], bf16 (uint16) out");
#endif
});

}  // namespace
}  // namespace dgemma::bindings
