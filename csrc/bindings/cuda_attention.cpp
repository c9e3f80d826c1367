// Test entry points for kernels/attention: bf16 arrays travel as np.uint16 bit patterns.
#include <cuda_bf16.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <utility>

#include "bindings/cuda_ops.h"
#include "kernels/attention/attention.cuh"
#include "kernels/attention/attention_plan.h"

namespace py = pybind11;

namespace dgemma::bindings {
namespace {

namespace plan = kernels::attention_plan;

// The per-row checks both entry points share: every index the kernel will follow must be in range,
// so that a bad call raises instead of faulting. Returns max_count and max_cached.
std::pair<int, int> check_rows(int T, int NB, int BS, const I32Array& block_table, const I32Array& cache_first_pos,
                               const I32Array& cache_start, const I32Array& cache_len, const I32Array& tok0,
                               const I32Array& count) {
  DG_REQUIRE(block_table.ndim() == 2, InvalidArgument, "block_table must be [rows, max_blocks_per_row]");
  const int R = static_cast<int>(block_table.shape(0)), MB = static_cast<int>(block_table.shape(1));
  for (const I32Array* a : {&cache_first_pos, &cache_start, &cache_len, &tok0, &count})
    DG_REQUIRE(a->ndim() == 1 && a->shape(0) == R, InvalidArgument, "per-row arrays must be [rows]");
  DG_REQUIRE(plan::is_pow2(BS), InvalidArgument, "block_size must be a power of two");
  int max_count = 0, max_cached = 0;
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
      max_cached = std::max(max_cached, len - start);
    }
    max_count = std::max(max_count, n);
  }
  return {max_count, max_cached};
}

py::array_t<uint16_t> attention(U16Array q, U16Array k_new, U16Array v_new, U16Array k_cache, U16Array v_cache,
                                I32Array block_table, I32Array cache_first_pos, I32Array cache_start,
                                I32Array cache_len, I32Array tok0, I32Array count, bool causal, int window,
                                float scale, int splits, const std::string& kernel) {
  DG_REQUIRE(kernel == "auto" || kernel == "mma", InvalidArgument, "kernel must be auto or mma, got '" << kernel << "'");
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
  const auto [max_count, max_cached] =
      check_rows(T, NB, BS, block_table, cache_first_pos, cache_start, cache_len, tok0, count);
  DG_REQUIRE(splits >= 0, InvalidArgument, "splits must be >= 0");
  const int R = static_cast<int>(block_table.shape(0)), MB = static_cast<int>(block_table.shape(1));

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
  p.splits = splits, p.max_cached = max_cached, p.mma_sync = kernel == "mma";
  // The split-KV workspace, NaN-filled like the output so that a partial the combine reads but no
  // CTA wrote shows up.
  DeviceBuffer<float> dws((kernels::attention_workspace_bytes(p) + sizeof(float) - 1) / sizeof(float));
  if (dws.size()) DG_CUDA_CHECK(cudaMemset(dws.get(), 0xff, dws.size() * sizeof(float)));
  p.workspace = dws.get(), p.workspace_bytes = dws.size() * sizeof(float);
  DG_CUDA_CHECK(kernels::attention_forward(p, nullptr));
  DG_CUDA_CHECK(cudaDeviceSynchronize());
  py::array_t<uint16_t> out({T, H, D});
  dout.copy_to(out.mutable_data());
  return out;
}


py::dict launch_plan(int rows, int head_dim, int heads, int kv_heads, int max_count, int max_cached, int splits,
                     int block_size) {
  kernels::AttentionParams p;
  p.rows = rows, p.head_dim = head_dim, p.num_heads = heads, p.num_kv_heads = kv_heads;
  p.max_count = max_count, p.max_cached = max_cached, p.splits = splits, p.block_size = block_size;
  kernels::AttentionLaunchPlan lp;
  DG_CUDA_CHECK(kernels::attention_launch_plan(p, &lp));
  py::dict d;
  d["sm90"] = lp.sm90, d["block_m"] = lp.block_m, d["block_n"] = lp.block_n, d["splits"] = lp.splits;
  d["workspace_bytes"] = lp.workspace_bytes;
  return d;
}

