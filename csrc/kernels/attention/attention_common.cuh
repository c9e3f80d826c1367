// Device pieces both attention kernels share: the launch arguments, cp.async, the gather of Q and of
// key tiles through the plan (attention_plan.h), and the epilogue that writes either the final
// bf16 output or a split-KV partial. Included only by the kernel headers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/attention/attention.cuh"
#include "kernels/attention/attention_plan.h"

namespace dgemma::kernels::attention_detail {

using attention_plan::KeyTile;

// What every kernel of a call receives.
struct AttnArgs {
  AttentionParams p;
  int lg_bs;      // log2(block_size)
  int splits;     // split-KV parts (1: the kernel writes `out` itself)
  float* ws_o;    // splits > 1: fp32 partial outputs [splits][rows * max_count * heads][head_dim]
  float2* ws_ml;  // splits > 1: (running max in the log2 domain, sum) [splits][rows * max_count * heads]
};

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte async copy; src_bytes = 0 writes zeros (src is then not read but must be a valid address).
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(smem)), "l"(gmem), "r"(src_bytes)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // .x (low 16 bits) = lo
  return *reinterpret_cast<const uint32_t*>(&v);
}

// A row's setup, read once per CTA.
struct RowCtx {
  attention_plan::RowKeys rk;
  int tok0;
  const int32_t* blocks;  // this row's block table
};
__device__ __forceinline__ RowCtx row_ctx(const AttentionParams& p, int row) {
  RowCtx c;
  c.rk = attention_plan::row_keys(p.cache_first_pos[row], p.cache_start[row], p.cache_len[row], p.count[row]);
  c.tok0 = p.tok0[row];
  c.blocks = p.block_table + static_cast<size_t>(row) * p.max_blocks_per_row;
  return c;
}

// Where one KV head's K (or V) rows come from.
struct KvSrc {
  const __nv_bfloat16* cache;  // k_cache or v_cache
  const __nv_bfloat16* fresh;  // k_new or v_new
  const int32_t* blocks;
  int lg_bs, tok0, kv_head, kv_heads;
};

// Issues the cp.async of tile kt (BN rows x D dims) of K or V. Eight consecutive threads copy one
// 128-byte segment of a row, so a thread owns rows r0 + i * (kThreads / 8) and the 16-byte chunks
// seg + 8 k of each: one slot computation per row and tile, D / 64 copies per row. Rows outside the
// row's keys are zero-filled (their scores are masked; V must be finite there since P = 0 multiplies
// it). dst(i, k, seg): the shared-memory address of chunk seg + 8 k of tile row i.
template <int BN, int D, int kThreads, class Dst>
__device__ __forceinline__ void load_key_tile(const KeyTile& kt, const KvSrc& s, Dst dst) {
  static_assert(kThreads % 8 == 0 && BN % (kThreads / 8) == 0 && D % 64 == 0, "copy passes");
  constexpr int kRowsPerPass = kThreads / 8;
  const int seg = threadIdx.x & 7, r0 = threadIdx.x >> 3;
  const size_t stride = static_cast<size_t>(s.kv_heads) * D;
#pragma unroll
  for (int pass = 0; pass < BN / kRowsPerPass; ++pass) {
    const int i = r0 + pass * kRowsPerPass;
    const int pos = kt.pos0 + i;
    const bool valid = pos >= kt.lo && pos < kt.hi;
    const __nv_bfloat16* src = s.fresh;  // any valid address for the zero fill
    if (valid) {
      const int64_t tok = kt.cached ? attention_plan::cache_slot(s.blocks, kt.idx0 + i, s.lg_bs)
                                    : static_cast<int64_t>(s.tok0 + kt.idx0 + i);
      src = (kt.cached ? s.cache : s.fresh) + static_cast<size_t>(tok) * stride +
            static_cast<size_t>(s.kv_head) * D;
    }
#pragma unroll
    for (int k = 0; k < D / 64; ++k) cp_async_16(dst(i, k, seg), src + (seg + 8 * k) * 8, valid ? 16 : 0);
  }
}

