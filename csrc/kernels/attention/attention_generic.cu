// attention_forward_generic: the contract of attention.cuh for any even head_dim up to 512 and any
// GQA ratio, as plain warp code: one warp per (row, new token, query head), each lane holding
// head_dim / 32 dims of q and of the fp32 output accumulator, keys visited one at a time in the
// contract's order (cached positions, then the row's new tokens) with an online softmax in fp32.
// Reference-grade, not fast: it runs the head sizes the tiled kernels do not cover (the small test
// models) and is the device-side reference those kernels can be checked against.
#include <cuda_bf16.h>

#include <cmath>

#include "kernels/attention/attention.cuh"

namespace dgemma::kernels {
namespace {

constexpr int kMaxDimsPerLane = 16;  // head_dim <= 512

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__global__ void __launch_bounds__(32) attention_generic_kernel(AttentionParams p) {
  const int r = blockIdx.z, h = blockIdx.y, j = blockIdx.x, lane = threadIdx.x;
  if (j >= p.count[r]) return;
  const int D = p.head_dim, kvh = h / (p.num_heads / p.num_kv_heads);
  const int64_t t = static_cast<int64_t>(p.tok0[r]) + j;
  const int cached_end = p.cache_len[r], first = p.cache_first_pos[r];
  const int qpos = cached_end + j;
  const int64_t kv_row = static_cast<int64_t>(p.num_kv_heads) * D;

  float q[kMaxDimsPerLane], acc[kMaxDimsPerLane];
  const __nv_bfloat16* qp = p.q + (t * p.num_heads + h) * D;
#pragma unroll
  for (int i = 0; i < kMaxDimsPerLane; ++i) {
    const int d = lane + 32 * i;
    q[i] = d < D ? __bfloat162float(qp[d]) : 0.f;
    acc[i] = 0.f;
  }
  float m = -INFINITY, l = 0.f;
  auto visit = [&](const __nv_bfloat16* kp, const __nv_bfloat16* vp, int kpos) {
    if (p.causal && (kpos > qpos || (p.window > 0 && kpos <= qpos - p.window))) return;
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < kMaxDimsPerLane; ++i) {
      const int d = lane + 32 * i;
      if (d < D) s += q[i] * __bfloat162float(kp[d]);
    }
    s = warp_sum(s) * p.scale;
    const float m_new = fmaxf(m, s);
    const float corr = expf(m - m_new), e = expf(s - m_new);
    l = l * corr + e;
#pragma unroll
    for (int i = 0; i < kMaxDimsPerLane; ++i) {
      const int d = lane + 32 * i;
      if (d < D) acc[i] = acc[i] * corr + e * __bfloat162float(vp[d]);
    }
    m = m_new;
  };
  if (p.k_cache != nullptr) {
    for (int pos = p.cache_start[r]; pos < cached_end; ++pos) {
      const int rel = pos - first;
      const int64_t block = p.block_table[static_cast<int64_t>(r) * p.max_blocks_per_row + rel / p.block_size];
      const int64_t slot = block * p.block_size + rel % p.block_size;
      visit(p.k_cache + slot * kv_row + kvh * D, p.v_cache + slot * kv_row + kvh * D, pos);
    }
  }
  for (int jj = 0; jj < p.count[r]; ++jj) {
    const int64_t tk = static_cast<int64_t>(p.tok0[r]) + jj;
    visit(p.k_new + tk * kv_row + kvh * D, p.v_new + tk * kv_row + kvh * D, cached_end + jj);
  }
  const float inv = l > 0.f ? 1.f / l : 0.f;
  __nv_bfloat16* op = p.out + (t * p.num_heads + h) * D;
#pragma unroll
  for (int i = 0; i < kMaxDimsPerLane; ++i) {
    const int d = lane + 32 * i;
    if (d < D) op[d] = __float2bfloat16(acc[i] * inv);
  }
}

}  // namespace

cudaError_t attention_forward_generic(const AttentionParams& p, cudaStream_t stream) {
  if (p.rows < 0 || p.max_count < 0 || p.head_dim < 2 || p.head_dim > 32 * kMaxDimsPerLane || p.head_dim % 2 ||
      p.num_kv_heads <= 0 || p.num_heads <= 0 || p.num_heads % p.num_kv_heads || !p.q || !p.k_new || !p.v_new ||
      !p.out || !p.tok0 || !p.count || !p.cache_len || !p.cache_start || !p.cache_first_pos ||
      (p.k_cache && (!p.v_cache || !p.block_table || p.block_size <= 0 || p.max_blocks_per_row <= 0)) ||
      p.num_heads > 65535 || p.rows > 65535)
    return cudaErrorInvalidValue;
  if (p.rows == 0 || p.max_count == 0) return cudaSuccess;
  attention_generic_kernel<<<dim3(p.max_count, p.num_heads, p.rows), 32, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace dgemma::kernels
