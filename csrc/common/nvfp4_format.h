// NVFP4 (and FP8) number formats and the block-scale layout of the Blackwell tensor-core GEMMs, as
// __host__ __device__ functions: the GPU kernels use them, and the host-side tests check them
// bit for bit against the numpy reference (python/dgemma_rt/nvfp4.py), so CI checks the arithmetic
// of the kernels without a GPU.
//
// Quantization (NVIDIA's recipe, the same as the numpy reference): a tensor's global scale is
// amax / (6 * 448); a 16-element block's E4M3 scale is amax_block / 6 / global, rounded to nearest
// (ties to even) and saturated at 448; each value is x / (scale * global) rounded to the nearest
// E2M1 value (ties to even), saturated at 6. Two E2M1 codes per byte, the even element low.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>

#if defined(__CUDACC__)
#define DG_NVFP4_FN __host__ __device__ __forceinline__
#else
#define DG_NVFP4_FN inline
#endif

namespace dgemma::nvfp4 {

constexpr int kGroup = 16;         // elements per block scale
constexpr float kE2m1Max = 6.0f;
constexpr float kE4m3Max = 448.0f;

// ------------------------------------------------------------------------------------ codecs
// FP8 E4M3 (fn: S.EEEE.MMM, bias 7, subnormals at exponent 0, S.1111.111 NaN, no infinities).
DG_NVFP4_FN float e4m3_to_float(uint32_t c) {
  const int e = (c >> 3) & 0xF, m = c & 7;
  float v = e == 0 ? ldexpf(static_cast<float>(m) * 0.125f, -6) : ldexpf(1.0f + static_cast<float>(m) * 0.125f, e - 7);
  if ((c & 0x7F) == 0x7F) v = NAN;
  return (c & 0x80) ? -v : v;
}

// x >= 0 and finite (a scale) to the nearest E4M3 code, ties to even, saturating at 448 (0x7E).
DG_NVFP4_FN uint32_t e4m3_from_float(float x) {
  if (!(x > 0.0f)) return 0;                  // 0, and NaN (a NaN row's values: its scale carries the NaN)
  if (x >= kE4m3Max) return 0x7E;
  if (x < 0.015625f) {                        // below 2^-6: subnormal steps of 2^-9
    return static_cast<uint32_t>(rintf(ldexpf(x, 9)));  // 8 (rounded up to 2^-6) is the code of 2^-6
  }
  int ex = 0;
  frexpf(x, &ex);                             // x = f * 2^ex, f in [0.5, 1): x in [2^(ex-1), 2^ex)
  const int e = ex - 1;                       // -6 .. 8
  uint32_t q = static_cast<uint32_t>(rintf(ldexpf(x, 3 - e)));  // 8 .. 16 eighths of 2^e
  int be = e + 7;
  if (q == 16) q = 8, ++be;
  const uint32_t code = (static_cast<uint32_t>(be) << 3) | (q - 8);
  return code > 0x7E ? 0x7E : code;
}

// Signed E4M3: the magnitude's code with the sign in bit 7 (-0 and values that round to 0: code 0).
DG_NVFP4_FN uint32_t e4m3_from_float_signed(float x) {
  const uint32_t c = e4m3_from_float(fabsf(x));
  return (c != 0 && std::signbit(x)) ? (c | 0x80) : c;
}

// FP8 with one scale per row (weights: per output channel; activations: per token): the row's
// scale is amax / 448 (1 for an all-zero row) and its values E4M3(x / scale). A NaN in the row makes
// its amax and so its scale NaN, and the GEMM's output row NaN, as a NaN in a BF16 GEMM's input row
// does (E4M3 codes have no NaN the GEMM would see: e4m3_from_float maps NaN to 0).
DG_NVFP4_FN float fp8_amax(float amax, float v) {  // max(amax, |v|), NaN-propagating (fmaxf drops NaN)
  const float a = v < 0.0f ? -v : v;
  return (a > amax || a != a) ? a : amax;
}
DG_NVFP4_FN float fp8_row_scale(float amax) {
  const float s = amax / kE4m3Max;
  return s > 0.0f || s != s ? s : 1.0f;
}

// E2M1 (S.EE.M): 0, 0.5, 1, 1.5, 2, 3, 4, 6.
DG_NVFP4_FN float e2m1_to_float(uint32_t c) {
  const uint32_t mag = c & 7;
  const float v = mag < 4 ? 0.5f * static_cast<float>(mag)
                          : static_cast<float>(2 << ((mag - 4) >> 1)) * (1.0f + 0.5f * static_cast<float>(mag & 1));
  return (c & 8) ? -v : v;
}

// Nearest E2M1 code, ties to the even code, saturating at 6; -0 and values that round to 0 get code 0.
DG_NVFP4_FN uint32_t e2m1_from_float(float x) {
  const float a = fabsf(x);
  uint32_t c;
  if (a <= 0.25f) c = 0;
  else if (a < 0.75f) c = 1;
  else if (a <= 1.25f) c = 2;
  else if (a < 1.75f) c = 3;
  else if (a <= 2.5f) c = 4;
  else if (a < 3.5f) c = 5;
  else if (a <= 5.0f) c = 6;
  else c = 7;
  return (c != 0 && std::signbit(x)) ? (c | 8) : c;
}

// The global (per-tensor) scale of values whose largest magnitude is `amax`; 1 for an all-zero tensor.
DG_NVFP4_FN float global_scale(float amax) {
  const float g = amax / (kE2m1Max * kE4m3Max);
  return g > 0.0f ? g : 1.0f;
}

// One block of 16 values with global scale `g`: 8 packed bytes and the E4M3 code of its scale.
DG_NVFP4_FN uint32_t quantize_block(const float (&x)[kGroup], float g, uint8_t (&packed)[kGroup / 2]) {
  float amax = 0.0f;
  for (int i = 0; i < kGroup; ++i) amax = fmaxf(amax, fabsf(x[i]));
  const uint32_t sc = e4m3_from_float(amax / kE2m1Max / g);
  const float denom = e4m3_to_float(sc) * g;
  for (int i = 0; i < kGroup; i += 2) {
    const uint32_t lo = denom > 0.0f ? e2m1_from_float(x[i] / denom) : 0u;
    const uint32_t hi = denom > 0.0f ? e2m1_from_float(x[i + 1] / denom) : 0u;
    packed[i / 2] = static_cast<uint8_t>(lo | (hi << 4));
  }
  return sc;
}

// ------------------------------------------------------------------------------------ layout
// The block-scale layout the sm_100/sm_120 block-scaled MMAs read (CUTLASS's Sm1xxBlockScaledConfig
// with K-major scales): atoms of 128 rows x 4 scales (512 bytes), atoms ordered along K first. In
// an atom, row r and scale column c sit at (r % 32) * 16 + (r / 32) * 4 + c. A matrix of `rows` x
// `kblocks` scales takes round_up(rows, 128) * round_up(kblocks, 4) bytes; the padding must hold
// finite scales (zeros): the MMA multiplies it by the zero-filled out-of-range data.
DG_NVFP4_FN int sf_padded_kblocks(int kblocks) { return (kblocks + 3) / 4 * 4; }
DG_NVFP4_FN int sf_padded_rows(int rows) { return (rows + 127) / 128 * 128; }
DG_NVFP4_FN size_t sf_bytes(int rows, int kblocks) {
  return static_cast<size_t>(sf_padded_rows(rows)) * static_cast<size_t>(sf_padded_kblocks(kblocks));
}
DG_NVFP4_FN size_t sf_offset(int row, int kblock, int kblocks) {
  const size_t atom = static_cast<size_t>(row / 128) * static_cast<size_t>(sf_padded_kblocks(kblocks) / 4) +
                      static_cast<size_t>(kblock / 4);
  return atom * 512 + static_cast<size_t>((row % 32) * 16 + ((row % 128) / 32) * 4 + kblock % 4);
}

// Byte t of one matrix's scales in the MMA layout, t over the padded grid (t < sf_bytes(rows, kblocks),
// row = t / sf_padded_kblocks, kblock = t % sf_padded_kblocks): the row-major scale in[row * kblocks +
// kblock], or a zero for the padding, stored at sf_offset. sf_offset is a bijection of that grid, so
// every t writes a distinct byte and all of them get written (dgemma_rt.nvfp4.swizzle_scales; the
// device kernel swizzle_scales_nvfp4 runs this per thread).
DG_NVFP4_FN void swizzle_scale(const uint8_t* in, int rows, int kblocks, size_t t, uint8_t* out) {
  const size_t kpad = static_cast<size_t>(sf_padded_kblocks(kblocks));
  const int row = static_cast<int>(t / kpad), kb = static_cast<int>(t % kpad);
  out[sf_offset(row, kb, kblocks)] =
      row < rows && kb < kblocks ? in[static_cast<size_t>(row) * static_cast<size_t>(kblocks) + kb] : uint8_t{0};
}

}  // namespace dgemma::nvfp4

#undef DG_NVFP4_FN