// Issues the cp.async of the Q tile: flattened rows f0 + r (r < BM) of KV head kv_head, zeros past
// f_end. Same thread mapping as load_key_tile; dst(r, k, seg) as there.
template <int BM, int D, int kThreads, class Dst>
__device__ __forceinline__ void load_q_tile(const AttentionParams& p, int tok0, int kv_head, int group, int f0,
                                            int f_end, Dst dst) {
  static_assert(BM % (kThreads / 8) == 0, "copy passes");
  constexpr int kRowsPerPass = kThreads / 8;
  const int seg = threadIdx.x & 7, r0 = threadIdx.x >> 3;
#pragma unroll
  for (int pass = 0; pass < BM / kRowsPerPass; ++pass) {
    const int r = r0 + pass * kRowsPerPass;
    const int f = f0 + r;
    const bool valid = f < f_end;
    const __nv_bfloat16* src = p.q;
    if (valid) {
      const int t = f / group, h = kv_head * group + f % group;
      src = p.q + (static_cast<size_t>(tok0 + t) * p.num_heads + h) * D;
    }
#pragma unroll
    for (int k = 0; k < D / 64; ++k) cp_async_16(dst(r, k, seg), src + (seg + 8 * k) * 8, valid ? 16 : 0);
  }
}

// One query row's destination in the epilogue: flattened row f of KV head kv_head in `row`.
struct OutRow {
  bool valid;
  size_t out_off;  // element offset of out[tok0 + t, h, 0]
  size_t q_index;  // (row * max_count + t) * heads + h: the row of the split-KV workspace
};
__device__ __forceinline__ OutRow out_row(const AttentionParams& p, int row, int tok0, int kv_head, int group, int f,
                                          int f_end, int head_dim) {
  OutRow o;
  o.valid = f < f_end;
  const int t = f / group, h = kv_head * group + f % group;
  o.out_off = (static_cast<size_t>(tok0 + t) * p.num_heads + h) * head_dim;
  o.q_index = (static_cast<size_t>(row) * p.max_count + t) * p.num_heads + h;
  return o;
}

// Epilogue for a pair of adjacent output dims (d, d + 1) of one query row: the normalised bf16 output,
// or (split-KV) the unnormalised fp32 partial.
__device__ __forceinline__ void store_pair(const AttnArgs& a, const OutRow& o, int split, int d, float v0, float v1,
                                           float inv_l) {
  if (a.splits == 1) {
    *reinterpret_cast<__nv_bfloat162*>(a.p.out + o.out_off + d) = __floats2bfloat162_rn(v0 * inv_l, v1 * inv_l);
  } else {
    const size_t nq = static_cast<size_t>(a.p.rows) * a.p.max_count * a.p.num_heads;
    *reinterpret_cast<float2*>(a.ws_o + (split * nq + o.q_index) * a.p.head_dim + d) = make_float2(v0, v1);
  }
}
__device__ __forceinline__ void store_stats(const AttnArgs& a, const OutRow& o, int split, float m, float l) {
  const size_t nq = static_cast<size_t>(a.p.rows) * a.p.max_count * a.p.num_heads;
  a.ws_ml[split * nq + o.q_index] = make_float2(m, l);
}

// Online-softmax step for one query row held by a quad of lanes (values v[0..n) of this lane, already
// scaled to the log2 domain and masked with -inf): updates the running max m and sum l and returns the
// factor the accumulator must be multiplied by. v becomes exp2(v - m_new).
template <int N>
__device__ __forceinline__ float online_softmax_row(float (&v)[N], float& m, float& l) {
  float mx = -INFINITY;
#pragma unroll
  for (int i = 0; i < N; ++i) mx = fmaxf(mx, v[i]);
  mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
  mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
  const float m_new = fmaxf(m, mx);
  const float base = m_new == -INFINITY ? 0.f : m_new;  // nothing visible yet: avoid inf - inf
  const float alpha = exp2f(m - base);
  m = m_new;
  float sum = 0.f;
#pragma unroll
  for (int i = 0; i < N; ++i) {
    v[i] = exp2f(v[i] - base);
    sum += v[i];
  }
  l = l * alpha + sum;  // this lane's columns only; quad-reduced at the end
  return alpha;
}

__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  x += __shfl_xor_sync(0xffffffffu, x, 2);
  return x;
}

}  // namespace dgemma::kernels::attention_detail
