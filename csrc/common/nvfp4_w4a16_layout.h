// The pre-shuffled NVFP4 weight layout of the W4A16 grouped GEMM (kernels/nvfp4/grouped_gemm_nvfp4.cu)
// and the bit tricks that decode it, as __host__ __device__ code: the kernel runs these functions, the
// host shuffle writes the layout with them, and the host emulation (bindings/cuda_nvfp4.cpp) runs the
// kernel's per-lane index math and decode on the CPU, so CI checks that the kernel reads back exactly
// the matrix it was given without a GPU. The numpy twin is dgemma_rt.nvfp4.shuffle_w4a16.
//
// Layout of one expert: `groups(N) x k_tiles(K)` units of kUnitBytes, unit (c, t) at byte
// (c * k_tiles + t) * kUnitBytes: the weights of MMA row blocks 8c .. 8c+7 (one per warp of the CTA)
// for k in [64t, 64t + 64), laid out so that one CTA pipeline stage is one contiguous 4608-byte copy:
//   [w * 512 + 16 * lane + 4 * j]  warp w's lane `lane`: 4 words, word j = the 8 E2M1 codes of its
//                                   mma.m16n8k16 A fragment for k-step j (k = 64t + 16j .. +16)
//   [4096 + w * 64 + 8 * gid + b]  warp w's block scales, 8 bytes per lane group gid = lane / 4:
//                                   byte scale_byte(j, hi) = rows gid + 8 hi at k-step j (re-encoded)
// MMA row block b covers 16 MMA rows: weight rows 16b .. 16b+15, or, gated, gate rows 8b .. 8b+7 as MMA
// rows 0-7 and the matching up rows I + 8b .. as rows 8-15 (so one lane holds gate and up of the same
// output feature). Rows past N (features past I) and k past K hold zero codes.
//
// Word bits (decode_word): register i (a0..a3) of the fragment is a bf16x2 whose half h holds the value
// at (frag_row(lane, i), frag_k(lane, i, h)); E2M1 code bit b of that value lies at word_bit(i, h, b).
// Decoding puts magnitude bits (e1 e0 m) at bf16 bits 8..6 (exponent LSBs, mantissa MSB) and the sign
// at bit 15, so each half reads as e2m1 * 2^-126 exactly (code 1 = 0.5 becomes the bf16 subnormal
// 2^-127). The four registers come from the word with 2 funnel shifts, 2 left shifts (IMAD.SHL, on the
// FMA pipe) and 5 LOP3: no layout lets each register be one shift and one mask (the 8 target bits of a
// register do not tile 32 bits by rotation), and this one needs one extra LOP3.
//
// Scales: the E4M3 block scale is re-encoded at load into one byte u = ((e + 22) << 3) | m for the scale
// 2^e * (1 + m/8) (subnormal E4M3 scales normalised: every E4M3 value has such a form with e in
// [-9, 8]); (u << 4) | 0x7000 is then the bf16 of scale * 2^119 (exponent field 224 + (e + 22)). A pair
// of them (rows gid and gid + 8) is one LOP3/PRMT and one LEA per k-step; the bf16 product
// (e2m1 * 2^-126) * (scale * 2^119) = e2m1 * scale * 2^-7 is exact (at most 6 significant bits, normal),
// and the epilogue multiplies the fp32 accumulator by global * 2^7. At load, a negative scale moves its
// sign into the 16 codes and a zero scale zeroes them (the weights are the same numbers); NaN scales are
// refused.
#pragma once

#include <cstddef>
#include <cstdint>

#include "common/nvfp4_format.h"

#if defined(__CUDACC__)
#define DG_W4A16_FN __host__ __device__ __forceinline__
#else
#define DG_W4A16_FN inline
#endif

