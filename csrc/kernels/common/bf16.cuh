// Float <-> bf16 helpers shared by the kernels: scalar conversions for code templated on float or
// bf16 storage, 8-wide (16-byte) vector unpack/pack for vectorised loads and stores, and the model's
// gated-MLP activation (one definition, so fused and unfused paths round alike).
#pragma once

#include <cuda_bf16.h>

namespace dgemma::kernels {

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ float from_f<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16(v); }

// gelu_pytorch_tanh in fp32.
__device__ __forceinline__ float gelu_tanh(float x) {
  const float k = 0.7978845608028654f;  // sqrt(2/pi)
  return 0.5f * x * (1.0f + tanhf(k * (x + 0.044715f * x * x * x)));
}

__device__ __forceinline__ void unpack8(const uint4& raw, float f[8]) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
  for (int u = 0; u < 4; ++u) {
    const float2 v = __bfloat1622float2(h[u]);
    f[2 * u] = v.x;
    f[2 * u + 1] = v.y;
  }
}

__device__ __forceinline__ uint4 pack8(const float f[8]) {
  uint4 out;
  __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&out);
#pragma unroll
  for (int u = 0; u < 4; ++u) h[u] = __floats2bfloat162_rn(f[2 * u], f[2 * u + 1]);
  return out;
}

}  // namespace dgemma::kernels
