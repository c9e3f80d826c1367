// FP8 activations for the W8A8 dense GEMM (kernels/gemm: gemm_fp8_tn).
//
//   quantize_rows_fp8   x bf16 [M, K] -> q E4M3 codes [M, K], scale fp32 [M]: one scale per row
//                       (token), amax / 448, values E4M3(x / scale) rounded to nearest, ties to even,
//                       saturating (common/nvfp4_format.h; the numpy reference is
//                       dgemma_rt.nvfp4.quantize_fp8). Deterministic; one block per row.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace dgemma::kernels {

struct QuantizeRowsFp8Params {
  const __nv_bfloat16* x = nullptr;  // [M, K]
  uint8_t* q = nullptr;              // [M, K]
  float* scale = nullptr;            // [M]
  int M = 0, K = 0;
};
cudaError_t quantize_rows_fp8(const QuantizeRowsFp8Params& p, cudaStream_t stream);

}  // namespace dgemma::kernels
