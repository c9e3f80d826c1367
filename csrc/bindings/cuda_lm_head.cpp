// Test entry point for kernels/sampler/lm_head_fused (the fused LM head + sampler + soft embedding).
#include <cuda_bf16.h>

#include "bindings/cuda_ops.h"
#include "kernels/sampler/lm_head_fused.cuh"

namespace py = pybind11;

namespace dgemma::bindings {
namespace {

// x bf16 bits uint16 [P, H], emb bf16 bits uint16 [V, H], temperature f32 [P / n], uniform f64 [P],
// soft_index i32 [P] (-1: skip), soft_rows: rows of the soft output.
// Returns (token i32 [P], argmax i32 [P], entropy f32 [P], soft bf16 bits uint16 [soft_rows, H],
// fallback i32 [P]: 1 where the exact fallback drew the token). Unwritten soft rows stay 0xFFFF.
py::tuple lm_head_sample_fused(U16Array x, U16Array emb, int n, float softcap, CArray<float> temperature,
                               CArray<double> uniform, I32Array soft_index, int soft_rows, float soft_scale) {
  DG_REQUIRE(x.ndim() == 2 && emb.ndim() == 2 && x.shape(1) == emb.shape(1), InvalidArgument,
             "x must be [P, H] and emb [V, H]");
  const int P = static_cast<int>(x.shape(0)), H = static_cast<int>(x.shape(1)), V = static_cast<int>(emb.shape(0));
  DG_REQUIRE(n > 0 && P % n == 0 && temperature.ndim() == 1 && temperature.shape(0) == P / n, InvalidArgument,
             "temperature must be [P / n]");
  DG_REQUIRE(uniform.ndim() == 1 && uniform.shape(0) == P, InvalidArgument, "uniform must be [P]");
  DG_REQUIRE(soft_index.ndim() == 1 && soft_index.shape(0) == P, InvalidArgument, "soft_index must be [P]");
  DG_REQUIRE(soft_rows >= 0, InvalidArgument, "soft_rows must be >= 0");
  auto dx = DeviceBuffer<__nv_bfloat16>::from(x);
  auto de = DeviceBuffer<__nv_bfloat16>::from(emb);
  auto dtemp = DeviceBuffer<float>::from(temperature);
  auto duni = DeviceBuffer<double>::from(uniform);
  auto dsi = DeviceBuffer<int32_t>::from(soft_index);
  DeviceBuffer<int32_t> dtok(P), dam(P), dfb(P);
  DeviceBuffer<float> dent(P);
  DeviceBuffer<__nv_bfloat16> dsoft(static_cast<size_t>(soft_rows) * H);
  if (dsoft.size()) DG_CUDA_CHECK(cudaMemset(dsoft.get(), 0xFF, dsoft.size() * 2));
  const size_t wsb = kernels::lm_head_sample_workspace_bytes(P, H, V);
  DeviceBuffer<unsigned char> dws(wsb);

  kernels::LmHeadSampleParams p;
  p.x = dx.get();
  p.emb = de.get();
  p.P = P, p.H = H, p.V = V, p.n = n;
  p.softcap = softcap;
  p.temperature = dtemp.get();
  p.uniform = duni.get();
  p.token = dtok.get();
  p.argmax = dam.get();
  p.entropy = dent.get();
  p.soft = dsoft.get();
  p.soft_index = dsi.get();
  p.soft_scale = soft_scale;
  p.workspace = dws.get();
  p.workspace_bytes = wsb;
  p.fallback = dfb.get();
  DG_CUDA_CHECK(kernels::lm_head_sample_fused(p, nullptr));
  DG_CUDA_CHECK(cudaDeviceSynchronize());

  py::array_t<int32_t> tok(P), am(P), fb(P);
  py::array_t<float> ent(P);
  py::array_t<uint16_t> soft({soft_rows, H});
  dtok.copy_to(tok.mutable_data());
  dam.copy_to(am.mutable_data());
  dent.copy_to(ent.mutable_data());
  dfb.copy_to(fb.mutable_data());
  dsoft.copy_to(soft.mutable_data());
  return py::make_tuple(tok, am, ent, soft, fb);
}

RegisterCudaOps reg([](py::module_& m) {
  m.def("lm_head_sample_fused", &lm_head_sample_fused, py::arg("x"), py::arg("emb"), py::arg("n"),
        py::arg("softcap"), py::arg("temperature"), py::arg("uniform"), py::arg("soft_index"), py::arg("soft_rows"),
        py::arg("soft_scale"));
  m.def("lm_head_sample_splits", &kernels::lm_head_sample_splits, py::arg("P"), py::arg("V"));
});

}  // namespace
}  // namespace dgemma::bindings
