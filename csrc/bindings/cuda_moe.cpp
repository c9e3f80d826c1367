// Test entry points for kernels/moe (bf16 travels as uint16 bit patterns), and moe_forward: the whole
// routed-expert path of one layer (CpuBackend::moe_router + moe_experts) chained on the GPU, its GEMMs on the grouped GEMM.
#include <cuda_bf16.h>

#include <initializer_list>
#include <sstream>
#include <string>

#include "bindings/cuda_ops.h"
#include "kernels/moe/moe.cuh"
#include "kernels/norm/rmsnorm.cuh"
#if defined(DGEMMA_WITH_CUTLASS)
#include "kernels/gemm/gemm.cuh"
#endif

namespace py = pybind11;

namespace dgemma::bindings {
namespace {

bool is_u16(const py::array& a) { return a.dtype().kind() == 'u' && a.dtype().itemsize() == 2; }

template <typename A>
void require_shape(const A& a, std::initializer_list<py::ssize_t> shape, const char* name) {
  bool ok = a.ndim() == static_cast<py::ssize_t>(shape.size());
  int i = 0;
  for (py::ssize_t s : shape) ok = ok && a.shape(i++) == s;
  if (!ok) {
    std::ostringstream want;
    const char* sep = "";
    for (py::ssize_t s : shape) want << sep << s, sep = ", ";
    DG_THROW(InvalidArgument, name << " must have shape [" << want.str() << "]");
  }
}

// The router's scratch, filled with garbage: the router must not depend on its contents (in the
// backend it holds whatever the previous call, with another T, left there).
DeviceBuffer<unsigned char> router_workspace(int T, int E) {
  DeviceBuffer<unsigned char> ws(kernels::moe_router_workspace_bytes(T, E));
  if (ws.size()) DG_CUDA_CHECK(cudaMemset(ws.get(), 0xA5, ws.size()));
  return ws;
}

template <typename Tx, typename XArray>
py::tuple router_impl(const XArray& x, U16Array router_proj, F32Array router_scale, F32Array per_expert_scale,
                      int top_k, float eps) {
  DG_REQUIRE(x.ndim() == 2, InvalidArgument, "x must be [T, H]");
  const int T = static_cast<int>(x.shape(0)), H = static_cast<int>(x.shape(1));
  DG_REQUIRE(router_proj.ndim() == 2 && router_proj.shape(1) == H, InvalidArgument, "router_proj must be [E, H]");
  const int E = static_cast<int>(router_proj.shape(0));
  require_shape(router_scale, {H}, "router_scale");
  require_shape(per_expert_scale, {E}, "per_expert_scale");
  DG_REQUIRE(top_k >= 1 && top_k <= E && top_k <= 32, InvalidArgument, "top_k must be in [1, min(E, 32)]");
  auto dx = DeviceBuffer<Tx>::from(x);
  auto dproj = DeviceBuffer<__nv_bfloat16>::from(router_proj);
  auto dscale = DeviceBuffer<float>::from(router_scale);
  auto dpes = DeviceBuffer<float>::from(per_expert_scale);
  DeviceBuffer<int32_t> didx(static_cast<size_t>(T) * top_k);
  DeviceBuffer<float> dw(static_cast<size_t>(T) * top_k);
  auto ws = router_workspace(T, E);
  kernels::MoeRouterParams<Tx> p;
  p.x = dx.get(), p.router_proj = dproj.get(), p.router_scale = dscale.get(), p.per_expert_scale = dpes.get();
  p.topk_idx = didx.get(), p.topk_w = dw.get(), p.workspace = ws.get();
  p.T = T, p.H = H, p.E = E, p.k = top_k, p.eps = eps;
  // Twice: the second call runs on what the first left in the workspace.
  for (int call = 0; call < 2; ++call) DG_CUDA_CHECK(kernels::moe_router(p, nullptr));
  DG_CUDA_CHECK(cudaDeviceSynchronize());
  I32Array idx({T, top_k});
  F32Array w({T, top_k});
  didx.copy_to(idx.mutable_data());
  dw.copy_to(w.mutable_data());
  return py::make_tuple(idx, w);
}

py::tuple moe_router(py::array x, U16Array router_proj, F32Array router_scale, F32Array per_expert_scale, int top_k,
                     float eps) {
  if (is_u16(x)) return router_impl<__nv_bfloat16>(U16Array::ensure(x), router_proj, router_scale, per_expert_scale, top_k, eps);
  return router_impl<float>(F32Array::ensure(x), router_proj, router_scale, per_expert_scale, top_k, eps);
}

template <typename Tx, typename XArray>
py::tuple permute_impl(I32Array topk_idx, const XArray& x, int num_experts, const std::string& path, bool gather) {
  DG_REQUIRE(topk_idx.ndim() == 2, InvalidArgument, "topk_idx must be [T, k]");
  const int T = static_cast<int>(topk_idx.shape(0)), k = static_cast<int>(topk_idx.shape(1));
  DG_REQUIRE(x.ndim() == 2 && x.shape(0) == T, InvalidArgument, "x must be [T, H] with T = " << T);
  DG_REQUIRE(path == "auto" || path == "single" || path == "multi", InvalidArgument,
             "path must be 'auto', 'single' or 'multi'");
  const int H = static_cast<int>(x.shape(1)), E = num_experts;
  const int max_e = path == "single" ? 256 : 4096;
  DG_REQUIRE(k >= 1 && E >= 1 && E <= max_e && H >= 1, InvalidArgument,
             "need k >= 1, 1 <= num_experts <= " << max_e << ", H >= 1");
  const int32_t* id = topk_idx.data();
  for (py::ssize_t i = 0; i < topk_idx.size(); ++i)
    DG_REQUIRE(id[i] >= 0 && id[i] < E, InvalidArgument, "expert id " << id[i] << " out of [0, " << E << ")");
  const size_t n = static_cast<size_t>(T) * k;
  auto didx = DeviceBuffer<int32_t>::from(topk_idx);
  auto dx = DeviceBuffer<Tx>::from(x);
  DeviceBuffer<int32_t> dcounts(E), doffsets(E + 1), dperm(n), dinv(n);
  DeviceBuffer<__nv_bfloat16> dxp(gather ? n * H : 0);
  // Filled with a pattern: the multi-block path must not depend on its workspace's contents.
  DeviceBuffer<unsigned char> ws(path == "single" ? 0 : kernels::moe_permute_workspace_bytes(T, E, k));
  if (ws.size()) DG_CUDA_CHECK(cudaMemset(ws.get(), 0xA5, ws.size()));
  kernels::MoePermuteParams<Tx> p;
  p.topk_idx = didx.get(), p.x = dx.get(), p.expert_counts = dcounts.get(), p.expert_offsets = doffsets.get();
  p.perm_slot = dperm.get(), p.inv = dinv.get(), p.xp = gather ? dxp.get() : nullptr;
  p.workspace = ws.get();  // nullptr for 'single' and for T = 0
  p.T = T, p.H = H, p.E = E, p.k = k;
  if (path == "single")
    DG_CUDA_CHECK(kernels::moe_permute_single_block(p, nullptr));
  else if (path == "multi")
    DG_CUDA_CHECK(kernels::moe_permute_multi_block(p, nullptr));
  else
    DG_CUDA_CHECK(kernels::moe_permute(p, nullptr));
  DG_CUDA_CHECK(cudaDeviceSynchronize());
  I32Array counts(E), offsets(E + 1), perm(static_cast<py::ssize_t>(n)), inv(static_cast<py::ssize_t>(n));
  dcounts.copy_to(counts.mutable_data());
  doffsets.copy_to(offsets.mutable_data());
  dperm.copy_to(perm.mutable_data());
  dinv.copy_to(inv.mutable_data());
  if (!gather) return py::make_tuple(counts, offsets, perm, inv, py::none());
  U16Array xp({static_cast<py::ssize_t>(n), static_cast<py::ssize_t>(H)});
  dxp.copy_to(xp.mutable_data());
  return py::make_tuple(counts, offsets, perm, inv, xp);
}

py::tuple moe_permute(I32Array topk_idx, py::array x, int num_experts, const std::string& path, bool gather) {
  if (is_u16(x)) return permute_impl<__nv_bfloat16>(topk_idx, U16Array::ensure(x), num_experts, path, gather);
  return permute_impl<float>(topk_idx, F32Array::ensure(x), num_experts, path, gather);
}

U16Array moe_gelu_gate(U16Array h) {
  DG_REQUIRE(h.ndim() == 2 && h.shape(1) % 2 == 0 && h.shape(1) > 0, InvalidArgument, "h must be [M, 2I]");
  const int M = static_cast<int>(h.shape(0)), I = static_cast<int>(h.shape(1) / 2);
  auto dh = DeviceBuffer<__nv_bfloat16>::from(h);
  DeviceBuffer<__nv_bfloat16> dact(static_cast<size_t>(M) * I);
  kernels::MoeGeluGateParams p;
  p.h = dh.get(), p.act = dact.get(), p.M = M, p.I = I;
  DG_CUDA_CHECK(kernels::moe_gelu_gate(p, nullptr));
  DG_CUDA_CHECK(cudaDeviceSynchronize());
  U16Array act({M, I});
  dact.copy_to(act.mutable_data());
  return act;
}

template <typename To, typename OutArray>
OutArray combine_impl(U16Array dn, I32Array topk_idx, F32Array topk_w, I32Array inv) {
  DG_REQUIRE(topk_idx.ndim() == 2, InvalidArgument, "topk_idx must be [T, k]");
  const int T = static_cast<int>(topk_idx.shape(0)), k = static_cast<int>(topk_idx.shape(1));
  DG_REQUIRE(dn.ndim() == 2 && dn.shape(0) == static_cast<py::ssize_t>(T) * k, InvalidArgument, "dn must be [T*k, H]");
  const int H = static_cast<int>(dn.shape(1));
  DG_REQUIRE(k >= 1 && k <= 32, InvalidArgument, "k must be in [1, 32]");
  require_shape(topk_w, {T, k}, "topk_w");
  require_shape(inv, {static_cast<py::ssize_t>(T) * k}, "inv");
  for (py::ssize_t i = 0; i < inv.size(); ++i)
    DG_REQUIRE(inv.data()[i] >= 0 && inv.data()[i] < inv.size(), InvalidArgument, "inv out of range");
  auto ddn = DeviceBuffer<__nv_bfloat16>::from(dn);
  auto didx = DeviceBuffer<int32_t>::from(topk_idx);
  auto dw = DeviceBuffer<float>::from(topk_w);
  auto dinv = DeviceBuffer<int32_t>::from(inv);
  DeviceBuffer<To> dout(static_cast<size_t>(T) * H);
  kernels::MoeCombineParams<To> p;
  p.dn = ddn.get(), p.topk_idx = didx.get(), p.topk_w = dw.get(), p.inv = dinv.get(), p.out = dout.get();
  p.T = T, p.H = H, p.k = k;
  DG_CUDA_CHECK(kernels::moe_combine(p, nullptr));
  DG_CUDA_CHECK(cudaDeviceSynchronize());
  OutArray out({T, H});
  dout.copy_to(out.mutable_data());
  return out;
}

py::array moe_combine(U16Array dn, I32Array topk_idx, F32Array topk_w, I32Array inv, bool out_bf16) {
  if (out_bf16) return combine_impl<__nv_bfloat16, U16Array>(dn, topk_idx, topk_w, inv);
  return combine_impl<float, F32Array>(dn, topk_idx, topk_w, inv);
}

#if defined(DGEMMA_WITH_CUTLASS)
// Router on x, pre_feedforward_layernorm_2(x) -> permute -> gate_up -> GELU gate -> down -> combine.
// Everything stays on the stream; the only sync is the final copy back.
F32Array moe_forward(F32Array x, U16Array router_proj, F32Array router_scale, F32Array per_expert_scale,
                     F32Array ln2_weight, U16Array gate_up, U16Array down, int top_k, float eps) {
  DG_REQUIRE(x.ndim() == 2, InvalidArgument, "x must be [T, H]");
  const int T = static_cast<int>(x.shape(0)), H = static_cast<int>(x.shape(1));
  DG_REQUIRE(gate_up.ndim() == 3 && gate_up.shape(2) == H && gate_up.shape(1) % 2 == 0, InvalidArgument,
             "gate_up must be [E, 2I, H]");
  const int E = static_cast<int>(gate_up.shape(0)), I = static_cast<int>(gate_up.shape(1) / 2);
  require_shape(router_proj, {E, H}, "router_proj");
  require_shape(router_scale, {H}, "router_scale");
  require_shape(per_expert_scale, {E}, "per_expert_scale");
  require_shape(ln2_weight, {H}, "ln2_weight");
  require_shape(down, {E, H, I}, "down");
  DG_REQUIRE(top_k >= 1 && top_k <= E && top_k <= 32 && E <= 256, InvalidArgument,
             "need 1 <= top_k <= min(E, 32) and E <= 256");
  DG_REQUIRE(H % 8 == 0 && I % 8 == 0, InvalidArgument, "H and I must be multiples of 8 for the bf16 GEMMs");
  DG_REQUIRE(kernels::sm90_gemm_supported(), Error, "moe_forward needs an sm_90 device and a build for sm_90a");
  const size_t n = static_cast<size_t>(T) * top_k;

  auto dx = DeviceBuffer<float>::from(x);
  auto dproj = DeviceBuffer<__nv_bfloat16>::from(router_proj);
  auto dscale = DeviceBuffer<float>::from(router_scale);
  auto dpes = DeviceBuffer<float>::from(per_expert_scale);
  auto dln2 = DeviceBuffer<float>::from(ln2_weight);
  auto dgu = DeviceBuffer<__nv_bfloat16>::from(gate_up);
  auto ddown = DeviceBuffer<__nv_bfloat16>::from(down);
  DeviceBuffer<int32_t> didx(n), dcounts(E), doffsets(E + 1), dperm(n), dinv(n);
  DeviceBuffer<float> dw(n), dxe(static_cast<size_t>(T) * H), dout(static_cast<size_t>(T) * H);
  DeviceBuffer<__nv_bfloat16> dxp(n * H), dh(n * 2 * I), dact(n * I), ddn(n * H);
  const size_t ws_bytes = kernels::grouped_gemm_bf16_tn_workspace_size(E);
  DeviceBuffer<unsigned char> ws(ws_bytes);
  cudaStream_t stream = nullptr;

  auto rws = router_workspace(T, E);
  kernels::MoeRouterParams<float> rp;
  rp.x = dx.get(), rp.router_proj = dproj.get(), rp.router_scale = dscale.get(), rp.per_expert_scale = dpes.get();
  rp.topk_idx = didx.get(), rp.topk_w = dw.get(), rp.workspace = rws.get();
  rp.T = T, rp.H = H, rp.E = E, rp.k = top_k, rp.eps = eps;
  DG_CUDA_CHECK(kernels::moe_router(rp, stream));

  DG_CUDA_CHECK(kernels::rmsnorm<float>(dx.get(), dln2.get(), dxe.get(), T, H, eps, stream));

  DeviceBuffer<unsigned char> pws(kernels::moe_permute_workspace_bytes(T, E, top_k));
  kernels::MoePermuteParams<float> pp;
  pp.topk_idx = didx.get(), pp.x = dxe.get(), pp.expert_counts = dcounts.get(), pp.expert_offsets = doffsets.get();
  pp.perm_slot = dperm.get(), pp.inv = dinv.get(), pp.xp = dxp.get(), pp.workspace = pws.get();
  pp.T = T, pp.H = H, pp.E = E, pp.k = top_k;
  DG_CUDA_CHECK(kernels::moe_permute(pp, stream));

  kernels::GroupedGemmBf16Params g1;
  g1.a = dxp.get(), g1.w = dgu.get(), g1.d = dh.get(), g1.offsets = doffsets.get();
  g1.G = E, g1.N = 2 * I, g1.K = H, g1.workspace = ws.get(), g1.workspace_bytes = ws_bytes;
  DG_CUDA_CHECK(kernels::grouped_gemm_bf16_tn(g1, stream));

  kernels::MoeGeluGateParams gp;
  gp.h = dh.get(), gp.act = dact.get(), gp.M = static_cast<int>(n), gp.I = I;
  DG_CUDA_CHECK(kernels::moe_gelu_gate(gp, stream));

  // The workspace is reused: both GEMMs are on one stream, so the second setup waits for the first GEMM.
  kernels::GroupedGemmBf16Params g2 = g1;
  g2.a = dact.get(), g2.w = ddown.get(), g2.d = ddn.get(), g2.N = H, g2.K = I;
  DG_CUDA_CHECK(kernels::grouped_gemm_bf16_tn(g2, stream));

  kernels::MoeCombineParams<float> cp;
  cp.dn = ddn.get(), cp.topk_idx = didx.get(), cp.topk_w = dw.get(), cp.inv = dinv.get(), cp.out = dout.get();
  cp.T = T, cp.H = H, cp.k = top_k;
  DG_CUDA_CHECK(kernels::moe_combine(cp, stream));
  DG_CUDA_CHECK(cudaDeviceSynchronize());

  F32Array out({T, H});
  dout.copy_to(out.mutable_data());
  return out;
}
#endif  // DGEMMA_WITH_CUTLASS

RegisterCudaOps reg([](py::module_& m) {
  m.def("moe_router", &moe_router, py::arg("x"), py::arg("router_proj"), py::arg("router_scale"),
        py::arg("per_expert_scale"), py::arg("top_k"), py::arg("eps") = 1e-6f,
        "x f32 or bf16-as-uint16 [T, H], router_proj uint16 [E, H] -> (topk_idx int32 [T, k], topk_w f32 [T, k])");
  m.def("moe_permute", &moe_permute, py::arg("topk_idx"), py::arg("x"), py::arg("num_experts"),
        py::arg("path") = "auto", py::arg("gather") = true,
        "-> (expert_counts [E], expert_offsets [E+1], perm_slot [T*k], inv [T*k], xp uint16 [T*k, H] or None "
        "without gather); path 'single' / 'multi' forces one sort, 'auto' lets moe_permute pick");
  m.def("moe_gelu_gate", &moe_gelu_gate, py::arg("h"), "uint16 [M, 2I] -> uint16 [M, I]");
  m.def("moe_combine", &moe_combine, py::arg("dn"), py::arg("topk_idx"), py::arg("topk_w"), py::arg("inv"),
        py::arg("out_bf16") = false, "-> f32 [T, H] (or uint16 with out_bf16)");
#if defined(DGEMMA_WITH_CUTLASS)
  m.def("moe_forward", &moe_forward, py::arg("x"), py::arg("router_proj"), py::arg("router_scale"),
        py::arg("per_expert_scale"), py::arg("ln2_weight"), py::arg("gate_up"), py::arg("down"), py::arg("top_k"),
        py::arg("eps") = 1e-6f, "CpuBackend::moe on the GPU: x f32 [T, H] -> f32 [T, H]; sm_90 only");
#endif
});

}  // namespace
}  // namespace dgemma::bindings
