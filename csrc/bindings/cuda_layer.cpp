// Test entry points for kernels/layer (bf16 travels as uint16 bit patterns).
#include <cuda_bf16.h>

#include <cstdint>
#include <initializer_list>
#include <vector>

#include "bindings/cuda_ops.h"
#include "kernels/layer/layer.cuh"

namespace py = pybind11;

namespace dgemma::bindings {
namespace {

using bf16 = __nv_bfloat16;

bool is_u16(const py::array& a) { return a.dtype().kind() == 'u' && a.dtype().itemsize() == 2; }

// A float32 vector of length n, or an empty buffer for None.
DeviceBuffer<float> opt_f32(const py::object& o, py::ssize_t n, const char* name) {
  if (o.is_none()) return {};
  auto a = F32Array::ensure(o);
  DG_REQUIRE(a && a.ndim() == 1 && a.shape(0) == n, InvalidArgument, name << " must be float32 [" << n << "]");
  return DeviceBuffer<float>::from(a);
}

// Device copy of a float32 or bf16 (uint16) array of shape [T, H].
struct AnyRows {
  DeviceBuffer<float> f;
  DeviceBuffer<bf16> h;
  bool is_bf16 = false;
};
AnyRows any_rows(const py::array& a, py::ssize_t T, py::ssize_t H, const char* name) {
  DG_REQUIRE(a.ndim() == 2 && a.shape(0) == T && a.shape(1) == H, InvalidArgument,
             name << " must be [" << T << ", " << H << "]");
  AnyRows r;
  r.is_bf16 = is_u16(a);
  if (r.is_bf16)
    r.h = DeviceBuffer<bf16>::from(U16Array::ensure(a));
  else
    r.f = DeviceBuffer<float>::from(F32Array::ensure(a));
  return r;
}

py::array embed_tokens(U16Array table, I32Array ids, float scale, bool out_bf16) {
  DG_REQUIRE(table.ndim() == 2, InvalidArgument, "table must be [V, H]");
  DG_REQUIRE(ids.ndim() == 1, InvalidArgument, "ids must be [T]");
  const int V = static_cast<int>(table.shape(0)), H = static_cast<int>(table.shape(1));
  const int T = static_cast<int>(ids.shape(0));
  for (int t = 0; t < T; ++t)
    DG_REQUIRE(ids.data()[t] >= 0 && ids.data()[t] < V, InvalidArgument, "token id out of range");
  auto dtable = DeviceBuffer<bf16>::from(table);
  auto dids = DeviceBuffer<int32_t>::from(ids);
  if (out_bf16) {
    DeviceBuffer<bf16> dout(static_cast<size_t>(T) * H);
    DG_CUDA_CHECK(kernels::embed_tokens(kernels::EmbedParams<bf16>{dtable.get(), dids.get(), dout.get(), T, H, scale},
                                        nullptr));
    DG_CUDA_CHECK(cudaDeviceSynchronize());
    U16Array out({T, H});
    dout.copy_to(out.mutable_data());
    return std::move(out);
  }
  DeviceBuffer<float> dout(static_cast<size_t>(T) * H);
  DG_CUDA_CHECK(kernels::embed_tokens(kernels::EmbedParams<float>{dtable.get(), dids.get(), dout.get(), T, H, scale},
                                      nullptr));
  DG_CUDA_CHECK(cudaDeviceSynchronize());
  F32Array out({T, H});
  dout.copy_to(out.mutable_data());
  return std::move(out);
}

// x: uint16 [T, heads, head_dim]; weight / positions / inv_freq optional (all None: v_norm).
U16Array head_norm_rope(U16Array x, py::object weight, py::object positions, py::object inv_freq, float eps) {
  DG_REQUIRE(x.ndim() == 3, InvalidArgument, "x must be [T, heads, head_dim]");
  const int T = static_cast<int>(x.shape(0)), heads = static_cast<int>(x.shape(1));
  const int hd = static_cast<int>(x.shape(2));
  DG_REQUIRE(positions.is_none() == inv_freq.is_none(), InvalidArgument,
             "positions and inv_freq go together");
  auto dx = DeviceBuffer<bf16>::from(x);
  auto dw = opt_f32(weight, hd, "weight");
  auto dinv = opt_f32(inv_freq, hd / 2, "inv_freq");
  DeviceBuffer<int32_t> dpos;
  if (!positions.is_none()) {
    DG_REQUIRE(hd % 2 == 0, InvalidArgument, "RoPE needs an even head_dim");
    auto pos = I32Array::ensure(positions);
    DG_REQUIRE(pos && pos.ndim() == 1 && pos.shape(0) == T, InvalidArgument, "positions must be int32 [T]");
    dpos = DeviceBuffer<int32_t>::from(pos);
  }
  kernels::HeadNormRopeParams p;
  p.x = dx.get(), p.weight = dw.get(), p.positions = dpos.get(), p.inv_freq = dinv.get();
  p.tokens = T, p.heads = heads, p.head_dim = hd, p.eps = eps;
  DG_CUDA_CHECK(kernels::head_norm_rope(p, nullptr));
  DG_CUDA_CHECK(cudaDeviceSynchronize());
  U16Array out({T, heads, hd});
  dx.copy_to(out.mutable_data());
  return out;
}

U16Array v_norm(U16Array v, float eps) {
  DG_REQUIRE(v.ndim() == 3, InvalidArgument, "v must be [T, heads, head_dim]");
  const int T = static_cast<int>(v.shape(0)), heads = static_cast<int>(v.shape(1));
  const int hd = static_cast<int>(v.shape(2));
  auto dv = DeviceBuffer<bf16>::from(v);
  DG_CUDA_CHECK(kernels::v_norm(dv.get(), T, heads, hd, eps, nullptr));
  DG_CUDA_CHECK(cudaDeviceSynchronize());
  U16Array out({T, heads, hd});
  dv.copy_to(out.mutable_data());
  return out;
}

// k, v: [T, kvh, hd]; k_cache, v_cache: [num_blocks, block_size, kvh, hd]; slots int32 [T] (-1 skip).
// Returns the updated (k_cache, v_cache).
py::tuple kv_cache_write(U16Array k, U16Array v, U16Array k_cache, U16Array v_cache, I32Array slots) {
  DG_REQUIRE(k.ndim() == 3 && v.ndim() == 3, InvalidArgument, "k, v must be [T, kv_heads, head_dim]");
  const int T = static_cast<int>(k.shape(0)), kvh = static_cast<int>(k.shape(1));
  const int hd = static_cast<int>(k.shape(2));
  DG_REQUIRE(v.shape(0) == T && v.shape(1) == kvh && v.shape(2) == hd, InvalidArgument, "v must match k");
  DG_REQUIRE(k_cache.ndim() == 4 && k_cache.shape(2) == kvh && k_cache.shape(3) == hd, InvalidArgument,
             "k_cache must be [num_blocks, block_size, kv_heads, head_dim]");
  for (int i = 0; i < 4; ++i)
    DG_REQUIRE(v_cache.ndim() == 4 && v_cache.shape(i) == k_cache.shape(i), InvalidArgument, "v_cache must match");
  DG_REQUIRE(slots.ndim() == 1 && slots.shape(0) == T, InvalidArgument, "slots must be int32 [T]");
  const int64_t num_slots = static_cast<int64_t>(k_cache.shape(0)) * k_cache.shape(1);
  auto dk = DeviceBuffer<bf16>::from(k);
  auto dv = DeviceBuffer<bf16>::from(v);
  auto dkc = DeviceBuffer<bf16>::from(k_cache);
  auto dvc = DeviceBuffer<bf16>::from(v_cache);
  auto ds = DeviceBuffer<int32_t>::from(slots);
  kernels::KvCacheWriteParams p;
  p.k = dk.get(), p.v = dv.get(), p.k_cache = dkc.get(), p.v_cache = dvc.get(), p.slot = ds.get();
  p.tokens = T, p.row_elems = kvh * hd, p.num_slots = num_slots;
  DG_CUDA_CHECK(kernels::kv_cache_write(p, nullptr));
  DG_CUDA_CHECK(cudaDeviceSynchronize());
  std::vector<py::ssize_t> shape(k_cache.shape(), k_cache.shape() + 4);
  U16Array ko(shape), vo(shape);
  dkc.copy_to(ko.mutable_data());
  dvc.copy_to(vo.mutable_data());
  return py::make_tuple(ko, vo);
}

// x f32 [T, H]; h f32 or uint16 [T, H]; weight f32 [H]. Returns x + rmsnorm(h) * weight.
F32Array residual_norm_add(F32Array x, py::array h, F32Array weight, float eps) {
  DG_REQUIRE(x.ndim() == 2, InvalidArgument, "x must be [T, H]");
  const int T = static_cast<int>(x.shape(0)), H = static_cast<int>(x.shape(1));
  DG_REQUIRE(weight.ndim() == 1 && weight.shape(0) == H, InvalidArgument, "weight must be [H]");
  auto dx = DeviceBuffer<float>::from(x);
  auto dw = DeviceBuffer<float>::from(weight);
  AnyRows dh = any_rows(h, T, H, "h");
  if (dh.is_bf16)
    DG_CUDA_CHECK(kernels::residual_norm_add(
        kernels::ResidualNormAddParams<bf16>{dx.get(), dh.h.get(), dw.get(), T, H, eps}, nullptr));
  else
    DG_CUDA_CHECK(kernels::residual_norm_add(
        kernels::ResidualNormAddParams<float>{dx.get(), dh.f.get(), dw.get(), T, H, eps}, nullptr));
  DG_CUDA_CHECK(cudaDeviceSynchronize());
  F32Array out({T, H});
  dx.copy_to(out.mutable_data());
  return out;
}

template <typename Td, typename Tm>
void ffn_launch(float* x, const Td* d, const Tm* m, const float* w1, const float* w2, const float* w, int T, int H,
                float eps, float scalar) {
  kernels::FfnCombineParams<Td, Tm> p;
  p.x = x, p.dense = d, p.moe = m, p.w1 = w1, p.w2 = w2, p.w = w;
  p.tokens = T, p.hidden = H, p.eps = eps, p.layer_scalar = scalar;
  DG_CUDA_CHECK(kernels::ffn_combine(p, nullptr));
}

// x f32 [T, H]; dense, moe f32 or uint16 [T, H]; w1, w2, w f32 [H]. Returns the updated x.
F32Array ffn_combine(F32Array x, py::array dense, py::array moe, F32Array w1, F32Array w2, F32Array w, float eps,
                     float layer_scalar) {
  DG_REQUIRE(x.ndim() == 2, InvalidArgument, "x must be [T, H]");
  const int T = static_cast<int>(x.shape(0)), H = static_cast<int>(x.shape(1));
  for (const F32Array* a : {&w1, &w2, &w})
    DG_REQUIRE(a->ndim() == 1 && a->shape(0) == H, InvalidArgument, "norm weights must be [H]");
  auto dx = DeviceBuffer<float>::from(x);
  auto dw1 = DeviceBuffer<float>::from(w1);
  auto dw2 = DeviceBuffer<float>::from(w2);
  auto dw = DeviceBuffer<float>::from(w);
  AnyRows dd = any_rows(dense, T, H, "dense"), dm = any_rows(moe, T, H, "moe");
  if (dd.is_bf16 && dm.is_bf16)
    ffn_launch(dx.get(), dd.h.get(), dm.h.get(), dw1.get(), dw2.get(), dw.get(), T, H, eps, layer_scalar);
  else if (dd.is_bf16)
    ffn_launch(dx.get(), dd.h.get(), dm.f.get(), dw1.get(), dw2.get(), dw.get(), T, H, eps, layer_scalar);
  else if (dm.is_bf16)
    ffn_launch(dx.get(), dd.f.get(), dm.h.get(), dw1.get(), dw2.get(), dw.get(), T, H, eps, layer_scalar);
  else
    ffn_launch(dx.get(), dd.f.get(), dm.f.get(), dw1.get(), dw2.get(), dw.get(), T, H, eps, layer_scalar);
  DG_CUDA_CHECK(cudaDeviceSynchronize());
  F32Array out({T, H});
  dx.copy_to(out.mutable_data());
  return out;
}

F32Array softcap(F32Array y, float cap) {
  DG_REQUIRE(cap > 0, InvalidArgument, "cap must be positive");
  auto dy = DeviceBuffer<float>::from(y);
  DG_CUDA_CHECK(kernels::softcap(dy.get(), static_cast<int64_t>(y.size()), cap, nullptr));
  DG_CUDA_CHECK(cudaDeviceSynchronize());
  std::vector<py::ssize_t> shape(y.shape(), y.shape() + y.ndim());
  F32Array out(shape);
  dy.copy_to(out.mutable_data());
  return out;
}

RegisterCudaOps reg([](py::module_& m) {
  m.def("embed_tokens", &embed_tokens, py::arg("table"), py::arg("ids"), py::arg("scale"),
        py::arg("out_bf16") = false);
  m.def("head_norm_rope", &head_norm_rope, py::arg("x"), py::arg("weight") = py::none(),
        py::arg("positions") = py::none(), py::arg("inv_freq") = py::none(), py::arg("eps") = 1e-6f);
  m.def("v_norm", &v_norm, py::arg("v"), py::arg("eps") = 1e-6f);
  m.def("kv_cache_write", &kv_cache_write, py::arg("k"), py::arg("v"), py::arg("k_cache"), py::arg("v_cache"),
        py::arg("slots"));
  m.def("residual_norm_add", &residual_norm_add, py::arg("x"), py::arg("h"), py::arg("weight"),
        py::arg("eps") = 1e-6f);
  m.def("ffn_combine", &ffn_combine, py::arg("x"), py::arg("dense"), py::arg("moe"), py::arg("w1"), py::arg("w2"),
        py::arg("w"), py::arg("eps") = 1e-6f, py::arg("layer_scalar") = 1.f);
  m.def("softcap", &softcap, py::arg("y"), py::arg("cap"));
});

}  // namespace
}  // namespace dgemma::bindings
