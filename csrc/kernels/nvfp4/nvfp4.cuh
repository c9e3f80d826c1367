// NVFP4 weights on the GPU (layout: python/dgemma_rt/nvfp4.py, the reference).
//
//   grouped_gemm_nvfp4   y[o_g : o_g+1] = x[o_g : o_g+1] @ W_g^T for every expert g, where
//                        W_g = (e2m1 * e4m3 block scale) * global_scale[g], W packed [G, N, K/2]
//                        (even element in the low nibble), block scales [G, N, K/16] (E4M3 codes),
//                        x bf16 [Mtot, K] in expert-major order (offsets [G+1], on the device),
//                        y bf16 [Mtot, N]. W4A16: the weights are dequantized in registers to bf16
//                        (e2m1 x e4m3 is exact in bf16) and fed to mma.sync m16n8k16 with fp32
//                        accumulation; the global scale multiplies the accumulator at the end. Each
//                        weight byte is read once per 32-token tile of its expert, which is once per
//                        step at the real model's ~16 tokens per expert.
//
// Needs K % 16 == 0 (one block scale per mma k-step) and sm_80 or newer (cudaErrorInvalidValue /
// cudaErrorNoKernelImageForDevice otherwise). A first, straightforward kernel: correct by design,
// its speed not measured yet (no GPU has run it).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace dgemma::kernels {

struct GroupedGemmNvfp4Params {
  const __nv_bfloat16* x = nullptr;  // [Mtot, K]
  const uint8_t* w = nullptr;        // [G, N, K/2] packed E2M1
  const uint8_t* w_scale = nullptr;  // [G, N, K/16] E4M3 codes
  const float* w_global = nullptr;   // [G]
  const int32_t* offsets = nullptr;  // [G + 1], device memory, non-decreasing, offsets[0] = 0
  __nv_bfloat16* y = nullptr;        // [Mtot, N]
  int G = 0, N = 0, K = 0;
};
cudaError_t grouped_gemm_nvfp4(const GroupedGemmNvfp4Params& p, cudaStream_t stream);

}  // namespace dgemma::kernels
