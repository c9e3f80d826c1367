#include "kernels/nvfp4/nvfp4.cuh"

#include "common/nvfp4_format.h"
#include "kernels/common/bf16.cuh"

namespace dgemma::kernels {
namespace {

constexpr int kWarps = 4;
constexpr int kRowsPerWarp = 16;                    // mma M (weight rows, i.e. output features)
constexpr int kRowsPerBlock = kWarps * kRowsPerWarp;  // 64
constexpr int kTokTiles = 4;                        // n8 tiles per warp: 32 tokens
constexpr int kTokens = 8 * kTokTiles;

// Two adjacent weights (one packed byte) times their block scale, as a bf16x2 register
// (the lower column in the low half, as mma expects).
__device__ __forceinline__ uint32_t dequant_pair(uint32_t byte, float scale) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(nvfp4::e2m1_to_float(byte & 0xF) * scale, nvfp4::e2m1_to_float(byte >> 4) * scale);
  return *reinterpret_cast<const uint32_t*>(&v);
}

__device__ __forceinline__ void mma_bf16_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

// grid (ceil(N / 64), G), 128 threads: warp w computes output features [n0, n0 + 16) for every
// token of expert g, 32 tokens at a time. Fragment layouts are mma.m16n8k16's: lane = 4 * gid + tig.
// Gated: warp w computes 8 features f0 + [0, 8) of act = gelu(gate) * up; its mma rows 0-7 are the
// gate rows f0 + gid and rows 8-15 the matching up rows I + f0 + gid, so each lane holds the gate
// and the up value of the same (token, feature) in its accumulator and finishes it in registers.
template <bool Gated>
__global__ void __launch_bounds__(kWarps * 32) grouped_gemm_nvfp4_kernel(GroupedGemmNvfp4Params p) {
  const int g = blockIdx.y;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int gid = lane / 4, tig = lane % 4;
  const int I = p.N / 2;  // gated: features per half
  int r0, r1;
  bool ok0, ok1;
  if constexpr (Gated) {
    const int f0 = blockIdx.x * (kWarps * 8) + warp * 8;
    if (f0 >= I) return;
    r0 = f0 + gid, r1 = I + f0 + gid;
    ok0 = ok1 = f0 + gid < I;
  } else {
    const int n0 = blockIdx.x * kRowsPerBlock + warp * kRowsPerWarp;
    if (n0 >= p.N) return;
    r0 = n0 + gid, r1 = n0 + gid + 8;
    ok0 = r0 < p.N, ok1 = r1 < p.N;
  }
  const int m_begin = p.offsets[g], m_end = p.offsets[g + 1];
  const size_t row_bytes = static_cast<size_t>(p.K) / 2, row_scales = static_cast<size_t>(p.K) / 16;
  const uint8_t* w0 = p.w + (static_cast<size_t>(g) * p.N + (ok0 ? r0 : 0)) * row_bytes;
  const uint8_t* w1 = p.w + (static_cast<size_t>(g) * p.N + (ok1 ? r1 : 0)) * row_bytes;
  const uint8_t* s0 = p.w_scale + (static_cast<size_t>(g) * p.N + (ok0 ? r0 : 0)) * row_scales;
  const uint8_t* s1 = p.w_scale + (static_cast<size_t>(g) * p.N + (ok1 ? r1 : 0)) * row_scales;
  const float global = p.w_global[g];

  for (int t0 = m_begin; t0 < m_end; t0 += kTokens) {
    float acc[kTokTiles][4] = {};
    // The x row behind each of this lane's B-fragment tokens (null past the expert's end): row `tok`
    // of x, or with `gather` the token's row of the unpermuted input (the permutation fused here).
    const __nv_bfloat16* xrow[kTokTiles];
#pragma unroll
    for (int j = 0; j < kTokTiles; ++j) {
      const int tok = t0 + j * 8 + gid;
      const int src = tok < m_end ? (p.gather ? p.gather[tok] / p.gather_div : tok) : -1;
      xrow[j] = src >= 0 ? p.x + static_cast<size_t>(src) * p.K + 2 * tig : nullptr;
    }
    for (int k0 = 0; k0 < p.K; k0 += 16) {
      const float sc0 = ok0 ? nvfp4::e4m3_to_float(s0[k0 / 16]) : 0.0f;
      const float sc1 = ok1 ? nvfp4::e4m3_to_float(s1[k0 / 16]) : 0.0f;
      const int b = k0 / 2 + tig;  // byte of columns k0 + 2*tig, +1; +4 bytes: columns + 8
      uint32_t a[4];
      a[0] = dequant_pair(ok0 ? w0[b] : 0u, sc0);
      a[1] = dequant_pair(ok1 ? w1[b] : 0u, sc1);
      a[2] = dequant_pair(ok0 ? w0[b + 4] : 0u, sc0);
      a[3] = dequant_pair(ok1 ? w1[b + 4] : 0u, sc1);
#pragma unroll
      for (int j = 0; j < kTokTiles; ++j) {
        uint32_t b0 = 0, b1 = 0;
        if (xrow[j]) {
          b0 = *reinterpret_cast<const uint32_t*>(xrow[j] + k0);
          b1 = *reinterpret_cast<const uint32_t*>(xrow[j] + k0 + 8);
        }
        mma_bf16_16816(acc[j], a, b0, b1);
      }
    }
    // d0, d1: row gid, tokens 2*tig, 2*tig+1; d2, d3: row gid + 8, the same tokens.
#pragma unroll
    for (int j = 0; j < kTokTiles; ++j) {
      if constexpr (Gated) {
        // rounded to bf16 first, as the unfused GEMM's output is: bit-identical to moe_gelu_gate
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          const int tok = t0 + j * 8 + 2 * tig + i;
          if (tok < m_end && ok0) {
            const float gate = __bfloat162float(__float2bfloat16_rn(acc[j][i] * global));
            const float up = __bfloat162float(__float2bfloat16_rn(acc[j][i + 2] * global));
            p.y[static_cast<size_t>(tok) * I + r0] = __float2bfloat16_rn(gelu_tanh(gate) * up);
          }
        }
      } else {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int tok = t0 + j * 8 + 2 * tig + (i & 1);
          const int row = i < 2 ? r0 : r1;
          if (tok < m_end && row < p.N)
            p.y[static_cast<size_t>(tok) * p.N + row] = __float2bfloat16_rn(acc[j][i] * global);
        }
      }
    }
  }
}

}  // namespace

cudaError_t grouped_gemm_nvfp4(const GroupedGemmNvfp4Params& p, cudaStream_t stream) {
  if (p.G <= 0 || p.N <= 0 || p.K <= 0 || p.K % 16 != 0 || !p.x || !p.w || !p.w_scale || !p.w_global ||
      !p.offsets || !p.y)
    return cudaErrorInvalidValue;
  if (reinterpret_cast<uintptr_t>(p.x) % 4 != 0) return cudaErrorInvalidValue;  // 32-bit loads of bf16 pairs
  if (p.gather && p.gather_div <= 0) return cudaErrorInvalidValue;
  if (p.gated) {
    if (p.N % 2) return cudaErrorInvalidValue;
    const int per_block = kWarps * 8;
    const dim3 grid((p.N / 2 + per_block - 1) / per_block, p.G);
    grouped_gemm_nvfp4_kernel<true><<<grid, kWarps * 32, 0, stream>>>(p);
  } else {
    const dim3 grid((p.N + kRowsPerBlock - 1) / kRowsPerBlock, p.G);
    grouped_gemm_nvfp4_kernel<false><<<grid, kWarps * 32, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

}  // namespace dgemma::kernels
