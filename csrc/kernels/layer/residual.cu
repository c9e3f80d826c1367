// Residual-stream layer kernels: post-attention norm + add, the FFN tail (three norms, add, layer
// scalar), each with the norms of the updated residual the next ops read (TrailingNorm), and the final
// logit softcap. One block per token row; float32 statistics.
#include "kernels/common/bf16.cuh"
#include "kernels/kernel_plan.h"
#include "kernels/layer/layer.cuh"

namespace dgemma::kernels {
namespace {

constexpr int kThreads = 256;
constexpr int kCtasPerSm = 4;  // rows resident per SM: half its threads, so <= 64 registers per thread

// Sum over the block, identical in every thread (fixed order). The trailing barrier lets the caller
// reuse `scratch` for the next reduction straight away.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = v;
  __syncthreads();
  float total = 0.f;
#pragma unroll
  for (int i = 0; i < kThreads / 32; ++i) total += scratch[i];
  __syncthreads();
  return total;
}

// The trailing norms of row `row` of x, whose thread-strided sum of squares ss (fmaf, index order) this
// thread has already taken: rmsnorm_mixed's statistics and stores (layer.cuh, TrailingNorm). xr holds
// the row as this thread wrote it (each thread reads back only its own elements).
template <typename T>
__device__ __forceinline__ void trailing_norms(const float* xr, size_t row, int hidden, float eps, float ss,
                                               float* scratch, const TrailingNorm<T>& a, const TrailingNorm<T>& b) {
  const float inv = rsqrtf(block_sum(ss, scratch) / static_cast<float>(hidden) + eps);
  for (int i = threadIdx.x; i < hidden; i += kThreads) {
    const float v = xr[i] * inv;
    if (a.out) a.out[row * hidden + i] = from_f<T>(a.w ? v * a.w[i] : v);
    if (b.out) b.out[row * hidden + i] = from_f<T>(b.w ? v * b.w[i] : v);
  }
}

template <typename Th>
__global__ void __launch_bounds__(kThreads) residual_norm_add_kernel(ResidualNormAddParams<Th> p) {
  __shared__ float scratch[kThreads / 32];
  const size_t row = blockIdx.x;
  const Th* hr = p.h + row * p.hidden;
  float* xr = p.x + row * p.hidden;
  float ss = 0.f;
  for (int i = threadIdx.x; i < p.hidden; i += kThreads) {
    const float v = to_f(hr[i]);
    ss += v * v;
  }
  const float inv = rsqrtf(block_sum(ss, scratch) / p.hidden + p.eps);
  float ss_x = 0.f;
  for (int i = threadIdx.x; i < p.hidden; i += kThreads) {
    const float v = xr[i] + (to_f(hr[i]) * inv) * p.weight[i];
    xr[i] = v;
    ss_x = fmaf(v, v, ss_x);
  }
  // a.out may be h: every thread has read its h elements above, and block_sum's barrier orders those
  // reads before any write below.
  if (p.a.out || p.b.out) trailing_norms(xr, row, p.hidden, p.eps, ss_x, scratch, p.a, p.b);
}

// Three passes over the row (inputs re-read from L1/L2 rather than staged in shared memory): the two
// branch norms' statistics, the statistics of their weighted sum, then the update of x. The per-element
// arithmetic follows the CPU reference's order: h1 = (d * inv1) * w1, h2 = (m * inv2) * w2, s = h1 + h2,
// x = (x + (s * inv) * w) * scalar.
template <typename Td, typename Tm>
__global__ void __launch_bounds__(kThreads) ffn_combine_kernel(FfnCombineParams<Td, Tm> p) {
  __shared__ float scratch[kThreads / 32];
  const size_t row = blockIdx.x;
  const Td* dr = p.dense + row * p.hidden;
  const Tm* mr = p.moe + row * p.hidden;
  float* xr = p.x + row * p.hidden;

  float ss1 = 0.f, ss2 = 0.f;
  for (int i = threadIdx.x; i < p.hidden; i += kThreads) {
    const float d = to_f(dr[i]), m = to_f(mr[i]);
    ss1 += d * d;
    ss2 += m * m;
  }
  const float inv1 = rsqrtf(block_sum(ss1, scratch) / p.hidden + p.eps);
  const float inv2 = rsqrtf(block_sum(ss2, scratch) / p.hidden + p.eps);

  float ss = 0.f;
  for (int i = threadIdx.x; i < p.hidden; i += kThreads) {
    const float s = (to_f(dr[i]) * inv1) * p.w1[i] + (to_f(mr[i]) * inv2) * p.w2[i];
    ss += s * s;
  }
  const float inv = rsqrtf(block_sum(ss, scratch) / p.hidden + p.eps);

  float ss_x = 0.f;
  for (int i = threadIdx.x; i < p.hidden; i += kThreads) {
    const float s = (to_f(dr[i]) * inv1) * p.w1[i] + (to_f(mr[i]) * inv2) * p.w2[i];
    const float v = (xr[i] + (s * inv) * p.w[i]) * p.layer_scalar;
    xr[i] = v;
    ss_x = fmaf(v, v, ss_x);
  }
  if (p.next.out) trailing_norms(xr, row, p.hidden, p.eps, ss_x, scratch, p.next, TrailingNorm<Td>{});
}

__global__ void __launch_bounds__(kThreads) softcap_kernel(float* y, int64_t n, float cap) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * kThreads)
    y[i] = tanhf(y[i] / cap) * cap;  // a true division, as the reference computes it
}

}  // namespace

template <typename Th>
cudaError_t residual_norm_add(const ResidualNormAddParams<Th>& p, cudaStream_t stream) {
  if (p.tokens <= 0 || p.hidden <= 0) return cudaSuccess;
  residual_norm_add_kernel<Th><<<p.tokens, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename Td, typename Tm>
cudaError_t ffn_combine(const FfnCombineParams<Td, Tm>& p, cudaStream_t stream) {
  if (p.tokens <= 0 || p.hidden <= 0) return cudaSuccess;
  ffn_combine_kernel<Td, Tm><<<p.tokens, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

void layer_residual_kernel_plans(KernelPlans& out) {
  const char* why = "kCtasPerSm: half the SM's threads at <= 64 registers";
  out.push_back({"residual_norm_add_kernel<", kThreads, 0, kCtasPerSm, why});
  out.push_back({"ffn_combine_kernel<", kThreads, 0, kCtasPerSm, why});
}

cudaError_t softcap(float* y, int64_t n, float cap, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  const int64_t want = (n + kThreads - 1) / kThreads;
  const int blocks = static_cast<int>(want < 65536 ? want : 65536);  // grid-stride beyond this
  softcap_kernel<<<blocks, kThreads, 0, stream>>>(y, n, cap);
  return cudaGetLastError();
}

using bf16 = __nv_bfloat16;
template cudaError_t residual_norm_add<float>(const ResidualNormAddParams<float>&, cudaStream_t);
template cudaError_t residual_norm_add<bf16>(const ResidualNormAddParams<bf16>&, cudaStream_t);
template cudaError_t ffn_combine<float, float>(const FfnCombineParams<float, float>&, cudaStream_t);
template cudaError_t ffn_combine<float, bf16>(const FfnCombineParams<float, bf16>&, cudaStream_t);
template cudaError_t ffn_combine<bf16, float>(const FfnCombineParams<bf16, float>&, cudaStream_t);
template cudaError_t ffn_combine<bf16, bf16>(const FfnCombineParams<bf16, bf16>&, cudaStream_t);

}  // namespace dgemma::kernels
