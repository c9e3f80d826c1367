// What the two W4A16 grouped GEMMs share (grouped_gemm_nvfp4.cu: mma.sync, 64-token passes;
// sm90_grouped_gemm_nvfp4_wgmma.cu: wgmma, 128-token passes): the CTA shape, the stage loader that
// moves one unit of pre-shuffled weights and the tokens' activation slice into shared memory, the
// per-k-step decode of a warp's A fragment, and the epilogue. Layout and decode:
// common/nvfp4_w4a16_layout.h.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

#include "common/nvfp4_w4a16_layout.h"
#include "kernels/common/bf16.cuh"
#include "kernels/common/ptx.cuh"
#include "kernels/nvfp4/nvfp4.cuh"

namespace dgemma::kernels::w4a16_detail {

namespace L = nvfp4::w4a16;

constexpr int kThreads = L::kWarps * 32;  // 256: warp w owns MMA row block 8 * blockIdx.x + w

__device__ __forceinline__ void cp_async16_evict_first(uint32_t dst, const void* src, uint64_t policy) {
  asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "l"(policy));
}

// a * (the low or high half of s, broadcast): HMUL2.BF16 with an operand selector, no extra instruction.
template <int Half>
__device__ __forceinline__ uint32_t scale_by(uint32_t a, uint32_t s) {
  const __nv_bfloat162 av = *reinterpret_cast<const __nv_bfloat162*>(&a);
  const __nv_bfloat162 sv = *reinterpret_cast<const __nv_bfloat162*>(&s);
  const __nv_bfloat162 r = __hmul2(av, Half ? __high2bfloat162(sv) : __low2bfloat162(sv));
  return *reinterpret_cast<const uint32_t*>(&r);
}

// This warp's part of a stage's weight unit: 4 words of codes (one per k-step) and 8 scale bytes.
struct WarpWeights {
  uint32_t words[L::kKSteps];
  uint2 scales;
};
__device__ __forceinline__ WarpWeights warp_weights(const uint8_t* unit) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const uint4 wq = *reinterpret_cast<const uint4*>(unit + warp * L::kTileWeightBytes + 16 * lane);
  WarpWeights w;
  w.words[0] = wq.x, w.words[1] = wq.y, w.words[2] = wq.z, w.words[3] = wq.w;
  w.scales = *reinterpret_cast<const uint2*>(unit + L::kScaleOffset + warp * L::kTileScaleBytes + 8 * (lane / 4));
  return w;
}

// The bf16 A fragment (mma.m16n8k16's, which is also wgmma's per-warp register A) of k-step j:
// e2m1 * scale * 2^-7, exact.
__device__ __forceinline__ void decode_kstep(const WarpWeights& w, int j, uint32_t (&a)[4]) {
  L::decode_word(w.words[j], a);
  const uint32_t s = L::scale_pair(j < 2 ? w.scales.x : w.scales.y, j);
  a[0] = scale_by<0>(a[0], s);  // rows gid
  a[1] = scale_by<1>(a[1], s);  // rows gid + 8
  a[2] = scale_by<0>(a[2], s);
  a[3] = scale_by<1>(a[3], s);
}

// Issues the copies of one stage after another (k-tiles in order 0, 1, 2, ...): the weight unit
// (16 bytes per thread, the scales on warp 0) and the activation chunks of kRows token rows
// (L::act_chunk_offset's swizzled layout), zero-filled for padding tokens and past K. A thread's
// chunks share their column (chunk tid % 8) and lie 32 rows apart, so it keeps one source pointer
// per chunk, one destination offset and one column.
template <int kRows>
struct StageLoader {
  static constexpr int kChunks = kRows * 8;  // 16 bytes each
  static constexpr int kPer = (kChunks + kThreads - 1) / kThreads;
  static constexpr int kRowStride = kThreads / 8;  // rows between a thread's chunks
  static_assert(kChunks <= kThreads || kChunks % kThreads == 0, "whole rounds of chunks");
  static_assert(kRowStride % 8 == 0, "a thread's chunks keep their swizzle phase");
  const uint8_t* w;                // the next unit of this CTA's weights
  const __nv_bfloat16* src[kPer];  // the next chunk of each of this thread's token rows
  uint32_t dst;                    // offset of its first chunk in an activation tile
  uint32_t tokens;                 // bit i: chunk i's row is a token (not padding)
  int col;                         // the chunks' first column in the next k-tile
  uint64_t policy;                 // L2 evict-first for the weights: each byte is read once

