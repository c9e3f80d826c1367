#include "kernels/fp8/fp8.cuh"

#include "common/nvfp4_format.h"

namespace dgemma::kernels {
namespace {

constexpr int kThreads = 256;

// One block per row: the row's amax (a max is exact in any order; NaN-propagating), then its codes.
__global__ void __launch_bounds__(kThreads) quantize_rows_kernel(QuantizeRowsFp8Params p) {
  __shared__ float warp_max[kThreads / 32];
  const int row = blockIdx.x;
  const __nv_bfloat16* x = p.x + static_cast<size_t>(row) * p.K;
  float m = 0.0f;
  for (int i = threadIdx.x; i < p.K; i += kThreads) m = nvfp4::fp8_amax(m, __bfloat162float(x[i]));
  for (int o = 16; o > 0; o /= 2) m = nvfp4::fp8_amax(m, __shfl_xor_sync(0xffffffffu, m, o));
  if (threadIdx.x % 32 == 0) warp_max[threadIdx.x / 32] = m;
  __syncthreads();
  m = 0.0f;
  for (int w = 0; w < kThreads / 32; ++w) m = nvfp4::fp8_amax(m, warp_max[w]);
  const float scale = nvfp4::fp8_row_scale(m);
  if (threadIdx.x == 0) p.scale[row] = scale;
  uint8_t* q = p.q + static_cast<size_t>(row) * p.K;
  for (int i = threadIdx.x; i < p.K; i += kThreads)
    q[i] = static_cast<uint8_t>(nvfp4::e4m3_from_float_signed(__bfloat162float(x[i]) / scale));
}

}  // namespace

cudaError_t quantize_rows_fp8(const QuantizeRowsFp8Params& p, cudaStream_t stream) {
  if (p.M < 0 || p.K <= 0 || (p.M > 0 && (!p.x || !p.q || !p.scale))) return cudaErrorInvalidValue;
  if (p.M == 0) return cudaSuccess;
  quantize_rows_kernel<<<p.M, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace dgemma::kernels
