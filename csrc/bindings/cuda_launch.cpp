// Launch-only entry points for the kernel microbenchmark (bench/kernels_gpu.py): each kernel on device
// memory the caller owns (a torch tensor's data_ptr(), passed as an int) and on the caller's stream (an
// int: torch.cuda.current_stream().cuda_stream), with no allocation, copy or synchronisation, so that
// CUDA events around a call time the kernel and nothing else. The numpy entry points of the other
// cuda_*.cpp files copy their operands in and out on every call: right for tests, wrong for timing.
//
// Nothing here checks that a pointer points at enough memory: the caller sizes the buffers (the
// kernels' headers give every layout; the *_bytes functions here and attention_launch_plan the
// workspaces). A launch error is raised; a fault shows at the caller's next synchronisation.
#include <cuda_bf16.h>

#include <cstdint>

#include "bindings/cuda_ops.h"
#include "kernels/attention/attention.cuh"
#include "kernels/matmul/matmul.cuh"
#include "kernels/moe/moe.cuh"
#include "kernels/nvfp4/nvfp4.cuh"
#include "kernels/sampler/lm_head_fused.cuh"
#if defined(DGEMMA_WITH_CUTLASS)
#include "kernels/gemm/gemm.cuh"
#include "kernels/gemm/params_cache.h"
#endif

namespace py = pybind11;

