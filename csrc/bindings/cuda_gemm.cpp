// Test entry points for kernels/gemm (bf16 travels as uint16 bit patterns), plus device_capability().
#include <cuda_bf16.h>

#include <utility>

#include "bindings/cuda_ops.h"
#include "kernels/gemm/gemm.cuh"
#include "kernels/gemm/params_cache.h"

namespace py = pybind11;

namespace dgemma::bindings {
namespace {

std::pair<int, int> device_capability() {
  int dev = 0, major = 0, minor = 0;
  DG_CUDA_CHECK(cudaGetDevice(&dev));
  DG_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  DG_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev));
  return {major, minor};
}

#if defined(DGEMMA_WITH_CUTLASS)

void require_gemm_shape(int N, int K) {
  DG_REQUIRE(N % 8 == 0 && K % 8 == 0 && K > 0, InvalidArgument,
             "bf16 GEMM needs N and K to be multiples of 8 (16-byte TMA rows), got N=" << N << " K=" << K);
  DG_REQUIRE(kernels::sm90_gemm_supported(), Error,
             "the CUTLASS bf16 GEMMs need an sm_90 device and a build for sm_90a");
}

// With `cached`, the GEMM runs twice through one ParamsCache, the output zeroed in between: what
// comes back is the second launch's, made from the Params the first one prepared.
template <class Params, class Run>
void run_maybe_cached(Params& p, Run run, void* out, size_t out_bytes, bool cached) {
  kernels::ParamsCache cache;
  if (cached) {
    p.cache = &cache;
    DG_CUDA_CHECK(run(p));
    if (out_bytes == 0) return;  // an empty product may launch nothing
    DG_CUDA_CHECK(cudaMemset(out, 0, out_bytes));
    DG_REQUIRE(cache.size() == 1, Error, "the first launch left " << cache.size() << " prepared launches, expected 1");
  }
  DG_CUDA_CHECK(run(p));
}

U16Array gemm_bf16_tn(U16Array x, U16Array w, bool cached) {
  DG_REQUIRE(x.ndim() == 2 && w.ndim() == 2, InvalidArgument, "x must be [M, K] and w [N, K]");
  const int M = static_cast<int>(x.shape(0)), K = static_cast<int>(x.shape(1)), N = static_cast<int>(w.shape(0));
  DG_REQUIRE(w.shape(1) == K, InvalidArgument, "w must be [N, " << K << "], got [" << N << ", " << w.shape(1) << "]");
  require_gemm_shape(N, K);
  auto dx = DeviceBuffer<__nv_bfloat16>::from(x);
  auto dw = DeviceBuffer<__nv_bfloat16>::from(w);
  DeviceBuffer<__nv_bfloat16> dy(static_cast<size_t>(M) * N);
  kernels::GemmBf16Params p;
  p.x = dx.get(), p.w = dw.get(), p.y = dy.get(), p.M = M, p.N = N, p.K = K;
  run_maybe_cached(p, [](const kernels::GemmBf16Params& q) { return kernels::gemm_bf16_tn(q, nullptr); }, dy.get(),
                   static_cast<size_t>(M) * N * 2, cached);
  DG_CUDA_CHECK(cudaDeviceSynchronize());
  U16Array y({M, N});
  dy.copy_to(y.mutable_data());
  return y;
}

F32Array gemm_bf16_tn_logits(U16Array x, U16Array w, float alpha, float softcap, bool cached) {
  DG_REQUIRE(x.ndim() == 2 && w.ndim() == 2, InvalidArgument, "x must be [M, K] and w [N, K]");
  const int M = static_cast<int>(x.shape(0)), K = static_cast<int>(x.shape(1)), N = static_cast<int>(w.shape(0));
  DG_REQUIRE(w.shape(1) == K, InvalidArgument, "w must be [N, " << K << "], got [" << N << ", " << w.shape(1) << "]");
  DG_REQUIRE(softcap >= 0.f, InvalidArgument, "softcap must be >= 0 (0: none), got " << softcap);
  require_gemm_shape(N, K);
  auto dx = DeviceBuffer<__nv_bfloat16>::from(x);
  auto dw = DeviceBuffer<__nv_bfloat16>::from(w);
  DeviceBuffer<float> dy(static_cast<size_t>(M) * N);
  kernels::GemmLogitsParams p;
  p.x = dx.get(), p.w = dw.get(), p.y = dy.get(), p.M = M, p.N = N, p.K = K, p.alpha = alpha, p.softcap = softcap;
  run_maybe_cached(p, [](const kernels::GemmLogitsParams& q) { return kernels::gemm_bf16_tn_logits(q, nullptr); },
                   dy.get(), static_cast<size_t>(M) * N * 4, cached);
  DG_CUDA_CHECK(cudaDeviceSynchronize());
  F32Array y({M, N});
  dy.copy_to(y.mutable_data());
  return y;
}