namespace dgemma::nvfp4::w4a16 {

constexpr int kMmaRows = 16;           // weight rows per warp (mma M)
constexpr int kWarps = 8;              // row blocks per CTA: 128 MMA rows
constexpr int kKTile = 64;             // k per pipeline stage: 4 mma k-steps
constexpr int kKSteps = kKTile / 16;
constexpr int kTileWeightBytes = kMmaRows * kKTile / 2;  // 512: 16 bytes per lane
constexpr int kTileScaleBytes = kMmaRows * kKTile / 16;  // 64: 8 bytes per lane group
constexpr int kScaleOffset = kWarps * kTileWeightBytes;  // 4096
constexpr int kUnitBytes = kWarps * (kTileWeightBytes + kTileScaleBytes);  // 4608: one CTA stage
constexpr float kAccScale = 128.0f;    // the decoded products carry 2^-7
constexpr uint32_t kValueMask = 0x81C081C0u;  // bits 6-8 and 15 of both halves
constexpr uint32_t kScaleBias = 0x70007000u;  // exponent field 224 in both halves

DG_W4A16_FN int row_blocks(int N, bool gated) { return gated ? (N / 2 + 7) / 8 : (N + kMmaRows - 1) / kMmaRows; }
DG_W4A16_FN int groups(int N, bool gated) { return (row_blocks(N, gated) + kWarps - 1) / kWarps; }
DG_W4A16_FN int k_tiles(int K) { return (K + kKTile - 1) / kKTile; }
DG_W4A16_FN size_t expert_bytes(int N, int K, bool gated) {
  return static_cast<size_t>(groups(N, gated)) * static_cast<size_t>(k_tiles(K)) * kUnitBytes;
}

// The weight row behind MMA row r (0..15) of row block b, or -1 for padding.
DG_W4A16_FN int weight_row(int b, int r, int N, bool gated) {
  if (gated) {
    const int I = N / 2, f = 8 * b + (r & 7);
    return f < I ? (r < 8 ? f : I + f) : -1;
  }
  const int n = kMmaRows * b + r;
  return n < N ? n : -1;
}

// mma.m16n8k16 A fragment (PTX ISA, "Matrix Fragments for mma.m16n8k16"): register i of lane holds rows
// frag_row and columns frag_k (half h = 0 in the low 16 bits).
DG_W4A16_FN int frag_row(int lane, int i) { return lane / 4 + 8 * (i & 1); }
DG_W4A16_FN int frag_k(int lane, int i, int h) { return 2 * (lane % 4) + h + 8 * (i >> 1); }

// Where code bit b (0 = m, 1 = e0, 2 = e1, 3 = sign) of register i, half h sits in the lane's word.
DG_W4A16_FN int word_bit(int i, int h, int b) {
  const int t = 16 * h + (b < 3 ? 6 + b : 15);  // its bit in the decoded bf16x2 register
  switch (i) {
    case 0: return t;                              // y & mask
    case 1: return b == 2 ? (t + 6) % 32 : t - 2;  // (y << 2) and rotr(y, 6)
    case 2: return t - 6;                          // y << 6
    default: return (t + 4) % 32;                  // rotr(y, 4)
  }
}

DG_W4A16_FN uint32_t rotr(uint32_t x, int r) {
#if defined(__CUDA_ARCH__)
  return __funnelshift_r(x, x, r);
#else
  return (x >> r) | (x << (32 - r));
#endif
}

// One word -> the four bf16x2 A registers, each half e2m1 * 2^-126 (before the scale).
DG_W4A16_FN void decode_word(uint32_t y, uint32_t (&a)[4]) {
  a[0] = y & kValueMask;
  a[1] = ((y << 2) & 0x80C080C0u) | (rotr(y, 6) & 0x01000100u);
  a[2] = (y << 6) & kValueMask;
  a[3] = rotr(y, 4) & kValueMask;
}

// Byte of the lane group's 8 scale bytes holding rows gid + 8 * hi at k-step j.
DG_W4A16_FN int scale_byte(int j, int hi) { return 4 * (j / 2) + 2 * hi + (j & 1); }

// The bf16x2 (row gid low, row gid + 8 high) of scale * 2^119 at k-step j, from the scale word j / 2.
DG_W4A16_FN uint32_t scale_pair(uint32_t word, int j) {
  const uint32_t x = (j & 1) ? word >> 4 : word << 4;  // the pair's bytes at bits 4-11 and 20-27
#if defined(__CUDA_ARCH__)
  uint32_t r;  // one LOP3, (x & mask) | bias, where the compiler would split the AND and the OR
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(r) : "r"(x), "n"(0x0FF00FF0u), "r"(kScaleBias));
  return r;
#else
  return (x & 0x0FF00FF0u) | kScaleBias;
#endif
}

// A canonical E4M3 scale code (0 .. 0x7E) to its byte u; 0 stays 0 (its codes are zero).
DG_W4A16_FN uint32_t scale_code(uint32_t c) {
  c &= 0x7F;
  if (c == 0) return 0;
  int e = static_cast<int>(c >> 3) - 7;
  uint32_t m = c & 7;
  if ((c >> 3) == 0) {  // subnormal m * 2^-9: normalise
    int p = 0;
    while ((m >> (p + 1)) != 0) ++p;
    e = -9 + p;
    m = ((c & 7) << (3 - p)) - 8;
  }
  return (static_cast<uint32_t>(e + 22) << 3) | m;
}