namespace dgemma::bindings {
namespace {

using bf16 = __nv_bfloat16;

template <typename T>
T* ptr(uintptr_t a) {
  return reinterpret_cast<T*>(a);
}
cudaStream_t stream_of(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

void launch_attention(uintptr_t q, uintptr_t k_new, uintptr_t v_new, uintptr_t k_cache, uintptr_t v_cache,
                      uintptr_t block_table, uintptr_t cache_first_pos, uintptr_t cache_start, uintptr_t cache_len,
                      uintptr_t tok0, uintptr_t count, uintptr_t out, uintptr_t workspace, size_t workspace_bytes,
                      int rows, int heads, int kv_heads, int head_dim, int block_size, int max_blocks_per_row,
                      int max_count, int max_cached, bool causal, int window, float scale, int splits,
                      uintptr_t stream) {
  kernels::AttentionParams p;
  p.q = ptr<const bf16>(q), p.k_new = ptr<const bf16>(k_new), p.v_new = ptr<const bf16>(v_new);
  p.k_cache = ptr<const bf16>(k_cache), p.v_cache = ptr<const bf16>(v_cache);
  p.block_table = ptr<const int32_t>(block_table), p.cache_first_pos = ptr<const int32_t>(cache_first_pos);
  p.cache_start = ptr<const int32_t>(cache_start), p.cache_len = ptr<const int32_t>(cache_len);
  p.tok0 = ptr<const int32_t>(tok0), p.count = ptr<const int32_t>(count), p.out = ptr<bf16>(out);
  p.rows = rows, p.num_heads = heads, p.num_kv_heads = kv_heads, p.head_dim = head_dim;
  p.block_size = block_size, p.max_blocks_per_row = max_blocks_per_row, p.max_count = max_count;
  p.causal = causal, p.window = window, p.scale = scale;
  p.workspace = ptr<void>(workspace), p.workspace_bytes = workspace_bytes;
  p.splits = splits, p.max_cached = max_cached;
  DG_CUDA_CHECK(kernels::attention_forward(p, stream_of(stream)));
}

void launch_grouped_gemm_nvfp4(uintptr_t x, uintptr_t w, uintptr_t w_global, uintptr_t offsets, uintptr_t y, int G,
                               int N, int K, bool gated, uintptr_t gather, int gather_div, int expected_rows,
                               const std::string& path, uintptr_t stream) {
  kernels::GroupedGemmNvfp4Params p;
  p.x = ptr<const bf16>(x), p.w = ptr<const uint8_t>(w), p.w_global = ptr<const float>(w_global);
  p.offsets = ptr<const int32_t>(offsets), p.y = ptr<bf16>(y);
  p.G = G, p.N = N, p.K = K, p.gated = gated;
  p.gather = ptr<const int32_t>(gather), p.gather_div = gather_div;
  p.expected_rows = expected_rows, p.path = parse_w4a16_path(path);
  DG_CUDA_CHECK(kernels::grouped_gemm_nvfp4(p, stream_of(stream)));
}

// The fused LM head + sampler + soft embedding (lm_head_fused.cuh's layouts); fallback 0: not reported,
// else int32 [P] set to 1 where the token took the exact fallback.
void launch_lm_head_sample_fused(uintptr_t x, uintptr_t emb, uintptr_t temperature, uintptr_t uniform,
                                 uintptr_t token, uintptr_t argmax, uintptr_t entropy, uintptr_t soft,
                                 uintptr_t soft_index, uintptr_t fallback, uintptr_t workspace,
                                 size_t workspace_bytes, int P, int H, int V, int n, float softcap,
                                 float soft_scale, uintptr_t stream) {
  kernels::LmHeadSampleParams p;
  p.x = ptr<const bf16>(x), p.emb = ptr<const bf16>(emb);
  p.P = P, p.H = H, p.V = V, p.n = n, p.softcap = softcap;
  p.temperature = ptr<const float>(temperature), p.uniform = ptr<const double>(uniform);
  p.token = ptr<int32_t>(token), p.argmax = ptr<int32_t>(argmax), p.entropy = ptr<float>(entropy);
  p.soft = ptr<bf16>(soft), p.soft_index = ptr<const int32_t>(soft_index), p.soft_scale = soft_scale;
  p.workspace = ptr<void>(workspace), p.workspace_bytes = workspace_bytes;
  p.fallback = ptr<int32_t>(fallback);
  DG_CUDA_CHECK(kernels::lm_head_sample_fused(p, stream_of(stream)));
}

// x float32 [T, H], the CUDA backend's residual stream; workspace of moe_router_workspace_bytes(T, E), any contents.
void launch_moe_router(uintptr_t x, uintptr_t router_proj, uintptr_t router_scale, uintptr_t per_expert_scale,
                       uintptr_t topk_idx, uintptr_t topk_w, uintptr_t workspace, int T, int H, int E, int k,
                       float eps, uintptr_t stream) {
  kernels::MoeRouterParams<float> p;
  p.x = ptr<const float>(x), p.router_proj = ptr<const bf16>(router_proj);
  p.router_scale = ptr<const float>(router_scale), p.per_expert_scale = ptr<const float>(per_expert_scale);
  p.topk_idx = ptr<int32_t>(topk_idx), p.topk_w = ptr<float>(topk_w), p.workspace = ptr<void>(workspace);
  p.T = T, p.H = H, p.E = E, p.k = k, p.eps = eps;
  DG_CUDA_CHECK(kernels::moe_router(p, stream_of(stream)));
}

void launch_moe_gelu_gate(uintptr_t h, uintptr_t act, int M, int I, uintptr_t stream) {
  kernels::MoeGeluGateParams p;
  p.h = ptr<const bf16>(h), p.act = ptr<bf16>(act), p.M = M, p.I = I;
  DG_CUDA_CHECK(kernels::moe_gelu_gate(p, stream_of(stream)));
}

void launch_matmul_bf16(uintptr_t x, uintptr_t w, uintptr_t y, int64_t M, int64_t N, int64_t K, bool y_f32, bool w_kn,
                        float alpha, float softcap, int split_k, uintptr_t workspace, size_t workspace_bytes,
                        uintptr_t stream) {
  kernels::MatmulParams p;
  p.x = ptr<const bf16>(x), p.w = ptr<const bf16>(w), p.y = ptr<void>(y), p.y_f32 = y_f32, p.w_kn = w_kn;
  p.M = M, p.N = N, p.K = K, p.alpha = alpha, p.softcap = softcap, p.split_k = split_k;
  p.workspace = ptr<void>(workspace), p.workspace_bytes = workspace_bytes;
  DG_CUDA_CHECK(kernels::matmul_bf16(p, stream_of(stream)));
}

#if defined(DGEMMA_WITH_CUTLASS)
// cache: the prepared launches the CUDA backend keeps (its ParamsCache), so that repeated calls only launch.
void launch_gemm_bf16_tn(uintptr_t x, uintptr_t w, uintptr_t y, int M, int N, int K, kernels::ParamsCache* cache,
                         uintptr_t stream) {
  kernels::GemmBf16Params p;
  p.x = ptr<const bf16>(x), p.w = ptr<const bf16>(w), p.y = ptr<bf16>(y), p.M = M, p.N = N, p.K = K;
  p.cache = cache;
  DG_CUDA_CHECK(kernels::gemm_bf16_tn(p, stream_of(stream)));
}

void launch_gemm_bf16_tn_logits(uintptr_t x, uintptr_t w, uintptr_t y, int M, int N, int K, float alpha,
                                float softcap, kernels::ParamsCache* cache, uintptr_t stream) {
  kernels::GemmLogitsParams p;
  p.x = ptr<const bf16>(x), p.w = ptr<const bf16>(w), p.y = ptr<float>(y), p.M = M, p.N = N, p.K = K;
  p.alpha = alpha, p.softcap = softcap, p.cache = cache;
  DG_CUDA_CHECK(kernels::gemm_bf16_tn_logits(p, stream_of(stream)));
}

void launch_grouped_gemm_bf16_tn(uintptr_t a, uintptr_t w, uintptr_t offsets, uintptr_t d, int G, int N, int K,
                                 uintptr_t workspace, size_t workspace_bytes, kernels::ParamsCache* cache,
                                 uintptr_t stream) {
  kernels::GroupedGemmBf16Params p;
  p.a = ptr<const bf16>(a), p.w = ptr<const bf16>(w), p.offsets = ptr<const int32_t>(offsets), p.d = ptr<bf16>(d);
  p.G = G, p.N = N, p.K = K, p.workspace = ptr<void>(workspace), p.workspace_bytes = workspace_bytes;
  p.cache = cache;
  DG_CUDA_CHECK(kernels::grouped_gemm_bf16_tn(p, stream_of(stream)));
}
#endif

RegisterCudaOps reg([](py::module_& m) {
  using py::arg;
  m.def("launch_attention", &launch_attention, arg("q"), arg("k_new"), arg("v_new"), arg("k_cache"), arg("v_cache"),
        arg("block_table"), arg("cache_first_pos"), arg("cache_start"), arg("cache_len"), arg("tok0"), arg("count"),
        arg("out"), arg("workspace"), arg("workspace_bytes"), arg("rows"), arg("heads"), arg("kv_heads"),
        arg("head_dim"), arg("block_size"), arg("max_blocks_per_row"), arg("max_count"), arg("max_cached"),
        arg("causal"), arg("window"), arg("scale"), arg("splits"), arg("stream"),
        "Launch only: attention_forward on device pointers (attention.cuh's layouts), on `stream`");
  m.def("launch_grouped_gemm_nvfp4", &launch_grouped_gemm_nvfp4, arg("x"), arg("w"), arg("w_global"), arg("offsets"),
        arg("y"), arg("G"), arg("N"), arg("K"), arg("gated"), arg("gather"), arg("gather_div"),
        arg("expected_rows"), arg("path"), arg("stream"),
        "Launch only: the W4A16 grouped GEMM on device pointers (w pre-shuffled, "
        "grouped_gemm_nvfp4_weight_bytes per expert; gather 0: none; path 'auto' picks the kernel from "
        "expected_rows, 'mma' / 'wgmma' force one)");
  m.def("grouped_gemm_nvfp4_weight_bytes", &kernels::grouped_gemm_nvfp4_weight_bytes, arg("N"), arg("K"),
        arg("gated"), "Bytes of one expert's pre-shuffled W4A16 weights");
  m.def("launch_moe_router", &launch_moe_router, arg("x"), arg("router_proj"), arg("router_scale"),
        arg("per_expert_scale"), arg("topk_idx"), arg("topk_w"), arg("workspace"), arg("T"), arg("H"), arg("E"),
        arg("k"), arg("eps"), arg("stream"), "Launch only: moe_router, float32 x (workspace: any contents)");
  m.def("moe_router_workspace_bytes", &kernels::moe_router_workspace_bytes, arg("T"), arg("E"));
  m.def("launch_moe_gelu_gate", &launch_moe_gelu_gate, arg("h"), arg("act"), arg("M"), arg("I"), arg("stream"),
        "Launch only: act [M, I] = gelu_tanh(h[:, :I]) * h[:, I:]");
  m.def("launch_lm_head_sample_fused", &launch_lm_head_sample_fused, arg("x"), arg("emb"), arg("temperature"),
        arg("uniform"), arg("token"), arg("argmax"), arg("entropy"), arg("soft"), arg("soft_index"),
        arg("fallback"), arg("workspace"), arg("workspace_bytes"), arg("P"), arg("H"), arg("V"), arg("n"),
        arg("softcap"), arg("soft_scale"), arg("stream"),
        "Launch only: the fused LM head + sampler + soft embedding on device pointers (fallback 0: not "
        "reported)");
  m.def("lm_head_sample_workspace_bytes", &kernels::lm_head_sample_workspace_bytes, arg("P"), arg("H"), arg("V"));
  m.def("launch_matmul_bf16", &launch_matmul_bf16, arg("x"), arg("w"), arg("y"), arg("M"), arg("N"), arg("K"),
        arg("y_f32"), arg("w_kn"), arg("alpha"), arg("softcap"), arg("split_k"), arg("workspace"),
        arg("workspace_bytes"), arg("stream"), "Launch only: the mma.sync matmul (matmul.cuh) on device pointers");
#if defined(DGEMMA_WITH_CUTLASS)
  // cuda_ops.ParamsCache is _testing.ParamsCache (module.cpp): pybind11 registers a C++ type once.
  m.def("launch_gemm_bf16_tn", &launch_gemm_bf16_tn, arg("x"), arg("w"), arg("y"), arg("M"), arg("N"), arg("K"),
        arg("cache"), arg("stream"), "Launch only: the CUTLASS sm90 bf16 GEMM y = x @ w^T on device pointers");
  m.def("launch_gemm_bf16_tn_logits", &launch_gemm_bf16_tn_logits, arg("x"), arg("w"), arg("y"), arg("M"), arg("N"),
        arg("K"), arg("alpha"), arg("softcap"), arg("cache"), arg("stream"),
        "Launch only: the CUTLASS sm90 logits GEMM y f32 = softcap(alpha * x @ w^T) on device pointers");
  m.def("launch_grouped_gemm_bf16_tn", &launch_grouped_gemm_bf16_tn, arg("a"), arg("w"), arg("offsets"), arg("d"),
        arg("G"), arg("N"), arg("K"), arg("workspace"), arg("workspace_bytes"), arg("cache"), arg("stream"),
        "Launch only: the CUTLASS sm90 grouped bf16 GEMM on device pointers");
  m.def("grouped_gemm_bf16_tn_workspace_size", &kernels::grouped_gemm_bf16_tn_workspace_size, arg("G"));
#endif
});

}  // namespace
}  // namespace dgemma::bindings
