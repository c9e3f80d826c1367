// Split-KV merge: out[q] = sum_s 2^(m_s - M) O_s[q] / sum_s 2^(m_s - M) l_s, M = max_s m_s, over the
// parts s = 0, 1, ... in that order (deterministic). O_s is part s's unnormalised fp32 output, m_s its
// running max (log2 domain, -inf for a part that saw no key) and l_s its sum of exp2(score - m_s).
// One CTA per (token, row), all heads; each thread merges 4 consecutive dims with 16-byte loads.
// Bytes: splits * (head_dim + 2) * 4 per query head in, head_dim * 2 out, mostly from L2 (the
// attention kernel wrote them just before).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cmath>

#include "kernels/attention/attention_common.cuh"

namespace dgemma::kernels::attention_detail {

constexpr int kCombineThreads = 256;
// Occupancy plan: 4 CTAs (half the SM's threads) resident, so <= 64 registers per thread.
constexpr int kCombineCtasPerSm = 4;

template <int D>
__global__ void __launch_bounds__(kCombineThreads, kCombineCtasPerSm) attention_combine_kernel(const AttnArgs a) {
  const AttentionParams& p = a.p;
  const int row = blockIdx.y, t = blockIdx.x;
  if (t >= p.count[row]) return;
  const int H = p.num_heads;
  const size_t nq = static_cast<size_t>(p.rows) * p.max_count * H;
  const size_t q0 = (static_cast<size_t>(row) * p.max_count + t) * H;
  __nv_bfloat16* out = p.out + static_cast<size_t>(p.tok0[row] + t) * H * D;
  const float4* ws_o = reinterpret_cast<const float4*>(a.ws_o);
  for (int e = threadIdx.x; e < H * (D / 4); e += kCombineThreads) {
    const int h = e / (D / 4), d4 = e % (D / 4);
    const size_t q = q0 + h;
    float m_max = -INFINITY;
    for (int s = 0; s < a.splits; ++s) m_max = fmaxf(m_max, a.ws_ml[s * nq + q].x);
    float l = 0.f;
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int s = 0; s < a.splits; ++s) {
      const float2 ml = a.ws_ml[s * nq + q];
      const float wgt = ml.x == -INFINITY ? 0.f : exp2f(ml.x - m_max);
      const float4 o = ws_o[(s * nq + q) * (D / 4) + d4];
      l += wgt * ml.y;
      acc.x += wgt * o.x, acc.y += wgt * o.y, acc.z += wgt * o.z, acc.w += wgt * o.w;
    }
    const float inv = l > 0.f ? 1.f / l : 0.f;
    const __nv_bfloat162 lo = __floats2bfloat162_rn(acc.x * inv, acc.y * inv);
    const __nv_bfloat162 hi = __floats2bfloat162_rn(acc.z * inv, acc.w * inv);
    uint2 packed;
    packed.x = *reinterpret_cast<const uint32_t*>(&lo);
    packed.y = *reinterpret_cast<const uint32_t*>(&hi);
    *reinterpret_cast<uint2*>(out + static_cast<size_t>(h) * D + 4 * d4) = packed;
  }
}

}  // namespace dgemma::kernels::attention_detail
