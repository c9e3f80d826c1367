// shuffle_w4a16: NVFP4 experts as stored (packed E2M1 codes [G, N, K/2], E4M3 block scales
// [G, N, K/16]) into the W4A16 GEMM's pre-shuffled layout (common/nvfp4_w4a16_layout.h), on the device.
// The host version (nvfp4::w4a16::shuffle_expert) visits every code bit of a 26B-A4B model's 22.8B
// expert weights one at a time: minutes of host time. Here one CTA writes one 4608-byte unit (c, t) of
// one expert, warp w and lane the lane's 4 weight words of row block 8c + w, lane group gid < 8 also
// its 8 scale bytes, with the same layout functions the kernel and the host shuffle use, so the result
// is byte for byte shuffle_expert's. Scales must hold no NaN (the host checks; shuffle_expert refuses).
#include "common/nvfp4_w4a16_layout.h"
#include "kernels/nvfp4/nvfp4.cuh"

namespace dgemma::kernels {
namespace {

namespace w4 = nvfp4::w4a16;

__global__ void __launch_bounds__(256) shuffle_w4a16_kernel(const uint8_t* packed, const uint8_t* scales, int N,
                                                            int K, bool gated, uint8_t* out) {
  const int KT = w4::k_tiles(K), KB = K / 16;
  const int unit_index = blockIdx.x, g = blockIdx.y;
  const int c = unit_index / KT, t = unit_index % KT;
  const int w = threadIdx.x / 32, lane = threadIdx.x % 32;
  const uint8_t* P = packed + static_cast<size_t>(g) * N * (K / 2);
  const uint8_t* S = scales + static_cast<size_t>(g) * N * KB;
  uint8_t* unit = out + static_cast<size_t>(g) * w4::expert_bytes(N, K, gated) +
                  static_cast<size_t>(unit_index) * w4::kUnitBytes;
  auto code_at = [&](int n, int k) -> uint32_t {
    if (n < 0 || k >= K) return 0;
    const uint32_t sc = S[static_cast<size_t>(n) * KB + k / 16];
    const uint32_t cd = (P[static_cast<size_t>(n) * (K / 2) + k / 2] >> (4 * (k & 1))) & 0xF;
    if ((sc & 0x7F) == 0 || (cd & 7) == 0) return 0;
    return (sc & 0x80) ? (cd ^ 8) : cd;
  };
  const int b = w4::kWarps * c + w;
  for (int j = 0; j < w4::kKSteps; ++j) {
    uint32_t word = 0;
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const uint32_t code = code_at(w4::weight_row(b, w4::frag_row(lane, i), N, gated),
                                      w4::kKTile * t + 16 * j + w4::frag_k(lane, i, h));
#pragma unroll
        for (int bit = 0; bit < 4; ++bit) word |= ((code >> bit) & 1u) << w4::word_bit(i, h, bit);
      }
    *reinterpret_cast<uint32_t*>(unit + w * w4::kTileWeightBytes + 16 * lane + 4 * j) = word;
  }
  if (lane < 8) {
    const int gid = lane;
    for (int j = 0; j < w4::kKSteps; ++j)
      for (int hi = 0; hi < 2; ++hi) {
        const int n = w4::weight_row(b, gid + 8 * hi, N, gated), k = w4::kKTile * t + 16 * j;
        const uint32_t u = (n >= 0 && k < K) ? w4::scale_code(S[static_cast<size_t>(n) * KB + k / 16]) : 0u;
        unit[w4::kScaleOffset + w * w4::kTileScaleBytes + 8 * gid + w4::scale_byte(j, hi)] = static_cast<uint8_t>(u);
      }
  }
}

}  // namespace

cudaError_t shuffle_w4a16(const uint8_t* packed, const uint8_t* scales, int G, int N, int K, bool gated, uint8_t* out,
                          cudaStream_t stream) {
  if (G < 0 || N <= 0 || K <= 0 || K % 16 || (gated && N % 2) || !packed || !scales || !out || G > 65535 ||
      reinterpret_cast<uintptr_t>(out) % 16)  // 32-bit stores; the GEMM that reads it wants 16 bytes anyway
    return cudaErrorInvalidValue;
  if (G == 0) return cudaSuccess;
  const int units = w4::groups(N, gated) * w4::k_tiles(K);
  shuffle_w4a16_kernel<<<dim3(units, G), 256, 0, stream>>>(packed, scales, N, K, gated, out);
  return cudaGetLastError();
}

}  // namespace dgemma::kernels