// ---- the activation side (shared memory), also checked on the host by the GEMM emulation
// A stage's activation tile: 64 tokens (mma.sync kernel) or 128 (wgmma kernel) x 64 bf16 columns, 128
// bytes per token; the 16-byte chunk ch of token row r sits at chunk ch ^ (r % 8), so the 8 rows of an
// ldmatrix phase hit 8 different bank groups; on a 1024-aligned tile this is also GMMA's K-major
// 128-byte swizzle, which the wgmma kernel's B descriptor reads.
constexpr int kActRowBytes = kKTile * 2;
DG_W4A16_FN int act_chunk_offset(int row, int ch) { return row * kActRowBytes + ((ch ^ (row & 7)) << 4); }

// The row address lane gives ldmatrix (.x4, or .x2 from lanes 0-15) for k-step j and the 16 tokens
// 16 np ..: lanes 0-7 / 8-15 / 16-23 / 24-31 address the rows of matrices (tokens 0-7, k 0-7), (0-7, 8-15),
// (8-15, 0-7), (8-15, 8-15), which come back as b0, b1 of n8 tile 2 np and b0, b1 of tile 2 np + 1.
DG_W4A16_FN int ldsm_offset(int lane, int j, int np) {
  const int row = 16 * np + (lane & 7) + ((lane >> 4) << 3);
  return act_chunk_offset(row, 2 * j + ((lane >> 3) & 1));
}

// mma.m16n8k16 accumulator: register i of lane holds MMA row acc_row and token acc_col of its n8 tile.
DG_W4A16_FN int acc_row(int lane, int i) { return lane / 4 + 8 * (i >> 1); }
DG_W4A16_FN int acc_col(int lane, int i) { return 2 * (lane % 4) + (i & 1); }

#if !defined(__CUDA_ARCH__)
// Host: one expert's packed codes [N, K/2] and E4M3 scales [N, K/16] to the layout (expert_bytes).
// Returns false (and leaves `out` partly written) when a scale is NaN.
inline bool shuffle_expert(const uint8_t* packed, const uint8_t* scales, int N, int K, bool gated, uint8_t* out) {
  const int KT = k_tiles(K), KB = K / 16;
  for (int r = 0; r < N; ++r)
    for (int kb = 0; kb < KB; ++kb)
      if ((scales[static_cast<size_t>(r) * KB + kb] & 0x7F) == 0x7F) return false;
  auto code_at = [&](int n, int k) -> uint32_t {
    if (n < 0 || k >= K) return 0;
    const uint32_t sc = scales[static_cast<size_t>(n) * KB + k / 16];
    uint32_t c = (packed[static_cast<size_t>(n) * (K / 2) + k / 2] >> (4 * (k & 1))) & 0xF;
    if ((sc & 0x7F) == 0 || (c & 7) == 0) return 0;  // zero scale or zero value: +0
    return (sc & 0x80) ? (c ^ 8) : c;                // a negative scale's sign moves into the value
  };
  for (int c = 0; c < groups(N, gated); ++c)
    for (int t = 0; t < KT; ++t) {
      uint8_t* unit = out + (static_cast<size_t>(c) * KT + t) * kUnitBytes;
      for (int w = 0; w < kWarps; ++w) {
        const int b = kWarps * c + w;
        for (int lane = 0; lane < 32; ++lane)
          for (int j = 0; j < kKSteps; ++j) {
            uint32_t word = 0;
            for (int i = 0; i < 4; ++i)
              for (int h = 0; h < 2; ++h) {
                const uint32_t code = code_at(weight_row(b, frag_row(lane, i), N, gated),
                                              kKTile * t + 16 * j + frag_k(lane, i, h));
                for (int bit = 0; bit < 4; ++bit) word |= ((code >> bit) & 1u) << word_bit(i, h, bit);
              }
            uint8_t* dst = unit + w * kTileWeightBytes + 16 * lane + 4 * j;
            for (int q = 0; q < 4; ++q) dst[q] = static_cast<uint8_t>(word >> (8 * q));
          }
        for (int gid = 0; gid < 8; ++gid)
          for (int j = 0; j < kKSteps; ++j)
            for (int hi = 0; hi < 2; ++hi) {
              const int n = weight_row(b, gid + 8 * hi, N, gated), k = kKTile * t + 16 * j;
              const uint32_t u = (n >= 0 && k < K) ? scale_code(scales[static_cast<size_t>(n) * KB + k / 16]) : 0u;
              unit[kScaleOffset + w * kTileScaleBytes + 8 * gid + scale_byte(j, hi)] = static_cast<uint8_t>(u);
            }
      }
    }
  return true;
}
#endif

}  // namespace dgemma::nvfp4::w4a16

#undef DG_W4A16_FN
