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

// rmsnorm_mixed: no __restrict__ on x / y, which may alias. Rows beyond the grid loop (rows is int64).
template <typename Tx, typename Ty, int kThreads>
__global__ void __launch_bounds__(kThreads) rmsnorm_mixed_kernel(const Tx* x, const float* __restrict__ w, Ty* y,
                                                                 int64_t rows, int dim, float eps) {
  __shared__ float warp_sums[kThreads / 32];
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const Tx* xr = x + row * dim;
    Ty* yr = y + row * dim;
    float ss = 0.f;
    for (int i = threadIdx.x; i < dim; i += kThreads) {
      const float v = to_f(xr[i]);
      ss = fmaf(v, v, ss);
    }
    for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);  // same value in every lane
    if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = ss;
    __syncthreads();
    float total = 0.f;
#pragma unroll
    for (int i = 0; i < kThreads / 32; ++i) total += warp_sums[i];
    __syncthreads();  // warp_sums is reused by the next row
    const float inv = rsqrtf(total / static_cast<float>(dim) + eps);
    for (int i = threadIdx.x; i < dim; i += kThreads) {
      float v = to_f(xr[i]) * inv;
      if (w) v *= w[i];
      yr[i] = from_f<Ty>(v);
    }
  }
}

}  // namespace

template <typename Tx, typename Ty>
cudaError_t rmsnorm_mixed(const Tx* x, const float* weight, Ty* y, int64_t rows, int dim, float eps,
                          cudaStream_t stream) {
  if (rows < 0 || dim <= 0) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  if (!x || !y) return cudaErrorInvalidValue;
  constexpr int kThreads = 256;
  const int blocks = static_cast<int>(rows < (int64_t{1} << 20) ? rows : (int64_t{1} << 20));
  rmsnorm_mixed_kernel<Tx, Ty, kThreads><<<blocks, kThreads, 0, stream>>>(x, weight, y, rows, dim, eps);
  return cudaGetLastError();
}

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


using bf16 = __nv_bfloat16;
template cudaError_t rmsnorm_mixed<float, float>(const float*, const float*, float*, int64_t, int, float, cudaStream_t);
template cudaError_t rmsnorm_mixed<float, bf16>(const float*, const float*, bf16*, int64_t, int, float, cudaStream_t);
template cudaError_t rmsnorm_mixed<bf16, float>(const bf16*, const float*, float*, int64_t, int, float, cudaStream_t);
template cudaError_t rmsnorm_mixed<bf16, bf16>(const bf16*, const float*, bf16*, int64_t, int, float, cudaStream_t);

}  // namespace dgemma::kernels
