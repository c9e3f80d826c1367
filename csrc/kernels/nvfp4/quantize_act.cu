// Activation quantization for the Blackwell NVFP4 x NVFP4 grouped GEMMs (nvfp4.cuh). The arithmetic
// is common/nvfp4_format.h's, shared with the host tests and equal to the numpy reference.
#include <cuda_bf16.h>

#include "common/nvfp4_format.h"
#include "kernels/nvfp4/nvfp4.cuh"

namespace dgemma::kernels {
namespace {

// |x| of non-negative floats orders like their bit patterns: an unsigned atomicMax is a float max.
__global__ void amax_kernel(const __nv_bfloat16* __restrict__ x, size_t n, unsigned int* amax_bits) {
  float m = 0.0f;
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x)
    m = fmaxf(m, fabsf(__bfloat162float(x[i])));
  for (int o = 16; o > 0; o /= 2) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
  if (threadIdx.x % 32 == 0) atomicMax(amax_bits, __float_as_uint(m));
}

__global__ void amax_to_global_kernel(float* global) { *global = nvfp4::global_scale(*global); }

// starts[g] = number of 128-row scale tiles before group g (starts[G] = the total).
__global__ void sf_starts_kernel(const int32_t* __restrict__ offsets, int G, int32_t* __restrict__ starts) {
  int32_t acc = 0;
  for (int g = 0; g < G; ++g) {
    starts[g] = acc;
    acc += (offsets[g + 1] - offsets[g] + 127) / 128;
  }
  starts[G] = acc;
}

// One thread per (row, scale column) including the columns that pad K/16 to a multiple of 4, which
// get a zero scale (the MMA multiplies them by zero-filled data; a NaN there would poison the row).
__global__ void quantize_kernel(QuantizeActNvfp4Params p) {
  const int kblocks = p.K / nvfp4::kGroup, kpad = nvfp4::sf_padded_kblocks(kblocks);
  const int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (t >= static_cast<int64_t>(p.Mtot) * kpad) return;
  const int row = static_cast<int>(t / kpad), kb = static_cast<int>(t % kpad);
  int lo = 0, hi = p.G;  // the group g with offsets[g] <= row < offsets[g + 1]
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    if (p.offsets[mid] <= row) lo = mid;
    else hi = mid;
  }
  const int g = lo, local = row - p.offsets[g];
  uint8_t* sf = p.sf + static_cast<size_t>(p.sf_starts[g]) * 128 * kpad;
  if (kb >= kblocks) {
    sf[nvfp4::sf_offset(local, kb, kblocks)] = 0;
    return;
  }
  const int src_row = p.gather ? p.gather[row] / p.gather_div : row;
  const uint4* src = reinterpret_cast<const uint4*>(p.x + static_cast<size_t>(src_row) * p.K + kb * nvfp4::kGroup);
  uint4 raw[2] = {src[0], src[1]};
  const __nv_bfloat16* h = reinterpret_cast<const __nv_bfloat16*>(raw);
  float v[nvfp4::kGroup];
#pragma unroll
  for (int i = 0; i < nvfp4::kGroup; ++i) v[i] = __bfloat162float(h[i]);
  uint8_t packed[nvfp4::kGroup / 2];
  const uint32_t code = nvfp4::quantize_block(v, *p.global, packed);
  *reinterpret_cast<uint2*>(p.q + static_cast<size_t>(row) * (p.K / 2) + kb * (nvfp4::kGroup / 2)) =
      *reinterpret_cast<const uint2*>(packed);
  sf[nvfp4::sf_offset(local, kb, kblocks)] = static_cast<uint8_t>(code);
}

}  // namespace

cudaError_t act_global_scale_nvfp4(const __nv_bfloat16* x, size_t n, float* global, cudaStream_t stream) {
  if (!global || (n > 0 && !x)) return cudaErrorInvalidValue;
  cudaError_t err = cudaMemsetAsync(global, 0, sizeof(float), stream);
  if (err != cudaSuccess) return err;
  if (n > 0) {
    const size_t blocks = (n + 255) / 256;
    amax_kernel<<<static_cast<unsigned>(blocks < 1024 ? blocks : 1024), 256, 0, stream>>>(
        x, n, reinterpret_cast<unsigned int*>(global));
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }
  amax_to_global_kernel<<<1, 1, 0, stream>>>(global);
  return cudaGetLastError();
}

size_t quantize_act_nvfp4_sf_bytes(int Mtot, int G, int K) {
  if (Mtot < 0 || G <= 0 || K <= 0) return 0;
  const size_t tiles = static_cast<size_t>(Mtot + 127) / 128 + static_cast<size_t>(G);
  return tiles * 128 * static_cast<size_t>(nvfp4::sf_padded_kblocks(K / nvfp4::kGroup));
}

cudaError_t quantize_act_nvfp4(const QuantizeActNvfp4Params& p, cudaStream_t stream) {
  if (p.Mtot < 0 || p.G <= 0 || p.K <= 0 || p.K % nvfp4::kGroup) return cudaErrorInvalidValue;
  if (!p.offsets || !p.global || !p.sf_starts || (p.Mtot > 0 && (!p.x || !p.q || !p.sf)) || p.gather_div < 1)
    return cudaErrorInvalidValue;
  if (reinterpret_cast<uintptr_t>(p.x) % 16 || reinterpret_cast<uintptr_t>(p.q) % 8) return cudaErrorInvalidValue;
  sf_starts_kernel<<<1, 1, 0, stream>>>(p.offsets, p.G, p.sf_starts);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || p.Mtot == 0) return err;
  // The rows that pad each group's last 128-row scale tile get no thread below: zero scales there, as
  // the layout asks of every padding (nvfp4_format.h), not whatever the scratch held.
  err = cudaMemsetAsync(p.sf, 0, quantize_act_nvfp4_sf_bytes(p.Mtot, p.G, p.K), stream);
  if (err != cudaSuccess) return err;
  const int64_t threads = static_cast<int64_t>(p.Mtot) * nvfp4::sf_padded_kblocks(p.K / nvfp4::kGroup);
  quantize_kernel<<<static_cast<unsigned>((threads + 255) / 256), 256, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace dgemma::kernels