  // rows[r]: the x row of token r of the pass, -1 for padding (shared memory).
  __device__ __forceinline__ StageLoader(const GroupedGemmNvfp4Params& p, const uint8_t* w_cta, const int32_t* rows)
      : w(w_cta), tokens(0) {
    asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(policy));
    const int tid = threadIdx.x, row0 = tid / 8, ch = tid % 8;
    dst = L::act_chunk_offset(row0, ch);
    col = 8 * ch;
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int srow = tid + i * kThreads < kChunks ? rows[row0 + i * kRowStride] : -1;
      src[i] = p.x + (srow >= 0 ? static_cast<size_t>(srow) * p.K + col : 0);
      tokens |= (srow >= 0 ? 1u : 0u) << i;
    }
  }

  __device__ __forceinline__ void load(const GroupedGemmNvfp4Params& p, uint8_t* w_dst, uint32_t act_dst) {
    const int tid = threadIdx.x;
    cp_async16_evict_first(ptx::smem_u32(w_dst + 16 * tid), w + 16 * tid, policy);
    if (tid < 32) cp_async16_evict_first(ptx::smem_u32(w_dst + 16 * (kThreads + tid)), w + 16 * (kThreads + tid), policy);
    w += L::kUnitBytes;
    const bool in_k = col < p.K;
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      if (kChunks >= kThreads || tid < kChunks) {
        const bool ok = in_k && ((tokens >> i) & 1u);  // past K, or a padding token: zero-fill
        ptx::cp_async16(act_dst + dst + i * kRowStride * L::kActRowBytes,
                        ok ? static_cast<const void*>(src[i]) : static_cast<const void*>(p.x), ok ? 16u : 0u);
      }
      src[i] += L::kKTile;
    }
    col += L::kKTile;
  }
};

// The epilogue of a pass over tokens t0 .. t0 + 8 NT (those < m_end) of expert g: acc(n, i) is the fp32
// accumulator at MMA row acc_row(lane, i) of this warp's row block and token 8 n + acc_col(lane, i)
// (the mma.m16n8k16 C layout; wgmma's m64nN C layout gives each warp the same). Output = acc * global
// * 2^7 as bf16; gated: MMA row gid is gate feature f and row gid + 8 its up row, so each lane finishes
// gelu(gate) * up in registers, each rounded to bf16 first (bit-identical to the GEMM followed by
// moe_gelu_gate).
template <bool Gated, int NT, class Acc>
__device__ __forceinline__ void store_outputs(const GroupedGemmNvfp4Params& p, int g, int t0, int m_end, Acc acc) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, gid = lane / 4;
  const float gs = p.w_global[g] * L::kAccScale;
  const int b = L::kWarps * blockIdx.x + warp;
  if constexpr (Gated) {
    const int f = 8 * b + gid;
    if (f >= p.N / 2) return;
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int tok = t0 + 8 * n + L::acc_col(lane, i);
        if (tok < m_end) {
          const float gate = __bfloat162float(__float2bfloat16_rn(acc(n, i) * gs));
          const float up = __bfloat162float(__float2bfloat16_rn(acc(n, i + 2) * gs));
          p.y[static_cast<size_t>(tok) * (p.N / 2) + f] = __float2bfloat16_rn(gelu_tanh(gate) * up);
        }
      }
  } else {
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int tok = t0 + 8 * n + L::acc_col(lane, i);
        const int row = L::weight_row(b, L::acc_row(lane, i), p.N, false);
        if (tok < m_end && row >= 0) p.y[static_cast<size_t>(tok) * p.N + row] = __float2bfloat16_rn(acc(n, i) * gs);
      }
  }
}

// rows[r] for the tokens t0 .. t0 + kRows of expert g's pass (-1 past m_end): the x row each reads.
template <int kRows>
__device__ __forceinline__ void fill_rows(const GroupedGemmNvfp4Params& p, int t0, int m_end, int32_t* rows) {
  for (int r = threadIdx.x; r < kRows; r += kThreads) {
    const int tok = t0 + r;
    rows[r] = tok < m_end ? (p.gather ? p.gather[tok] / p.gather_div : tok) : -1;
  }
}

// Grid (groups(N, gated), G): CTA (c, g) computes MMA row blocks 8c .. 8c+7 of expert g.
__device__ __forceinline__ const uint8_t* cta_weights(const GroupedGemmNvfp4Params& p, bool gated, int g) {
  return p.w + static_cast<size_t>(g) * L::expert_bytes(p.N, p.K, gated) +
         static_cast<size_t>(blockIdx.x) * L::k_tiles(p.K) * L::kUnitBytes;
}

}  // namespace dgemma::kernels::w4a16_detail
