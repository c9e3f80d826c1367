#include "kernels/init/random_fill.cuh"

#include "common/random_weights.h"

namespace dgemma::kernels {
namespace {

template <typename T>
__device__ __forceinline__ T store_as(float v);
template <>
__device__ __forceinline__ float store_as<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __nv_bfloat16 store_as<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

template <typename T>
__global__ void fill_random_kernel(T* dst, int64_t n, uint64_t seed, uint64_t first, float amplitude, float offset) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    dst[i] = store_as<T>(random_weights::value(seed, first + static_cast<uint64_t>(i), amplitude, offset));
}

__global__ void fill_random_nvfp4_kernel(uint8_t* packed, uint8_t* scales, int64_t n, uint64_t seed) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; b < n / 2; b += stride) {
    const uint64_t i = 2 * static_cast<uint64_t>(b);
    packed[b] = static_cast<uint8_t>(random_weights::nvfp4_code(seed, i) | (random_weights::nvfp4_code(seed, i + 1) << 4));
    if (b % 8 == 0) scales[b / 8] = static_cast<uint8_t>(random_weights::nvfp4_scale(seed, static_cast<uint64_t>(b / 8)));
  }
}

}  // namespace

cudaError_t fill_random_nvfp4(uint8_t* packed, uint8_t* scales, int64_t n, uint64_t seed, cudaStream_t stream) {
  if (n < 0 || n % 16 || (n > 0 && (!packed || !scales))) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  const int64_t blocks = (n / 2 + 255) / 256;
  fill_random_nvfp4_kernel<<<static_cast<unsigned>(blocks < 65536 ? blocks : 65536), 256, 0, stream>>>(packed, scales,
                                                                                                     n, seed);
  return cudaGetLastError();
}

template <typename T>
cudaError_t fill_random(T* dst, int64_t n, uint64_t seed, uint64_t first, float amplitude, float offset,
                        cudaStream_t stream) {
  if (n < 0 || (n > 0 && !dst)) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  const int64_t blocks = (n + 255) / 256;
  fill_random_kernel<T><<<static_cast<unsigned>(blocks < 65536 ? blocks : 65536), 256, 0, stream>>>(
      dst, n, seed, first, amplitude, offset);
  return cudaGetLastError();
}

template cudaError_t fill_random<float>(float*, int64_t, uint64_t, uint64_t, float, float, cudaStream_t);
template cudaError_t fill_random<__nv_bfloat16>(__nv_bfloat16*, int64_t, uint64_t, uint64_t, float, float,
                                                cudaStream_t);

}  // namespace dgemma::kernels
