// Weight block scales into the MMA scale layout on the device (nvfp4.cuh: swizzle_scales_nvfp4): the
// CUDA backend runs it once per expert projection at load, so the host never loops over the scales of
// a 26B model. The index math is common/nvfp4_format.h's swizzle_scale, which the host tests run too.
#include "common/nvfp4_format.h"
#include "kernels/nvfp4/nvfp4.cuh"

namespace dgemma::kernels {
namespace {

// One thread per output byte of all G matrices (scattered byte stores: a load-time pass).
__global__ void swizzle_kernel(const uint8_t* __restrict__ scales, int G, int rows, int kblocks,
                               uint8_t* __restrict__ out) {
  const size_t per = nvfp4::sf_bytes(rows, kblocks), in_per = static_cast<size_t>(rows) * kblocks;
  const size_t total = per * static_cast<size_t>(G);
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const size_t g = i / per;
    nvfp4::swizzle_scale(scales + g * in_per, rows, kblocks, i % per, out + g * per);
  }
}

}  // namespace

cudaError_t swizzle_scales_nvfp4(const uint8_t* scales, int G, int rows, int kblocks, uint8_t* out,
                                 cudaStream_t stream) {
  if (G < 0 || rows < 0 || kblocks <= 0) return cudaErrorInvalidValue;
  if (G == 0 || rows == 0) return cudaSuccess;
  if (!scales || !out) return cudaErrorInvalidValue;
  const size_t total = nvfp4::sf_bytes(rows, kblocks) * static_cast<size_t>(G);
  const size_t blocks = (total + 255) / 256;
  swizzle_kernel<<<static_cast<unsigned>(blocks < 65535 ? blocks : 65535), 256, 0, stream>>>(scales, G, rows, kblocks,
                                                                                              out);
  return cudaGetLastError();
}

}  // namespace dgemma::kernels