U16Array grouped_gemm_bf16_tn(U16Array a, U16Array w, I32Array offsets, bool cached) {
  DG_REQUIRE(a.ndim() == 2 && w.ndim() == 3 && offsets.ndim() == 1, InvalidArgument,
             "a must be [Mtot, K], w [G, N, K], offsets [G + 1]");
  const int Mtot = static_cast<int>(a.shape(0)), K = static_cast<int>(a.shape(1));
  const int G = static_cast<int>(w.shape(0)), N = static_cast<int>(w.shape(1));
  DG_REQUIRE(w.shape(2) == K, InvalidArgument, "w must be [G, N, " << K << "]");
  DG_REQUIRE(offsets.shape(0) == G + 1, InvalidArgument, "offsets must be [G + 1] = [" << G + 1 << "]");
  const int32_t* o = offsets.data();
  DG_REQUIRE(G >= 1 && o[0] == 0 && o[G] == Mtot, InvalidArgument, "offsets must start at 0 and end at Mtot");
  for (int g = 0; g < G; ++g) DG_REQUIRE(o[g] <= o[g + 1], InvalidArgument, "offsets must be non-decreasing");
  require_gemm_shape(N, K);
  auto da = DeviceBuffer<__nv_bfloat16>::from(a);
  auto dw = DeviceBuffer<__nv_bfloat16>::from(w);
  auto doff = DeviceBuffer<int32_t>::from(offsets);
  DeviceBuffer<__nv_bfloat16> dd(static_cast<size_t>(Mtot) * N);
  const size_t ws_bytes = kernels::grouped_gemm_bf16_tn_workspace_size(G);
  DeviceBuffer<unsigned char> ws(ws_bytes);
  kernels::GroupedGemmBf16Params p;
  p.a = da.get(), p.w = dw.get(), p.d = dd.get(), p.offsets = doff.get();
  p.G = G, p.N = N, p.K = K, p.workspace = ws.get(), p.workspace_bytes = ws_bytes;
  run_maybe_cached(p, [](const kernels::GroupedGemmBf16Params& q) { return kernels::grouped_gemm_bf16_tn(q, nullptr); },
                   dd.get(), static_cast<size_t>(Mtot) * N * 2, cached);
  DG_CUDA_CHECK(cudaDeviceSynchronize());
  U16Array d({Mtot, N});
  dd.copy_to(d.mutable_data());
  return d;
}

#endif  // DGEMMA_WITH_CUTLASS

RegisterCudaOps reg([](py::module_& m) {
  m.def("device_capability", &device_capability, "(major, minor) compute capability of the current device");
#if defined(DGEMMA_WITH_CUTLASS)
  m.def("gemm_bf16_tn", &gemm_bf16_tn, py::arg("x"), py::arg("w"), py::arg("cached") = false,
        "y[M, N] = x[M, K] @ w[N, K]^T in bf16 (uint16 bit patterns), fp32 accumulation; sm_90 only. cached: "
        "the result of a second launch from prepared Params (a ParamsCache hit)");
  m.def("gemm_bf16_tn_logits", &gemm_bf16_tn_logits, py::arg("x"), py::arg("w"), py::arg("alpha") = 1.f,
        py::arg("softcap") = 0.f, py::arg("cached") = false,
        "y f32 [M, N] = softcap(alpha * x[M, K] @ w[N, K]^T) (the LM head's logits GEMM; bf16 in as uint16); "
        "sm_90 only. cached: as for gemm_bf16_tn");
  m.def("grouped_gemm_bf16_tn", &grouped_gemm_bf16_tn, py::arg("a"), py::arg("w"), py::arg("offsets"),
        py::arg("cached") = false,
        "d[o_g:o_g+1] = a[o_g:o_g+1] @ w[g]^T for each group g, bf16 as uint16; sm_90 only. cached: as for "
        "gemm_bf16_tn");
#endif
});

}  // namespace
}  // namespace dgemma::bindings
