// gather_rows / scatter_rows / scatter_add_rows (contracts in layer.cuh). One CTA per row (grid-stride
// over rows beyond the grid), threads striding over the row in the widest vector the sizes allow.
#include <cstdint>

#include "kernels/common/bf16.cuh"
#include "kernels/layer/layer.cuh"

namespace dgemma::kernels {
namespace {

constexpr int kThreads = 128;
constexpr int64_t kMaxBlocks = int64_t{1} << 20;

// A copy unit of zero bits, built in registers (V{} for uint4 went through a 16-byte stack frame).
template <typename V>
__device__ __forceinline__ V zero_unit() {
  return V(0);
}
template <>
__device__ __forceinline__ uint4 zero_unit<uint4>() {
  return make_uint4(0, 0, 0, 0);
}

// kScatter false: dst[i] = src[index[i]]; true: dst[index[i]] = src[i]. V: the copy unit (uint4, uint32_t
// or uint16_t); n: units per row.
template <typename V, bool kScatter>
__global__ void __launch_bounds__(kThreads) move_rows_kernel(const V* __restrict__ src, const int32_t* __restrict__ index,
                                                             V* __restrict__ dst, int64_t m, int64_t n) {
  for (int64_t i = blockIdx.x; i < m; i += gridDim.x) {
    const int32_t j = index[i];  // uniform across the CTA
    if (j < 0 && kScatter) continue;  // scatter: source row skipped
    V* d = dst + (kScatter ? static_cast<int64_t>(j) : i) * n;
    if (j < 0) {  // gather: a zero row
      const V zero = zero_unit<V>();
#pragma unroll 1  // a rare path: unrolled, ptxas spilled the copy loop's invariants around it
      for (int64_t u = threadIdx.x; u < n; u += kThreads) d[u] = zero;
      continue;
    }
    const V* s = src + (kScatter ? i : static_cast<int64_t>(j)) * n;
    for (int64_t u = threadIdx.x; u < n; u += kThreads) d[u] = s[u];
  }
}

template <bool kVec>
__global__ void __launch_bounds__(kThreads) scatter_add_rows_kernel(float* __restrict__ dst,
                                                                    const __nv_bfloat16* __restrict__ src,
                                                                    const int32_t* __restrict__ index, int64_t m,
                                                                    int64_t d) {
  for (int64_t i = blockIdx.x; i < m; i += gridDim.x) {
    const int32_t j = index[i];
    if (j < 0) continue;
    const __nv_bfloat16* s = src + i * d;
    float* o = dst + static_cast<int64_t>(j) * d;
    if constexpr (kVec) {  // 8 elements per step: one 16-byte load of src, two of dst
      for (int64_t u = threadIdx.x; u < d / 8; u += kThreads) {
        float f[8];
        unpack8(reinterpret_cast<const uint4*>(s)[u], f);
        float4* o4 = reinterpret_cast<float4*>(o) + 2 * u;
        float4 a = o4[0], b = o4[1];
        a.x += f[0], a.y += f[1], a.z += f[2], a.w += f[3];
        b.x += f[4], b.y += f[5], b.z += f[6], b.w += f[7];
        o4[0] = a, o4[1] = b;
      }
    } else {
      for (int64_t u = threadIdx.x; u < d; u += kThreads) o[u] += __bfloat162float(s[u]);
    }
  }
}

bool aligned(const void* p, int64_t a) { return reinterpret_cast<uintptr_t>(p) % a == 0; }

int blocks_for(int64_t m) { return static_cast<int>(m < kMaxBlocks ? m : kMaxBlocks); }

template <bool kScatter>
cudaError_t move_rows(const void* src, const int32_t* index, void* dst, int64_t m, int64_t row_bytes,
                      cudaStream_t stream) {
  if (m < 0 || row_bytes < 0 || row_bytes % 2 != 0) return cudaErrorInvalidValue;
  if (m == 0 || row_bytes == 0) return cudaSuccess;
  if (!src || !index || !dst) return cudaErrorInvalidValue;
  const int blocks = blocks_for(m);
  if (row_bytes % 16 == 0 && aligned(src, 16) && aligned(dst, 16))
    move_rows_kernel<uint4, kScatter><<<blocks, kThreads, 0, stream>>>(
        static_cast<const uint4*>(src), index, static_cast<uint4*>(dst), m, row_bytes / 16);
  else if (row_bytes % 4 == 0 && aligned(src, 4) && aligned(dst, 4))
    move_rows_kernel<uint32_t, kScatter><<<blocks, kThreads, 0, stream>>>(
        static_cast<const uint32_t*>(src), index, static_cast<uint32_t*>(dst), m, row_bytes / 4);
  else if (aligned(src, 2) && aligned(dst, 2))
    move_rows_kernel<uint16_t, kScatter><<<blocks, kThreads, 0, stream>>>(
        static_cast<const uint16_t*>(src), index, static_cast<uint16_t*>(dst), m, row_bytes / 2);
  else
    return cudaErrorInvalidValue;  // rows of 2-byte elements at an odd address
  return cudaGetLastError();
}

}  // namespace

cudaError_t gather_rows(const void* src, const int32_t* index, void* dst, int64_t m, int64_t row_bytes,
                        cudaStream_t stream) {
  return move_rows<false>(src, index, dst, m, row_bytes, stream);
}

cudaError_t scatter_rows(const void* src, const int32_t* index, void* dst, int64_t m, int64_t row_bytes,
                         cudaStream_t stream) {
  return move_rows<true>(src, index, dst, m, row_bytes, stream);
}

cudaError_t scatter_add_rows(float* dst, const __nv_bfloat16* src, const int32_t* index, int64_t m, int64_t d,
                             cudaStream_t stream) {
  if (m < 0 || d < 0) return cudaErrorInvalidValue;
  if (m == 0 || d == 0) return cudaSuccess;
  if (!dst || !src || !index) return cudaErrorInvalidValue;
  if (d % 8 == 0 && aligned(src, 16) && aligned(dst, 16))
    scatter_add_rows_kernel<true><<<blocks_for(m), kThreads, 0, stream>>>(dst, src, index, m, d);
  else
    scatter_add_rows_kernel<false><<<blocks_for(m), kThreads, 0, stream>>>(dst, src, index, m, d);
  return cudaGetLastError();
}

}  // namespace dgemma::kernels
