#include "kernels/common/bf16.cuh"
#include "kernels/norm/rmsnorm.cuh"

namespace dgemma::kernels {
namespace {

template <typename T, int kThreads>
__global__ void __launch_bounds__(kThreads) rmsnorm_kernel(const T* __restrict__ x, const T* __restrict__ w,
                                                           T* __restrict__ y, int dim, float eps) {
  const size_t row = blockIdx.x;
  const T* xr = x + row * dim;
  T* yr = y + row * dim;
  float ss = 0.f;
  for (int i = threadIdx.x; i < dim; i += kThreads) {
    const float v = to_f(xr[i]);
    ss += v * v;
  }
  // Warp reduction, then across warps through shared memory.
  for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
  __shared__ float warp_sums[kThreads / 32];
  if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = ss;
  __syncthreads();
  float total = 0.f;
  for (int i = 0; i < kThreads / 32; ++i) total += warp_sums[i];
  const float inv = rsqrtf(total / dim + eps);
  for (int i = threadIdx.x; i < dim; i += kThreads) {
    float v = to_f(xr[i]) * inv;
    if (w) v *= to_f(w[i]);
    yr[i] = from_f<T>(v);
  }
}

}  // namespace

template <typename T>
cudaError_t rmsnorm(const T* x, const T* weight, T* y, int rows, int dim, float eps, cudaStream_t stream) {
  if (rows <= 0 || dim <= 0) return cudaSuccess;
  constexpr int kThreads = 256;
  rmsnorm_kernel<T, kThreads><<<rows, kThreads, 0, stream>>>(x, weight, y, dim, eps);
  return cudaGetLastError();
}

template cudaError_t rmsnorm<float>(const float*, const float*, float*, int, int, float, cudaStream_t);
template cudaError_t rmsnorm<__nv_bfloat16>(const __nv_bfloat16*, const __nv_bfloat16*, __nv_bfloat16*, int, int,
                                            float, cudaStream_t);

}  // namespace dgemma::kernels
