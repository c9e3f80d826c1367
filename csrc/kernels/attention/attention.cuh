// Fused attention for DiffusionGemma (FlashAttention-2 style): BF16 in/out, fp32 scores, online
// softmax and fp32 accumulation; the score matrix is never materialised in global memory.
//
// One call covers all rows (requests) of a forward pass. Row r owns the new tokens
// [tok0[r], tok0[r] + count[r]) of q / k_new / v_new / out, at positions cache_len[r] + j. Its keys,
// in order, are its cached positions [cache_start[r], cache_len[r]), read through the paged cache,
// then its own new tokens (this call's K/V, attended in place: the cache does not hold them yet).
//   decoder (causal = false): every query sees every key of its row (the canvas is bidirectional).
//   encoder (causal = true):  key visible iff key_pos <= query_pos, and key_pos > query_pos - window
//                             when window > 0 (sliding layers).
// GQA: query head h reads KV head h / (num_heads / num_kv_heads).
//
// Layouts (row-major, bf16 unless noted; all pointers device pointers, bf16 ones 16-byte aligned):
//   q, out:           [T, num_heads, head_dim]       (q already normed and rotated)
//   k_new, v_new:     [T, num_kv_heads, head_dim]
//   k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]   (this layer's pool)
//   block_table:      int32 [rows, max_blocks_per_row]; cached position p of row r lives in block
//                     block_table[r][(p - cache_first_pos[r]) / block_size] at offset
//                     (p - cache_first_pos[r]) % block_size.
//   cache_first_pos, cache_start, cache_len, tok0, count: int32 [rows]
// Preconditions (not checked on the device): cache_first_pos <= cache_start <= cache_len when the
// row has cached keys; the block table covers [cache_start, cache_len); count[r] <= max_count;
// rows' token ranges lie inside [0, T). Output tokens that belong to no row are not written.
// A query that sees no key (impossible with the masks above) gets a zero output.
//
// Kernel shape (attention_kernel.cuh): one CTA per (query tile, KV head, row). The query tile packs
// the (token, head) pairs of one KV head's query heads, so each K/V tile loaded from memory serves
// every query head of the group. head_dim is split over warps (128 dims each) so that the output
// accumulator of head_dim 512 fits in registers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace dgemma::kernels {

struct AttentionParams {
  const __nv_bfloat16* q = nullptr;
  const __nv_bfloat16* k_new = nullptr;
  const __nv_bfloat16* v_new = nullptr;
  const __nv_bfloat16* k_cache = nullptr;  // may be null when no row has cached keys
  const __nv_bfloat16* v_cache = nullptr;
  const int32_t* block_table = nullptr;
  const int32_t* cache_first_pos = nullptr;
  const int32_t* cache_start = nullptr;
  const int32_t* cache_len = nullptr;
  const int32_t* tok0 = nullptr;
  const int32_t* count = nullptr;
  __nv_bfloat16* out = nullptr;
  int rows = 0;
  int num_heads = 0;
  int num_kv_heads = 0;
  int head_dim = 0;
  int block_size = 0;
  int max_blocks_per_row = 0;
  int max_count = 0;  // host-side upper bound of count[r]: sizes the grid (count lives on the device)
  bool causal = false;
  int window = 0;  // 0 = none; only used when causal
  float scale = 1.0f;
};

// One instantiation per head_dim, each in its own .cu (attention_hd<D>.cu).
template <int kHeadDim>
cudaError_t attention_forward_hd(const AttentionParams& p, cudaStream_t stream);
extern template cudaError_t attention_forward_hd<256>(const AttentionParams&, cudaStream_t);
extern template cudaError_t attention_forward_hd<512>(const AttentionParams&, cudaStream_t);

// Dispatch on head_dim; cudaErrorInvalidValue for an unsupported head_dim or inconsistent sizes.
inline cudaError_t attention_forward(const AttentionParams& p, cudaStream_t stream) {
  switch (p.head_dim) {
    case 256:
      return attention_forward_hd<256>(p, stream);
    case 512:
      return attention_forward_hd<512>(p, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace dgemma::kernels
