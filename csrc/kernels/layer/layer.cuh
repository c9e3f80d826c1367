// Small per-layer kernels of the CUDA backend (issue #3): token embedding, per-head q/k/v norm + RoPE,
// paged KV-cache writes, the residual-stream norm-and-add steps of a decoder layer, and the final logit
// softcap. Each mirrors a CPU op (csrc/backend/cpu/cpu_backend.cpp) of the forward (csrc/model/forward.cpp)
// with csrc/backend/cpu/ops.cpp's rmsnorm and rope; all statistics are float32.
//
// Layouts (row-major, contiguous):
//   embedding table E:   bf16 [vocab, hidden]
//   q / k / v:           bf16 [tokens, heads, head_dim]   (the projection outputs, normalised in place)
//   KV cache (per layer): bf16 [num_blocks, block_size, num_kv_heads, head_dim]; token t goes to flat slot
//                        slot[t] = block * block_size + offset, i.e. row slot[t] of a [num_slots, kv_heads *
//                        head_dim] view (num_slots = num_blocks * block_size).
//   residual x:          float32 [tokens, hidden]
//   norm weights, inv_freq: float32 (small vectors, converted at load like the MoE router's scales).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace dgemma::kernels {

// out[t, :] = E[ids[t], :] * scale  (Gemma: sqrt(hidden) in the model's dtype). ids are trusted: the host checks
// them against vocab before upload.
template <typename To>  // float or __nv_bfloat16
struct EmbedParams {
  const __nv_bfloat16* table = nullptr;  // [vocab, hidden]
  const int32_t* ids = nullptr;          // [tokens]
  To* out = nullptr;                     // [tokens, hidden]
  int tokens = 0;
  int hidden = 0;
  float scale = 1.f;
};
template <typename To>
cudaError_t embed_tokens(const EmbedParams<To>& p, cudaStream_t stream);

// In place on x [tokens, heads, head_dim], for every (token, head) row:
//   y = x * (mean(x^2) + eps)^-0.5 * weight        (weight null: no scale -- the v_norm case)
//   then, if positions is non-null, rotate-half RoPE on y:
//     angle_i = float(positions[t]) * inv_freq[i], i < head_dim / 2 (inv_freq[i] == 0: pair unrotated)
//     y[i] = a cos - b sin, y[i + half] = b cos + a sin   (a = y[i], b = y[i + half])
// One rounding to bf16 at the end (the CPU reference keeps float between norm and rope).
// Preconditions: head_dim even when positions is set; positions and inv_freq both set or both null.
struct HeadNormRopeParams {
  __nv_bfloat16* x = nullptr;          // [tokens, heads, head_dim], in place
  const float* weight = nullptr;       // [head_dim] or null
  const int32_t* positions = nullptr;  // [tokens] or null (no RoPE)
  const float* inv_freq = nullptr;     // [head_dim / 2] or null
  int tokens = 0;
  int heads = 0;
  int head_dim = 0;
  float eps = 1e-6f;
};
cudaError_t head_norm_rope(const HeadNormRopeParams& p, cudaStream_t stream);
// The same on up to kHeadNormRopeMaxTensors tensors in one launch (a layer's q, k and v; they must not
// overlap): each row gets exactly head_norm_rope's arithmetic. Tensors with no rows are skipped.
constexpr int kHeadNormRopeMaxTensors = 3;
cudaError_t head_norm_rope_multi(const HeadNormRopeParams* ps, int n, cudaStream_t stream);

// q_norm/k_norm + RoPE.
inline cudaError_t qk_norm_rope(__nv_bfloat16* x, const float* weight, const int32_t* positions,
                                const float* inv_freq, int tokens, int heads, int head_dim, float eps,
                                cudaStream_t stream) {
  return head_norm_rope(HeadNormRopeParams{x, weight, positions, inv_freq, tokens, heads, head_dim, eps}, stream);
}
// v_norm: scale-free RMSNorm per head. On K=V layers pass a copy of k taken before k's norm/rope.
inline cudaError_t v_norm(__nv_bfloat16* v, int tokens, int heads, int head_dim, float eps, cudaStream_t stream) {
  return head_norm_rope(HeadNormRopeParams{v, nullptr, nullptr, nullptr, tokens, heads, head_dim, eps}, stream);
}

// k_cache[slot[t]] = k[t], v_cache[slot[t]] = v[t] (rows of row_elems = kv_heads * head_dim bf16).
// slot[t] < 0 skips the token (positions the cache does not keep); slot[t] >= num_slots is also skipped
// (a caller bug, but never an out-of-bounds write). Destination slots must be distinct.
struct KvCacheWriteParams {
  const __nv_bfloat16* k = nullptr;  // [tokens, kv_heads, head_dim]
  const __nv_bfloat16* v = nullptr;  // [tokens, kv_heads, head_dim]
  __nv_bfloat16* k_cache = nullptr;  // [num_blocks, block_size, kv_heads, head_dim]
  __nv_bfloat16* v_cache = nullptr;
  const int32_t* slot = nullptr;     // [tokens]
  int tokens = 0;
  int row_elems = 0;                 // kv_heads * head_dim
  int64_t num_slots = 0;             // num_blocks * block_size
};
cudaError_t kv_cache_write(const KvCacheWriteParams& p, cudaStream_t stream);

