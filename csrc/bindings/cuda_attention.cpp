// Test entry point for kernels/attention: bf16 arrays travel as np.uint16 bit patterns.
#include <cuda_bf16.h>

#include <algorithm>
#include <cstdint>

#include "bindings/cuda_ops.h"
#include "kernels/attention/attention.cuh"

namespace py = pybind11;

namespace dgemma::bindings {
namespace {


// Checks every index the kernel will follow, so that a bad call raises instead of faulting.
py::array_t<uint16_t> attention(U16Array q, U16Array k_new, U16Array v_new, U16Array k_cache, U16Array v_cache,
                                I32Array block_table, I32Array cache_first_pos, I32Array cache_start,
                                I32Array cache_len, I32Array tok0, I32Array count, bool causal, int window,
                                float scale) {
  DG_REQUIRE(q.ndim() == 3, InvalidArgument, "q must be [T, num_heads, head_dim]");
  const int T = static_cast<int>(q.shape(0)), H = static_cast<int>(q.shape(1)), D = static_cast<int>(q.shape(2));
  DG_REQUIRE(k_new.ndim() == 3 && k_new.shape(0) == T && k_new.shape(2) == D, InvalidArgument,
             "k_new must be [T, num_kv_heads, head_dim]");
  const int KVH = static_cast<int>(k_new.shape(1));
  DG_REQUIRE(KVH > 0 && H % KVH == 0, InvalidArgument, "num_heads must be a multiple of num_kv_heads");
  DG_REQUIRE(v_new.ndim() == 3 && v_new.shape(0) == T && v_new.shape(1) == KVH && v_new.shape(2) == D,
             InvalidArgument, "v_new must match k_new");
  DG_REQUIRE(k_cache.ndim() == 4 && k_cache.shape(2) == KVH && k_cache.shape(3) == D, InvalidArgument,
             "k_cache must be [num_blocks, block_size, num_kv_heads, head_dim]");
  const int NB = static_cast<int>(k_cache.shape(0)), BS = static_cast<int>(k_cache.shape(1));
  DG_REQUIRE(BS > 0, InvalidArgument, "block_size must be positive");
  DG_REQUIRE(v_cache.ndim() == 4 && v_cache.shape(0) == NB && v_cache.shape(1) == BS && v_cache.shape(2) == KVH &&
                 v_cache.shape(3) == D,
             InvalidArgument, "v_cache must match k_cache");
  DG_REQUIRE(block_table.ndim() == 2, InvalidArgument, "block_table must be [rows, max_blocks_per_row]");
  const int R = static_cast<int>(block_table.shape(0)), MB = static_cast<int>(block_table.shape(1));
  for (const I32Array* a : {&cache_first_pos, &cache_start, &cache_len, &tok0, &count})
    DG_REQUIRE(a->ndim() == 1 && a->shape(0) == R, InvalidArgument, "per-row arrays must be [rows]");

  int max_count = 0;
  for (int r = 0; r < R; ++r) {
    const int first = cache_first_pos.at(r), start = cache_start.at(r), len = cache_len.at(r);
    const int t0 = tok0.at(r), n = count.at(r);
    DG_REQUIRE(n >= 0 && t0 >= 0 && t0 + n <= T, InvalidArgument, "row " << r << ": tokens outside [0, T)");
    DG_REQUIRE(start <= len && start >= 0, InvalidArgument, "row " << r << ": cache_start > cache_len");
    if (len > start) {
      DG_REQUIRE(first >= 0 && first <= start && first % BS == 0, InvalidArgument,
                 "row " << r << ": cache_first_pos must be a multiple of block_size and <= cache_start");
      DG_REQUIRE((len - 1 - first) / BS < MB, InvalidArgument, "row " << r << ": block table too short");
      for (int b = (start - first) / BS; b <= (len - 1 - first) / BS; ++b)
        DG_REQUIRE(block_table.at(r, b) >= 0 && block_table.at(r, b) < NB, InvalidArgument,
                   "row " << r << ": block id out of range");
    }
    max_count = std::max(max_count, n);
  }

  auto dq = DeviceBuffer<__nv_bfloat16>::from(q);
  auto dkn = DeviceBuffer<__nv_bfloat16>::from(k_new);
  auto dvn = DeviceBuffer<__nv_bfloat16>::from(v_new);
  auto dkc = DeviceBuffer<__nv_bfloat16>::from(k_cache);
  auto dvc = DeviceBuffer<__nv_bfloat16>::from(v_cache);
  // A 1-element table when empty, so that the kernel always gets a valid pointer.
  auto dbt = block_table.size() ? DeviceBuffer<int32_t>::from(block_table) : DeviceBuffer<int32_t>(1);
  auto dfirst = DeviceBuffer<int32_t>::from(cache_first_pos);
  auto dstart = DeviceBuffer<int32_t>::from(cache_start);
  auto dlen = DeviceBuffer<int32_t>::from(cache_len);
  auto dtok0 = DeviceBuffer<int32_t>::from(tok0);
  auto dcount = DeviceBuffer<int32_t>::from(count);
  DeviceBuffer<__nv_bfloat16> dout(static_cast<size_t>(T) * H * D);
  // NaN (0xffff) everywhere first: a token the kernel fails to write shows up in the tests.
  if (dout.size()) DG_CUDA_CHECK(cudaMemset(dout.get(), 0xff, dout.size() * sizeof(__nv_bfloat16)));

  kernels::AttentionParams p;
  p.q = dq.get(), p.k_new = dkn.get(), p.v_new = dvn.get();
  p.k_cache = dkc.get(), p.v_cache = dvc.get();
  p.block_table = dbt.get();
  p.cache_first_pos = dfirst.get(), p.cache_start = dstart.get(), p.cache_len = dlen.get();
  p.tok0 = dtok0.get(), p.count = dcount.get();
  p.out = dout.get();
  p.rows = R, p.num_heads = H, p.num_kv_heads = KVH, p.head_dim = D;
  p.block_size = BS, p.max_blocks_per_row = MB, p.max_count = max_count;
  p.causal = causal, p.window = window, p.scale = scale;
  DG_CUDA_CHECK(kernels::attention_forward(p, nullptr));
  DG_CUDA_CHECK(cudaDeviceSynchronize());
  py::array_t<uint16_t> out({T, H, D});
  dout.copy_to(out.mutable_data());
  return out;
}

RegisterCudaOps reg([](py::module_& m) {
  m.def("attention", &attention, py::arg("q"), py::arg("k_new"), py::arg("v_new"), py::arg("k_cache"),
        py::arg("v_cache"), py::arg("block_table"), py::arg("cache_first_pos"), py::arg("cache_start"),
        py::arg("cache_len"), py::arg("tok0"), py::arg("count"), py::arg("causal"), py::arg("window") = 0,
        py::arg("scale") = 1.0f,
        "Fused paged attention (bf16 as uint16): q [T, heads, hd], k_new/v_new [T, kv_heads, hd], "
        "k_cache/v_cache [blocks, block_size, kv_heads, hd]; returns out [T, heads, hd]");
});

}  // namespace
}  // namespace dgemma::bindings