// Enumerates the grid exactly as the kernels decode it (x: m tile, y: kv head * splits + split, z: row)
// and, per CTA, each tile's source rows: pos (key position), slot (cache slot, or -1), token (row of
// k_new / v_new, or -1; both -1: zero-filled), plus the tile's key range [lo, hi).
py::dict host_plan(int head_dim, int heads, int kv_heads, int block_size, I32Array block_table,
                   I32Array cache_first_pos, I32Array cache_start, I32Array cache_len, I32Array tok0, I32Array count,
                   bool causal, int window, int splits, const std::string& kernel) {
  DG_REQUIRE(head_dim == 256 || head_dim == 512, InvalidArgument, "head_dim must be 256 or 512");
  DG_REQUIRE(kv_heads > 0 && heads % kv_heads == 0, InvalidArgument, "heads must be a multiple of kv_heads");
  DG_REQUIRE(kernel == "sm90" || kernel == "sm80", InvalidArgument, "kernel must be sm90 or sm80");
  DG_REQUIRE(splits >= 1 && splits <= plan::kMaxSplits, InvalidArgument, "splits must be in [1, 16]");
  int T = 0;
  for (py::ssize_t r = 0; r < count.size(); ++r) T = std::max(T, tok0.at(r) + count.at(r));
  const auto [max_count, max_cached] = check_rows(T, INT32_MAX, block_size, block_table, cache_first_pos,
                                                  cache_start, cache_len, tok0, count);
  (void)max_cached;
  const plan::TileShape ts = kernel == "sm90" ? plan::sm90_tiles(head_dim) : plan::sm80_tiles(head_dim);
  const int lg_bn = plan::log2_exact(ts.block_n), lg_bs = plan::log2_exact(block_size), BN = ts.block_n;
  const int R = static_cast<int>(block_table.shape(0)), MB = static_cast<int>(block_table.shape(1));
  const int G = heads / kv_heads;
  const int m_tiles = (max_count * G + ts.block_m - 1) / ts.block_m;
  py::list ctas;
  for (int row = 0; row < R; ++row)
    for (int y = 0; y < kv_heads * splits; ++y)
      for (int x = 0; x < m_tiles; ++x) {
        const int split = y % splits, kv_head = y / splits;
        const plan::RowKeys rk = plan::row_keys(cache_first_pos.at(row), cache_start.at(row), cache_len.at(row),
                                                count.at(row));
        plan::CtaWork w;
        if (!plan::cta_work(rk, G, ts.block_m, lg_bn, causal, window, x, split, splits, w)) continue;
        const int n = w.j1 - w.j0;
        py::array_t<int64_t> pos({n, BN}), slot({n, BN}), token({n, BN});
        py::array_t<int32_t> lo(n), hi(n);
        const int32_t* blocks = block_table.data() + static_cast<size_t>(row) * MB;
        for (int j = w.j0; j < w.j1; ++j) {
          const plan::KeyTile kt = plan::key_tile(rk, w.span, j, lg_bn);
          lo.mutable_at(j - w.j0) = kt.lo, hi.mutable_at(j - w.j0) = kt.hi;
          for (int i = 0; i < BN; ++i) {  // as load_key_tile
            const int p = kt.pos0 + i;
            const bool valid = p >= kt.lo && p < kt.hi;
            pos.mutable_at(j - w.j0, i) = p;
            slot.mutable_at(j - w.j0, i) = valid && kt.cached ? plan::cache_slot(blocks, kt.idx0 + i, lg_bs) : -1;
            token.mutable_at(j - w.j0, i) = valid && !kt.cached ? tok0.at(row) + kt.idx0 + i : -1;
          }
        }
        py::dict c;
        c["row"] = row, c["kv_head"] = kv_head, c["m_tile"] = x, c["split"] = split;
        c["f0"] = w.f0, c["f_end"] = w.f_end, c["t_first"] = w.t_first, c["t_last"] = w.t_last;
        c["n_tiles"] = plan::span_tiles(w.span), c["j0"] = w.j0, c["j1"] = w.j1;
        c["pos"] = pos, c["slot"] = slot, c["token"] = token, c["lo"] = lo, c["hi"] = hi;
        ctas.append(c);
      }
  py::dict d;
  d["block_m"] = ts.block_m, d["block_n"] = BN, d["splits"] = splits, d["ctas"] = ctas;
  return d;
}

RegisterCudaOps reg([](py::module_& m) {
  m.def("attention", &attention, py::arg("q"), py::arg("k_new"), py::arg("v_new"), py::arg("k_cache"),
        py::arg("v_cache"), py::arg("block_table"), py::arg("cache_first_pos"), py::arg("cache_start"),
        py::arg("cache_len"), py::arg("tok0"), py::arg("count"), py::arg("causal"), py::arg("window") = 0,
        py::arg("scale") = 1.0f, py::arg("splits") = 0, py::arg("kernel") = "auto",
        "Fused paged attention (bf16 as uint16): q [T, heads, hd], k_new/v_new [T, kv_heads, hd], "
        "k_cache/v_cache [blocks, block_size, kv_heads, hd]; returns out [T, heads, hd]. splits: split-KV parts "
        "(0: the kernel's own choice for this device); kernel: auto (wgmma on Hopper, else mma.sync) or mma");
  m.def("attention_launch_plan", &launch_plan, py::arg("rows"), py::arg("head_dim"), py::arg("heads"),
        py::arg("kv_heads"), py::arg("max_count"), py::arg("max_cached"), py::arg("splits") = 0,
        py::arg("block_size") = 16,
        "What attention() launches on this device for these sizes: {sm90, block_m, block_n, splits, workspace_bytes}");
  m.def("attention_plan", &host_plan, py::arg("head_dim"), py::arg("heads"), py::arg("kv_heads"),
        py::arg("block_size"), py::arg("block_table"), py::arg("cache_first_pos"), py::arg("cache_start"),
        py::arg("cache_len"), py::arg("tok0"), py::arg("count"), py::arg("causal"), py::arg("window"),
        py::arg("splits"), py::arg("kernel") = "sm90",
        "Host-side (no GPU): every CTA the kernel would run and, tile by tile, where each key row comes from, "
        "computed by the kernels' own attention_plan.h");
  m.def("attention_choose_splits", &plan::choose_splits, py::arg("base_ctas"), py::arg("tiles"), py::arg("sms"),
        py::arg("forced") = 0, "Host-side: the split-KV count attention_plan.h picks for a grid of base_ctas CTAs");
  m.def("attention_max_tiles", &plan::max_tiles, py::arg("max_cached"), py::arg("max_count"), py::arg("lg_bn"),
        "Host-side: attention_plan.h's bound on a row's key tiles");
});

}  // namespace
}  // namespace dgemma::bindings