// Optional norms of the residual a kernel below has just updated, in the same pass over the row:
// out[t] = rmsnorm(x[t]) * w with rmsnorm_mixed's arithmetic (kernels/norm/rmsnorm.cuh: same per-thread
// fmaf order, reduction tree and rounding), so the fused kernel gives bit for bit what the unfused
// kernel followed by rmsnorm_mixed<float, T> gives. out null: none; w null: no scale.
template <typename T>
struct TrailingNorm {
  T* out = nullptr;          // [tokens, hidden]
  const float* w = nullptr;  // [hidden]
};

// x[t] += rmsnorm(h[t]) * weight   (post_attention_layernorm, then the residual add), then the trailing
// norms a and b of x (the pre-FFN norms). a.out may alias h (each row's h is read before any of its
// outputs is written); b.out aliases nothing.
template <typename Th>  // float or __nv_bfloat16
struct ResidualNormAddParams {
  float* x = nullptr;             // [tokens, hidden], in place
  const Th* h = nullptr;          // [tokens, hidden]
  const float* weight = nullptr;  // [hidden]
  int tokens = 0;
  int hidden = 0;
  float eps = 1e-6f;
  TrailingNorm<Th> a, b;
};
template <typename Th>
cudaError_t residual_norm_add(const ResidualNormAddParams<Th>& p, cudaStream_t stream);

// The FFN tail of a layer, exactly CpuBackend::ffn_combine:
//   h1 = rmsnorm(dense[t]) * w1; h2 = rmsnorm(moe[t]) * w2
//   x[t] = (x[t] + rmsnorm(h1 + h2) * w) * layer_scalar
// then the trailing norm `next` of x (the next layer's input norm, or the final norm; aliases nothing).
template <typename Td, typename Tm>  // each float or __nv_bfloat16
struct FfnCombineParams {
  float* x = nullptr;          // [tokens, hidden], in place
  const Td* dense = nullptr;   // [tokens, hidden]  dense MLP output (mlp_down)
  const Tm* moe = nullptr;     // [tokens, hidden]  MoE output
  const float* w1 = nullptr;   // [hidden] post_feedforward_layernorm_1
  const float* w2 = nullptr;   // [hidden] post_feedforward_layernorm_2
  const float* w = nullptr;    // [hidden] post_feedforward_layernorm
  int tokens = 0;
  int hidden = 0;
  float eps = 1e-6f;
  float layer_scalar = 1.f;
  TrailingNorm<Td> next;
};
template <typename Td, typename Tm>
cudaError_t ffn_combine(const FfnCombineParams<Td, Tm>& p, cudaStream_t stream);

// Row moves by an index list (kernels/layer/rows.cu): the CUDA backend's token compaction and
// expansion (e.g. the canvas rows of a batch, the self-conditioning rows). Byte copies, so any dtype;
// 16-byte vector copies when row_bytes and both base pointers allow, else 4- or 2-byte copies.
// m == 0 (or row_bytes == 0) is a no-op; m < 0, row_bytes < 0 or odd, or a null pointer (with m > 0):
// cudaErrorInvalidValue. Indices are trusted (the caller checks them against the row count of the
// indexed buffer); src and dst must not overlap.
//
// dst[i, :] = src[index[i], :] for i < m; rows of row_bytes bytes (row_bytes % 2 == 0). index < 0 zeroes
// dst row i (all-zero bytes: 0 in every dtype the backend moves).
cudaError_t gather_rows(const void* src, const int32_t* index, void* dst, int64_t m, int64_t row_bytes,
                        cudaStream_t stream);
// dst[index[i], :] = src[i, :] for i < m with index[i] >= 0 (distinct: no two rows race); rows of
// row_bytes bytes (row_bytes % 2 == 0). index < 0 skips source row i.
cudaError_t scatter_rows(const void* src, const int32_t* index, void* dst, int64_t m, int64_t row_bytes,
                         cudaStream_t stream);
// dst[index[i], :] += float(src[i, :]); dst f32 [*, d], src bf16 [m, d]; indices distinct (no atomics,
// one f32 add per element, so deterministic); index < 0 skips row i. d == 0 is a no-op, d < 0 invalid.
cudaError_t scatter_add_rows(float* dst, const __nv_bfloat16* src, const int32_t* index, int64_t m, int64_t d,
                             cudaStream_t stream);

// y = tanhf(y / cap) * cap in place (final_logit_softcapping), float32 [n].
cudaError_t softcap(float* y, int64_t n, float cap, cudaStream_t stream);

}  // namespace dgemma::kernels
