// Fused attention for DiffusionGemma: BF16 in/out, fp32 scores, online softmax and fp32
// accumulation; the score matrix is never materialised in global memory.
//
// One call covers all rows (requests) of a forward pass. Row r owns the new tokens
// [tok0[r], tok0[r] + count[r]) of q / k_new / v_new / out, at positions cache_len[r] + j. Its keys,
// in order, are its cached positions [cache_start[r], cache_len[r]), read through the paged cache,
// then its own new tokens (this call's K/V, attended in place: the cache does not hold them yet).
//   decoder (causal = false): every query sees every key of its row (the canvas is bidirectional).
//   encoder (causal = true):  key visible iff key_pos <= query_pos, and key_pos > query_pos - window
//                             when window > 0 (sliding layers).
// GQA: query head h reads KV head h / (num_heads / num_kv_heads). Layers whose V is derived from K
// (the full layers' v_norm(k)) are handled by the caller: it passes that V as v_new / v_cache.
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
// rows' token ranges lie inside [0, T). block_size is a power of two (checked: cudaErrorInvalidValue).
// Output tokens that belong to no row are not written. Cache slots outside a row's visible range
// are never read, so they may hold anything (NaN included). A query that sees no key (impossible
// with the masks above) gets a zero output.
//
// Split-KV (optional): with a device workspace of at least attention_workspace_bytes(p) bytes, a
// call whose grid would leave SMs idle (small batches, long contexts) splits each CTA's keys over
// several CTAs that write fp32 partials, merged by a second kernel in a fixed order. Bitwise
// deterministic for given inputs and split count; the automatic count depends on the grid (rows,
// max_count, max_cached) and the SM count, so pass `splits` to pin it (e.g. for batch invariance).
// Without a workspace (nullptr or too small) the call runs unsplit: same contract, fewer CTAs.
//
// Kernels (attention_plan.h for the tile and split math, the kernel headers for their designs):
//   sm90_attention_kernel.cuh: sm_90a, wgmma; used on Hopper when built with CUTLASS/CuTe headers;
//   sm80_attention_kernel.cuh: mma.sync; everywhere else (sm_100a, sm_120a, builds without CUTLASS);
//   attention_combine.cuh:     the split-KV merge.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>
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
  int block_size = 0;  // a power of two
  int max_blocks_per_row = 0;
  int max_count = 0;  // host-side upper bound of count[r]: sizes the grid (count lives on the device)
  bool causal = false;
  int window = 0;  // 0 = none; only used when causal
  float scale = 1.0f;
  // Split-KV. max_cached only steers the split choice (the device computes the parts from the real
  // counts), so a loose bound costs speed, never correctness.
  void* workspace = nullptr;  // 16-byte aligned device buffer for the fp32 partials
  size_t workspace_bytes = 0;
  int splits = 0;      // parts per CTA's key range: 0 = chosen from the grid and the SM count; n > 0: n
  int max_cached = 0;  // host-side upper bound of cache_len[r] - cache_start[r]
  // The mma.sync kernel even where the wgmma one would run (tests: it ships for Blackwell and builds
  // without CUTLASS, so a Hopper run checks it too).
  bool mma_sync = false;
};

// What a call will launch on the current device (attention_launch_plan): the kernel, its tile
// shape and the split-KV parts (1 = unsplit), and the workspace that split needs.
struct AttentionLaunchPlan {
  bool sm90 = false;  // the wgmma kernel (else the mma.sync one)
  int block_m = 0;
  int block_n = 0;
  int splits = 1;
  size_t workspace_bytes = 0;  // needed for `splits`; 0 when unsplit
};

// One instantiation per head_dim, each in its own .cu (attention_hd<D>.cu).
template <int kHeadDim>
cudaError_t attention_forward_hd(const AttentionParams& p, cudaStream_t stream);
template <int kHeadDim>
cudaError_t attention_launch_plan_hd(const AttentionParams& p, AttentionLaunchPlan* plan);
extern template cudaError_t attention_forward_hd<256>(const AttentionParams&, cudaStream_t);
extern template cudaError_t attention_forward_hd<512>(const AttentionParams&, cudaStream_t);
extern template cudaError_t attention_launch_plan_hd<256>(const AttentionParams&, AttentionLaunchPlan*);
extern template cudaError_t attention_launch_plan_hd<512>(const AttentionParams&, AttentionLaunchPlan*);

// The plan for p on the current device, ignoring p.workspace: plan->workspace_bytes is what a
// workspace must hold for the split to happen. cudaErrorInvalidValue as attention_forward.
inline cudaError_t attention_launch_plan(const AttentionParams& p, AttentionLaunchPlan* plan) {
  switch (p.head_dim) {
    case 256:
      return attention_launch_plan_hd<256>(p, plan);
    case 512:
      return attention_launch_plan_hd<512>(p, plan);
    default:
      return cudaErrorInvalidValue;
  }
}

// Bytes of workspace that let p run split (0: it would not split on this device); 0 on invalid p.
inline size_t attention_workspace_bytes(const AttentionParams& p) {
  AttentionLaunchPlan plan;
  return attention_launch_plan(p, &plan) == cudaSuccess ? plan.workspace_bytes : 0;
}

// Any even head_dim up to 512 (attention_generic.cu): one warp per (row, token, query head), fp32
// online softmax over the keys one at a time. For head sizes the tiled kernels below do not cover
// (small models) and as their device-side reference; ignores the split-KV fields.
cudaError_t attention_forward_generic(const AttentionParams& p, cudaStream_t stream);

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
